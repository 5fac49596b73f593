"""The per-method invariant table of DESIGN.md ("House style"), one row per method configuration.

- applying a method (zero-init adapter) leaves outputs exactly unchanged;
- only the method's parameters get gradients, and their count matches the formula
  (LoRA: ``r · (in + out)`` summed over adapted layers);
- merge then unmerge restores the base weights; merged output equals the unmerged adapted output;
- save/load through ``ftlab.peft.io`` onto a fresh base gives identical outputs;
- ``disable_adapters`` gives the base output.

Adapters are made nonzero (``perturb``) before every output comparison, so a broken update shows.
Expected counts are worked out by hand from the tiny presets' shapes:
tiny-llama: hidden 128, intermediate 384, 4 blocks, vocab 259, tied head (886,272 parameters);
tiny-gpt2: hidden 64, Conv1D c_attn 64→192, c_proj 64→64, c_fc 64→256, mlp.c_proj 256→64, 2 blocks;
tiny-bert: hidden 32, 2 blocks, pooler 32→32.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import pytest
import torch

from ftlab.models.backbone import Backbone
from ftlab.peft import Full, LoRA, LoRALinear, count_parameters
from ftlab.peft._targets import layer_index
from ftlab.peft.io import load_adapter, save_adapter
from ftlab.peft.lora import disable_adapters, lora_layers, merge, unmerge

LLAMA_TOTAL = 886_272
LLAMA_BLOCK = 4 * 128 * 128 + 3 * 128 * 384 + 2 * 128  # attention + MLP + two RMSNorms = 213,248
LLAMA_EMBED = 259 * 128
GPT2_TOTAL = 149_440
GPT2_BLOCK = 2 * 128 + (64 * 192 + 192) + (64 * 64 + 64) + (64 * 256 + 256) + (256 * 64 + 64)  # 49,984


@dataclass
class Case:
    id: str
    model: str
    method: Callable[[], object]
    trainable: int  # expected trainable parameter count, from the formula
    lora: int = 0  # expected LoRA.num_parameters (adapter matrices only)
    frozen_layers: set[int] = field(default_factory=set)  # Full: blocks that must not train

    @property
    def is_lora(self) -> bool:
        return self.lora > 0


def r_in_out(r: int, in_f: int, out_f: int, n: int = 1) -> int:
    return n * r * (in_f + out_f)


LORA_CASES = [
    Case("llama-qv-r8", "tiny-llama", lambda: LoRA(rank=8, alpha=16, targets=["q_proj", "v_proj"]),
         trainable=r_in_out(8, 128, 128, n=4 * 2), lora=r_in_out(8, 128, 128, n=8)),
    Case("llama-all-linear-r4", "tiny-llama", lambda: LoRA(rank=4, alpha=8, targets=["all-linear"]),
         trainable=4 * (r_in_out(4, 128, 128, 4) + r_in_out(4, 128, 384, 2) + r_in_out(4, 384, 128)),
         lora=4 * (r_in_out(4, 128, 128, 4) + r_in_out(4, 128, 384, 2) + r_in_out(4, 384, 128))),
    Case("llama-rslora-top2", "tiny-llama",
         lambda: LoRA(rank=16, alpha=8, rslora=True, targets=["q_proj", "v_proj"], layers="top:2"),
         trainable=r_in_out(16, 128, 128, n=2 * 2), lora=r_in_out(16, 128, 128, n=4)),
    Case("llama-dropout-regex-layers", "tiny-llama",
         lambda: LoRA(rank=2, alpha=4, dropout=0.1, targets=[r"re:.*mlp\.(gate|up)_proj"], layers=[0, -1]),
         trainable=r_in_out(2, 128, 384, n=2 * 2), lora=r_in_out(2, 128, 384, n=4)),
    Case("gpt2-conv1d-c_attn", "tiny-gpt2", lambda: LoRA(rank=8, alpha=16, targets=["c_attn"]),
         trainable=r_in_out(8, 64, 192, n=2), lora=r_in_out(8, 64, 192, n=2)),
    Case("gpt2-conv1d-attn-mlp-rslora", "tiny-gpt2",
         lambda: LoRA(rank=4, alpha=4, rslora=True, targets=["attn.c_proj", "mlp.c_fc", "mlp.c_proj"]),
         trainable=2 * (r_in_out(4, 64, 64) + r_in_out(4, 64, 256) + r_in_out(4, 256, 64)),
         lora=2 * (r_in_out(4, 64, 64) + r_in_out(4, 64, 256) + r_in_out(4, 256, 64))),
    Case("bert-query-value", "tiny-bert", lambda: LoRA(rank=8, alpha=16, targets=["query", "value"]),
         trainable=r_in_out(8, 32, 32, n=2 * 2), lora=r_in_out(8, 32, 32, n=4)),
    Case("bert-query-value-train-pooler", "tiny-bert",
         lambda: LoRA(rank=4, alpha=8, targets=["query", "value"], trainable=["pooler"]),
         trainable=r_in_out(4, 32, 32, n=4) + 32 * 32 + 32, lora=r_in_out(4, 32, 32, n=4)),
]
FULL_CASES = [
    Case("llama-full", "tiny-llama", lambda: Full(), trainable=LLAMA_TOTAL),
    Case("llama-full-freeze-bottom2", "tiny-llama", lambda: Full(freeze_layers="bottom:2"),
         trainable=LLAMA_TOTAL - 2 * LLAMA_BLOCK, frozen_layers={0, 1}),
    Case("llama-full-freeze-top-half-and-embeddings", "tiny-llama",
         lambda: Full(freeze_layers="top_half", freeze_modules=["embed_tokens"]),
         trainable=LLAMA_TOTAL - 2 * LLAMA_BLOCK - LLAMA_EMBED, frozen_layers={2, 3}),
    Case("gpt2-full-freeze-first", "tiny-gpt2", lambda: Full(freeze_layers=[0]),
         trainable=GPT2_TOTAL - GPT2_BLOCK, frozen_layers={0}),
]
ALL_CASES = LORA_CASES + FULL_CASES


def cases(table):
    return pytest.mark.parametrize("case", table, ids=[c.id for c in table])


def output(model, ids) -> torch.Tensor:
    """Logits of a causal LM, last hidden state of an encoder."""
    with torch.no_grad():
        return model(input_ids=ids)[0]


def perturb(model, std: float = 0.05, seed: int = 123) -> None:
    """Stand in for training: add noise to every trainable tensor (so LoRA's B becomes nonzero)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=gen) * std)


def fingerprint(case: Case, model) -> dict:
    return Backbone(case.model, pretrained=False).fingerprint(model)


def assert_differs(a: torch.Tensor, b: torch.Tensor) -> None:
    assert (a - b).abs().max().item() > 1e-3, "the adapter changes nothing: the check would prove nothing"


# ------------------------------------------------------------------------------- the table
@cases(ALL_CASES)
def test_apply_leaves_outputs_unchanged(case, make_model, make_batch):
    model = make_model(case.model)
    ids = make_batch(model)
    before = output(model, ids)
    case.method().apply(model)
    assert torch.equal(output(model, ids), before)


@cases(ALL_CASES)
def test_only_method_parameters_get_gradients(case, make_model, make_batch):
    model = make_model(case.model)
    total_before = sum(p.numel() for p in model.parameters())
    method = case.method()
    method.apply(model)
    perturb(model)  # B = 0 would give A a zero gradient
    model.train()
    out = model(input_ids=make_batch(model))
    # every tensor output (BERT's pooler_output too), so a trainable head gets a gradient
    sum(v.float().pow(2).mean() for v in out.values() if isinstance(v, torch.Tensor)).backward()

    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    assert with_grad == trainable
    for n, p in model.named_parameters():
        if p.grad is not None:
            assert torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, n

    n_trainable, n_total = count_parameters(model)
    assert n_trainable == sum(p.numel() for p in model.parameters() if p.requires_grad) == case.trainable
    if case.is_lora:
        assert n_total == total_before + case.lora
        assert method.num_parameters(model) == case.lora
        extra = set(getattr(method, "trainable", []))
        for n in trainable:
            assert ".lora_A." in n or ".lora_B." in n or any(f"{t}." in n for t in extra), n
        assert all(isinstance(m, LoRALinear) for m in lora_layers(model))
    else:
        assert n_total == total_before
        for n in trainable:
            assert layer_index(n) not in case.frozen_layers, n
        frozen_seen = {layer_index(n) for n, p in model.named_parameters() if not p.requires_grad} - {None}
        assert frozen_seen == case.frozen_layers


@cases(LORA_CASES)
def test_merge_unmerge(case, make_model, make_batch):
    model = make_model(case.model)
    ids = make_batch(model)
    base_out = output(model, ids)
    case.method().apply(model)
    perturb(model)
    adapted = output(model, ids)
    assert_differs(adapted, base_out)
    weights = {id(m): m.base.weight.detach().clone() for m in lora_layers(model)}

    merge(model)
    assert all(m.merged == m.active for m in lora_layers(model))
    for m in lora_layers(model):
        assert not torch.allclose(m.base.weight, weights[id(m)])
    torch.testing.assert_close(output(model, ids), adapted, atol=1e-5, rtol=1e-5)

    unmerge(model)
    assert all(m.merged is None for m in lora_layers(model))
    for m in lora_layers(model):
        torch.testing.assert_close(m.base.weight, weights[id(m)], atol=1e-6, rtol=0)
    torch.testing.assert_close(output(model, ids), adapted, atol=1e-5, rtol=1e-5)


@cases(LORA_CASES)
def test_merge_twice_raises(case, make_model):
    model = make_model(case.model)
    case.method().apply(model)
    merge(model)
    with pytest.raises(RuntimeError, match="already merged"):
        merge(model)
    unmerge(model)
    unmerge(model)  # a no-op once unmerged


@cases(LORA_CASES)
def test_disable_adapters_gives_base_output(case, make_model, make_batch):
    model = make_model(case.model)
    ids = make_batch(model)
    base_out = output(model, ids)
    case.method().apply(model)
    perturb(model)
    adapted = output(model, ids)
    assert_differs(adapted, base_out)

    with disable_adapters(model):
        assert torch.equal(output(model, ids), base_out)
    assert torch.equal(output(model, ids), adapted)

    # merged adapters are unmerged inside the block and merged again after it
    merge(model)
    with disable_adapters(model):
        assert all(m.merged is None for m in lora_layers(model))
        torch.testing.assert_close(output(model, ids), base_out, atol=1e-5, rtol=1e-5)
    assert all(m.merged is not None for m in lora_layers(model))
    torch.testing.assert_close(output(model, ids), adapted, atol=1e-5, rtol=1e-5)


@cases(LORA_CASES)
def test_disable_adapters_restores_after_error(case, make_model):
    model = make_model(case.model)
    case.method().apply(model)
    active = [m.active for m in lora_layers(model)]
    with pytest.raises(ZeroDivisionError), disable_adapters(model):
        1 / 0
    assert [m.active for m in lora_layers(model)] == active


@cases(ALL_CASES)
def test_save_load_round_trip(case, make_model, make_batch, tmp_path):
    model = make_model(case.model)
    ids = make_batch(model)
    base_out = output(model, ids)
    method = case.method()
    method.apply(model)
    perturb(model)
    adapted = output(model, ids)
    assert_differs(adapted, base_out)

    path = save_adapter(tmp_path / "adapter", model, method, fingerprint(case, model))
    assert sorted(p.name for p in path.iterdir()) == ["adapter.json", "adapter.safetensors"]

    fresh = make_model(case.model)
    assert torch.equal(output(fresh, ids), base_out)
    loaded, extra = load_adapter(path, fresh, fingerprint(case, fresh))
    assert extra == {}
    assert type(loaded) is type(method) and loaded.hparams() == method.hparams()
    assert torch.equal(output(fresh, ids), adapted)
    assert count_parameters(fresh) == count_parameters(model)
    for (n, p), (n2, p2) in zip(model.named_parameters(), fresh.named_parameters()):
        assert n == n2 and p.requires_grad == p2.requires_grad and torch.equal(p, p2), n


def test_save_load_extra_tensors(make_model, make_batch, tmp_path):
    model = make_model("tiny-llama")
    method = LoRA(rank=4, targets=["q_proj"])
    method.apply(model)
    head = torch.randn(3, 128)
    path = save_adapter(tmp_path / "a", model, method, fingerprint(LORA_CASES[0], model),
                        extra_tensors={"score.weight": head}, extra={"num_labels": 3})
    _, extra = load_adapter(path, make_model("tiny-llama"), fingerprint(LORA_CASES[0], model))
    assert list(extra) == ["score.weight"] and torch.equal(extra["score.weight"], head)


def test_rslora_scaling(make_model):
    model = make_model("tiny-llama")
    LoRA(rank=16, alpha=8, targets=["q_proj"]).apply(model)
    rs = make_model("tiny-llama")
    LoRA(rank=16, alpha=8, rslora=True, targets=["q_proj"]).apply(rs)
    assert {m.scaling["default"] for m in lora_layers(model)} == {0.5}
    assert {m.scaling["default"] for m in lora_layers(rs)} == {2.0}


def test_delta_weight_layout(make_model):
    """``delta_weight`` is ``s · B A`` laid out like the base weight: (out, in), or (in, out) for Conv1D."""
    llama, gpt2 = make_model("tiny-llama"), make_model("tiny-gpt2")
    LoRA(rank=4, alpha=8, targets=["up_proj"]).apply(llama)
    LoRA(rank=4, alpha=8, targets=["c_fc"]).apply(gpt2)
    for model in (llama, gpt2):
        perturb(model)
        for m in lora_layers(model):
            delta = m.delta_weight("default")
            assert delta.shape == m.base.weight.shape
            ba = m.lora_B["default"] @ m.lora_A["default"] * 2.0  # (out, in)
            torch.testing.assert_close(delta, ba if model is llama else ba.T)
    assert next(lora_layers(llama)).base.weight.shape == (384, 128)
    assert next(lora_layers(gpt2)).base.weight.shape == (64, 256)


@pytest.mark.parametrize("adapter_dtype, expected", [(None, torch.float32), ("bfloat16", torch.bfloat16)])
def test_adapter_dtype(make_model, make_batch, adapter_dtype, expected):
    model = make_model("tiny-llama")
    ids = make_batch(model)
    base_out = output(model, ids)
    LoRA(rank=4, targets=["q_proj"], adapter_dtype=adapter_dtype).apply(model)
    assert {p.dtype for n, p in model.named_parameters() if "lora_" in n} == {expected}
    out = output(model, ids)
    assert out.dtype == torch.float32 and torch.equal(out, base_out)


@pytest.mark.parametrize("rank", [0, -1, -8])
def test_rank_must_be_positive(rank):
    with pytest.raises(ValueError, match="rank must be > 0"):
        LoRA(rank=rank)


@pytest.mark.parametrize("dropout", [-0.1, 1.0, 1.5])
def test_dropout_must_be_in_range(dropout):
    with pytest.raises(ValueError, match=r"dropout must be in \[0, 1\)"):
        LoRA(dropout=dropout)


@pytest.mark.parametrize("dropout", [0.0, 0.5, 0.999])
def test_dropout_in_range_accepted(dropout):
    assert LoRA(dropout=dropout).dropout == dropout


def test_no_dropout_op_when_p_is_zero(make_model):
    model = make_model("tiny-llama")
    LoRA(rank=2, dropout=0.0, targets=["q_proj"]).apply(model)
    assert all(isinstance(m.dropout["default"], torch.nn.Identity) for m in lora_layers(model))


def test_dropout_is_active_in_train_mode_only(make_model, make_batch):
    model = make_model("tiny-llama")
    ids = make_batch(model)
    LoRA(rank=4, dropout=0.5, targets=["q_proj", "v_proj"]).apply(model)
    # injected into an eval-mode model, the new modules (and their dropout) are in eval mode too
    assert not any(m.training for m in model.modules())
    perturb(model)
    evals = output(model, ids), output(model, ids)
    assert torch.equal(*evals)
    model.train()
    torch.manual_seed(0)
    a = output(model, ids)
    torch.manual_seed(1)
    assert_differs(a, output(model, ids))
