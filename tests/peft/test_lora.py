"""LoRA beyond the invariant table: merge/unmerge of ``LoRALinear``, scaling, dtypes, dropout, wrapping any
linear layer, bad arguments."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from ftlab.peft import LoRA, LoRALinear
from ftlab.peft.lora import disable_adapters, lora_layers, merge, unmerge


def output(model, ids) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids)[0]


def perturb(model, std: float = 0.05, seed: int = 123) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=gen) * std)


@pytest.mark.parametrize(
    "name, targets", [("tiny-llama", ["q_proj", "down_proj"]), ("tiny-gpt2", ["c_attn"])]
)
def test_merge_then_unmerge_restores_the_weights(name, targets, make_model, make_batch):
    model = make_model(name)
    ids = make_batch(model)
    LoRA(rank=4, targets=targets).apply(model)
    perturb(model)
    adapted = output(model, ids)
    weights = {id(m): m.base.weight.detach().clone() for m in lora_layers(model)}
    merge(model)
    assert all(m.merged == m.active for m in lora_layers(model))
    assert all(not torch.allclose(m.base.weight, weights[id(m)]) for m in lora_layers(model))
    torch.testing.assert_close(output(model, ids), adapted, atol=1e-5, rtol=1e-5)
    with pytest.raises(RuntimeError, match="already merged"):
        merge(model)
    with disable_adapters(model):  # merged adapters are unmerged inside the block...
        assert all(m.merged is None for m in lora_layers(model))
    assert all(m.merged is not None for m in lora_layers(model))  # ...and merged again after it
    unmerge(model)
    unmerge(model)  # a no-op once unmerged
    for m in lora_layers(model):
        torch.testing.assert_close(m.base.weight, weights[id(m)], atol=1e-6, rtol=0)


def test_delta_weight_is_s_times_b_a_in_out_by_in(make_model):
    """``delta_weight`` is ``s · B A`` (out, in) whatever the base stores; Conv1D stores (in, out)."""
    gpt2 = make_model("tiny-gpt2")
    LoRA(rank=4, alpha=8, targets=["c_fc"]).apply(gpt2)
    perturb(gpt2)
    for m in lora_layers(gpt2):
        assert m.base.weight.shape == (64, 256) and m.delta_weight("default").shape == (256, 64)
        torch.testing.assert_close(m.delta_weight("default"), m.lora_B["default"] @ m.lora_A["default"] * 2.0)


def test_rslora_scaling(make_model):
    model, rs = make_model("tiny-llama"), make_model("tiny-llama")
    LoRA(rank=16, alpha=8, targets=["q_proj"]).apply(model)
    LoRA(rank=16, alpha=8, rslora=True, targets=["q_proj"]).apply(rs)
    assert {m.scaling["default"] for m in lora_layers(model)} == {0.5}
    assert {m.scaling["default"] for m in lora_layers(rs)} == {2.0}


@pytest.mark.parametrize("adapter_dtype, expected", [(None, torch.float32), ("bfloat16", torch.bfloat16)])
def test_adapter_dtype(make_model, make_batch, adapter_dtype, expected):
    model = make_model("tiny-llama")
    ids = make_batch(model)
    base_out = output(model, ids)
    LoRA(rank=4, targets=["q_proj"], adapter_dtype=adapter_dtype).apply(model)
    assert {p.dtype for n, p in model.named_parameters() if "lora_" in n} == {expected}
    out = output(model, ids)
    assert out.dtype == torch.float32 and torch.equal(out, base_out)


def test_dropout_op_only_when_p_is_positive_and_only_in_train_mode(make_model, make_batch):
    none = make_model("tiny-llama")
    LoRA(rank=2, dropout=0.0, targets=["q_proj"]).apply(none)
    assert all(isinstance(m.dropout["default"], nn.Identity) for m in lora_layers(none))
    model = make_model("tiny-llama")
    ids = make_batch(model)
    LoRA(rank=4, dropout=0.5, targets=["q_proj", "v_proj"]).apply(model)
    # injected into an eval-mode model, the new modules (and their dropout) are in eval mode too
    assert not any(m.training for m in model.modules())
    perturb(model)
    assert torch.equal(output(model, ids), output(model, ids))
    model.train()
    torch.manual_seed(0)
    a = output(model, ids)
    torch.manual_seed(1)
    assert (a - output(model, ids)).abs().max() > 1e-3


def test_wraps_a_subclass_of_linear(make_batch):
    """Falcon's ``FalconLinear`` and bitsandbytes' layers subclass ``nn.Linear``: LoRA wraps them too."""

    class MyLinear(nn.Linear):
        pass

    layer = MyLinear(8, 6)
    model = nn.Sequential()
    model.add_module("proj", layer)
    LoRA(rank=2, targets=["proj"]).apply(model)
    assert isinstance(model.proj, LoRALinear) and model.proj.base is layer
    x = torch.randn(3, 8)
    torch.testing.assert_close(model(x), layer(x))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"rank": 0}, "rank must be > 0"),
        ({"rank": -8}, "rank must be > 0"),
        ({"dropout": -0.1}, r"dropout must be in \[0, 1\)"),
        ({"dropout": 1.0}, r"dropout must be in \[0, 1\)"),
        ({"init": "xavier"}, "init 'xavier' is not one of"),
    ],
)
def test_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        LoRA(**kwargs)
