"""Several named LoRA adapters on one model: switching, what trains, merging, and errors."""

from __future__ import annotations

import pytest
import torch

from ftlab.peft import LoRA, LoRALinear, count_parameters
from ftlab.peft.lora import (
    adapter_names,
    adapter_state_dict,
    disable_adapters,
    inject,
    load_adapter_state_dict,
    lora_layers,
    merge,
    set_adapter,
    unmerge,
)

QV = ["q_proj", "v_proj"]


def output(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def randomize(model, name: str, seed: int) -> None:
    """Give adapter ``name`` nonzero, distinct A and B (a stand-in for training)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in lora_layers(model):
            if name in m.lora_A:
                m.lora_A[name].normal_(0, 0.1, generator=gen)
                m.lora_B[name].normal_(0, 0.1, generator=gen)


@pytest.fixture
def two_adapters(tiny_llama):
    """tiny-llama with adapters ``a`` (r=4, q and v, all blocks) and ``b`` (r=8, q in blocks 2-3)."""
    LoRA(rank=4, alpha=8, targets=QV, adapter_name="a").apply(tiny_llama)
    added = inject(tiny_llama, ["q_proj"], "top:2", "b", rank=8, alpha=8)
    assert added == ["model.layers.2.self_attn.q_proj", "model.layers.3.self_attn.q_proj"]
    randomize(tiny_llama, "a", seed=1)
    randomize(tiny_llama, "b", seed=2)
    return tiny_llama


def single(make_model, name, rank, alpha, targets, layers, state):
    """A fresh base with only adapter ``name``, loaded with ``state``."""
    model = make_model("tiny-llama")
    LoRA(rank=rank, alpha=alpha, targets=targets, layers=layers, adapter_name=name).apply(model)
    load_adapter_state_dict(model, state, name)
    return model


def trainable_names(model):
    return {n for n, p in model.named_parameters() if p.requires_grad}


def test_names_and_wrapping(two_adapters):
    assert adapter_names(two_adapters) == ["a", "b"]
    layers = {n: m for n, m in two_adapters.named_modules() if isinstance(m, LoRALinear)}
    assert len(layers) == 8  # q and v in 4 blocks; b reuses the existing q wrappers, no double wrap
    assert not any(isinstance(m.base, LoRALinear) for m in layers.values())
    assert set(layers["model.layers.3.self_attn.q_proj"].lora_A) == {"a", "b"}
    assert set(layers["model.layers.0.self_attn.q_proj"].lora_A) == {"a"}
    assert layers["model.layers.3.self_attn.q_proj"].lora_A["b"].shape == (8, 128)
    assert layers["model.layers.3.self_attn.q_proj"].lora_B["b"].shape == (128, 8)


def test_only_active_adapter_trains(two_adapters):
    # right after inject, b's fresh parameters train too: set_adapter is what decides
    set_adapter(two_adapters, "a")
    names = trainable_names(two_adapters)
    assert names and all(".lora_A.a" in n or ".lora_B.a" in n for n in names)
    assert count_parameters(two_adapters)[0] == 8 * 4 * (128 + 128)

    set_adapter(two_adapters, "b")
    names = trainable_names(two_adapters)
    assert names == {f"model.layers.{i}.self_attn.q_proj.lora_{x}.b" for i in (2, 3) for x in "AB"}
    assert count_parameters(two_adapters)[0] == 2 * 8 * (128 + 128)
    # active is b where it exists, and nothing elsewhere
    assert {n: m.active for n, m in two_adapters.named_modules() if isinstance(m, LoRALinear)} == {
        **{f"model.layers.{i}.self_attn.{p}": None for i in (0, 1) for p in ("q_proj", "v_proj")},
        **{f"model.layers.{i}.self_attn.v_proj": None for i in (2, 3)},
        **{f"model.layers.{i}.self_attn.q_proj": "b" for i in (2, 3)},
    }


def test_num_parameters_counts_own_adapter_only(two_adapters):
    a = LoRA(rank=4, alpha=8, targets=QV, adapter_name="a")
    b = LoRA(rank=8, alpha=8, targets=["q_proj"], layers="top:2", adapter_name="b")
    assert a.num_parameters(two_adapters) == 8 * 4 * (128 + 128)
    assert b.num_parameters(two_adapters) == 2 * 8 * (128 + 128)
    set_adapter(two_adapters, "b")
    assert count_parameters(two_adapters)[0] == b.num_parameters(two_adapters)


def test_gradients_reach_active_adapter_only(two_adapters, make_batch):
    set_adapter(two_adapters, "b")
    two_adapters(input_ids=make_batch(two_adapters)).logits.pow(2).mean().backward()
    with_grad = {n for n, p in two_adapters.named_parameters() if p.grad is not None}
    assert with_grad == trainable_names(two_adapters)
    assert all(p.grad.abs().sum() > 0 for p in two_adapters.parameters() if p.grad is not None)


def test_outputs_per_adapter_match_single_adapter_models(two_adapters, make_model, make_batch):
    ids = make_batch(two_adapters)
    base = output(make_model("tiny-llama"), ids)
    set_adapter(two_adapters, "a")
    out_a = output(two_adapters, ids)
    set_adapter(two_adapters, "b")
    out_b = output(two_adapters, ids)
    for x, y in ((out_a, base), (out_b, base), (out_a, out_b)):
        assert (x - y).abs().max() > 1e-3

    only_a = single(make_model, "a", 4, 8, QV, None, adapter_state_dict(two_adapters, "a"))
    only_b = single(make_model, "b", 8, 8, ["q_proj"], "top:2", adapter_state_dict(two_adapters, "b"))
    assert torch.equal(out_a, output(only_a, ids))
    assert torch.equal(out_b, output(only_b, ids))

    with disable_adapters(two_adapters):
        assert torch.equal(output(two_adapters, ids), base)
    set_adapter(two_adapters, "a")
    assert torch.equal(output(two_adapters, ids), out_a)  # switching back is lossless


def test_adapter_state_dict_per_adapter(two_adapters):
    a, b = adapter_state_dict(two_adapters, "a"), adapter_state_dict(two_adapters, "b")
    assert len(a) == 16 and len(b) == 4
    assert b["model.layers.2.self_attn.q_proj.lora_A"].shape == (8, 128)
    key = "model.layers.2.self_attn.q_proj.lora_B"
    assert not torch.equal(a[key], b[key])


@pytest.mark.parametrize("active", ["a", "b"])
def test_merge_active_adapter_only(two_adapters, make_batch, active):
    ids = make_batch(two_adapters)
    set_adapter(two_adapters, active)
    adapted = output(two_adapters, ids)
    weights = {n: m.base.weight.clone() for n, m in two_adapters.named_modules() if isinstance(m, LoRALinear)}

    merge(two_adapters)
    torch.testing.assert_close(output(two_adapters, ids), adapted, atol=1e-5, rtol=1e-5)
    for n, m in two_adapters.named_modules():
        if isinstance(m, LoRALinear):
            assert m.merged == (active if active in m.lora_A else None), n
            assert torch.equal(m.base.weight, weights[n]) == (m.merged is None), n

    unmerge(two_adapters)
    for n, m in two_adapters.named_modules():
        if isinstance(m, LoRALinear):
            torch.testing.assert_close(m.base.weight, weights[n], atol=1e-6, rtol=0)
    torch.testing.assert_close(output(two_adapters, ids), adapted, atol=1e-5, rtol=1e-5)


def test_merge_named_adapter(two_adapters, make_batch):
    ids = make_batch(two_adapters)
    set_adapter(two_adapters, "b")
    out_b = output(two_adapters, ids)
    set_adapter(two_adapters, "a")
    merge(two_adapters, "b")  # fold b in while a is active elsewhere
    assert {m.merged for m in lora_layers(two_adapters)} == {"b", None}
    unmerge(two_adapters)
    set_adapter(two_adapters, "b")
    torch.testing.assert_close(output(two_adapters, ids), out_b, atol=1e-5, rtol=1e-5)


def test_switching_while_merged_raises(two_adapters):
    merge(two_adapters)  # a
    with pytest.raises(RuntimeError, match="'a' is merged; unmerge before switching"):
        set_adapter(two_adapters, "b")
    set_adapter(two_adapters, "a")  # re-selecting the merged adapter is fine
    unmerge(two_adapters)
    set_adapter(two_adapters, "b")
    assert {m.active for m in lora_layers(two_adapters)} == {"b", None}


def test_unknown_adapter_lists_names(two_adapters):
    with pytest.raises(KeyError) as err:
        set_adapter(two_adapters, "c")
    assert "'c'" in str(err.value) and "['a', 'b']" in str(err.value)


def test_duplicate_adapter_name_raises(two_adapters):
    with pytest.raises(ValueError, match="adapter 'b' already exists"):
        inject(two_adapters, ["q_proj"], None, "b", rank=2, alpha=2)


def test_load_state_into_wrong_adapter_raises(two_adapters):
    state_a = adapter_state_dict(two_adapters, "a")
    # b lives on two q_proj layers only; a's v_proj tensors have no place in it
    with pytest.raises(KeyError, match="has no place"):
        load_adapter_state_dict(two_adapters, state_a, "b")
    with pytest.raises(ValueError, match="shape"):
        key = "model.layers.2.self_attn.q_proj.lora_A"  # a's is (4, 128), b's is (8, 128)
        load_adapter_state_dict(two_adapters, {key: state_a[key]}, "b")
