"""One invariant table over every method (DESIGN.md, "House style"), through the method protocol only.

Each row is a method configuration on a tiny model; each test checks one invariant on every row:

- it starts as the base: right after ``apply`` the output equals the base's (methods that start
  elsewhere by design, prompt and prefix tuning, are listed with their reason);
- only the method's parameters get gradients, and their count equals ``num_parameters`` and the
  formula worked out by hand below;
- save -> load onto a fresh base gives the same outputs and the same trainable tensors;
- ``disabled`` gives the base output back (or, for methods that train the base itself, the one
  ``MethodError`` saying so);
- ``merge_and_unload`` leaves a plain model with the adapted outputs (or ``MethodError`` for methods
  that cannot be folded), and on tiny-llama the merged model reloads with plain transformers.

Methods are made non-trivial (``perturb``) before outputs are compared, so a broken update shows.
Shapes: tiny-llama hidden 128, MLP 384, 4 blocks, 4 heads of 32, vocab 259, tied head (886,272
parameters); tiny-gpt2 hidden 64, Conv1D c_attn 64→192, c_proj 64→64, c_fc 64→256, mlp.c_proj
256→64, 2 blocks, 4 heads of 16; tiny-bert hidden 32, MLP 64, 2 blocks, 2 heads of 16.
"""

from __future__ import annotations

import re
import sys
import types
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from ftlab.models.backbone import Backbone
from ftlab.peft import (
    IA3,
    Adapter,
    DoRA,
    Full,
    LongLoRA,
    LoRA,
    LoRAPlus,
    MethodError,
    PrefixTuning,
    PromptTuning,
    QLoRA,
    count_parameters,
)
from ftlab.peft.io import load_adapter, save_adapter
from ftlab.peft.qlora import quantize

LLAMA_TOTAL = 886_272
LLAMA_BLOCK = 4 * 128 * 128 + 3 * 128 * 384 + 2 * 128  # attention + MLP + two RMSNorms
NO_FOLD = "cannot be folded into the base weights"
TRAINS_BASE = "cannot switch itself off"


@dataclass
class Case:
    id: str
    model: str
    method: Callable[[], object]
    formula: int  # trainable parameters, worked out by hand
    starts_as_base: str | None = None  # None: it does; else why not
    disable_error: str | None = None  # None: ``disabled`` gives the base; else the MethodError's words
    merge_error: str | None = None  # None: ``merge_and_unload`` folds it; else the MethodError's words
    base: Callable[[torch.nn.Module], None] | None = None  # what the method's own base is (QLoRA: 4-bit)


def r_io(r: int, n_in: int, n_out: int, n: int = 1) -> int:
    return n * r * (n_in + n_out)


CASES = [
    Case("full", "tiny-llama", lambda: Full(), LLAMA_TOTAL, disable_error=TRAINS_BASE),
    Case(
        "full-freeze-bottom2",
        "tiny-llama",
        lambda: Full(freeze_layers="bottom:2"),
        LLAMA_TOTAL - 2 * LLAMA_BLOCK,
        disable_error=TRAINS_BASE,
    ),
    Case(
        "lora-llama-qv",
        "tiny-llama",
        lambda: LoRA(rank=8, targets=["q_proj", "v_proj"]),
        r_io(8, 128, 128, 8),
    ),
    Case(
        "lora-llama-all-linear-rslora-top2",
        "tiny-llama",
        lambda: LoRA(rank=4, rslora=True, targets=["all-linear"], layers="top:2"),
        2 * (r_io(4, 128, 128, 4) + r_io(4, 128, 384, 2) + r_io(4, 384, 128)),
    ),
    Case(
        "lora-gpt2-conv1d",
        "tiny-gpt2",
        lambda: LoRA(rank=4, targets=["c_attn", "mlp.c_proj"]),
        r_io(4, 64, 192, 2) + r_io(4, 256, 64, 2),
    ),
    Case(
        "lora-bert-train-pooler",
        "tiny-bert",
        lambda: LoRA(rank=4, targets=["query", "value"], trainable=["pooler"]),
        r_io(4, 32, 32, 4) + 32 * 32 + 32,
        disable_error="also trains",
    ),
    Case(
        "lora-pissa",
        "tiny-llama",
        lambda: LoRA(rank=4, init="pissa", targets=["q_proj", "down_proj"]),
        r_io(4, 128, 128, 4) + r_io(4, 384, 128, 4),
        disable_error="rewrote the base weights",
    ),
    Case(
        "lora-olora-gpt2",
        "tiny-gpt2",
        lambda: LoRA(rank=4, init="olora", targets=["c_fc"]),
        r_io(4, 64, 256, 2),
        disable_error="rewrote the base weights",
    ),
    Case(
        "loraplus",
        "tiny-llama",
        lambda: LoRAPlus(lr_ratio=8, rank=4, targets=["k_proj"]),
        r_io(4, 128, 128, 4),
    ),
    Case(
        "dora-llama",
        "tiny-llama",
        lambda: DoRA(rank=8, targets=["q_proj", "v_proj"]),
        r_io(8, 128, 128, 8) + 8 * 128,
    ),
    Case(
        "dora-gpt2-conv1d-dropout",
        "tiny-gpt2",
        lambda: DoRA(rank=4, dropout=0.1, targets=["c_attn"]),
        r_io(4, 64, 192, 2) + 2 * 192,
    ),
    Case(
        "dora-bert",
        "tiny-bert",
        lambda: DoRA(rank=4, targets=["query", "value"]),
        r_io(4, 32, 32, 4) + 4 * 32,
    ),
    Case(
        "qlora",
        "tiny-llama",
        lambda: QLoRA(rank=4, targets=["q_proj", "up_proj"]),
        r_io(4, 128, 128, 4) + r_io(4, 128, 384, 4),
        base=lambda m: quantize(m, keep_dense=["lm_head"]),
    ),
    Case(
        "longlora",
        "tiny-llama",
        lambda: LongLoRA(rank=4, group_size=4),
        r_io(4, 128, 128, 16) + 259 * 128 + (2 * 4 * 128 + 128),
        disable_error="trains the base itself",
    ),
    Case(
        "longlora-frozen-embeddings-norms",
        "tiny-llama",
        lambda: LongLoRA(rank=4, group_size=4, train_embeddings=False, train_norms=False),
        r_io(4, 128, 128, 16),
    ),
    Case("ia3-llama", "tiny-llama", lambda: IA3(), (128 + 128 + 384) * 4),
    Case(
        "ia3-gpt2-conv1d",
        "tiny-gpt2",
        lambda: IA3(targets=["c_attn", "mlp.c_proj"], feedforward=["mlp.c_proj"]),
        (192 + 256) * 2,
    ),
    Case(
        "ia3-bert",
        "tiny-bert",
        lambda: IA3(
            targets=["key", "value", r"re:.*layer\.\d+\.output\.dense"],
            feedforward=[r"re:.*layer\.\d+\.output\.dense"],
        ),
        (32 + 32 + 64) * 2,
    ),
    Case(
        "prefix-llama",
        "tiny-llama",
        lambda: PrefixTuning(num_virtual_tokens=5),
        4 * 2 * 5 * 4 * 32,
        starts_as_base="prefixes are attended from the first step",
        merge_error=NO_FOLD,
    ),
    Case(
        "prefix-gpt2-mlp",
        "tiny-gpt2",
        lambda: PrefixTuning(num_virtual_tokens=5, reparameterize=True, projection_dim=8),
        5 * 64 + (64 * 8 + 8) + (8 * 2 * 2 * 4 * 16 + 2 * 2 * 4 * 16),
        starts_as_base="prefixes are attended from the first step",
        merge_error=NO_FOLD,
    ),
    Case(
        "prefix-bert",
        "tiny-bert",
        lambda: PrefixTuning(num_virtual_tokens=5),
        2 * 2 * 5 * 2 * 16,
        starts_as_base="prefixes are attended from the first step",
        merge_error=NO_FOLD,
    ),
    Case(
        "prompt-llama",
        "tiny-llama",
        lambda: PromptTuning(num_virtual_tokens=5),
        5 * 128,
        starts_as_base="the soft prompt is read from the first step",
        merge_error=NO_FOLD,
    ),
    Case(
        "prompt-bert",
        "tiny-bert",
        lambda: PromptTuning(num_virtual_tokens=5, init="random"),
        5 * 32,
        starts_as_base="the soft prompt is read from the first step",
        merge_error=NO_FOLD,
    ),
    Case(
        "adapter-houlsby-llama",
        "tiny-llama",
        lambda: Adapter(placement="houlsby"),
        8 * (2 * 128 * 8 + 8 + 128),
        merge_error=NO_FOLD,
    ),
    Case(
        "adapter-pfeiffer-gpt2",
        "tiny-gpt2",
        lambda: Adapter(reduction_factor=8),
        2 * (2 * 64 * 8 + 8 + 64),
        merge_error=NO_FOLD,
    ),
    Case(
        "adapter-pfeiffer-bert-top1",
        "tiny-bert",
        lambda: Adapter(reduction_factor=4, layers="top:1"),
        2 * 32 * 8 + 8 + 32,
        merge_error=NO_FOLD,
    ),
]


def _documented_example() -> type:
    """The BitFit class of docs/adding_a_method.md, run as written (a module of its own, so its
    adapter files name it by import path as a user's method would be)."""
    page = (Path(__file__).parents[2] / "docs" / "adding_a_method.md").read_text()
    (code,) = re.findall(r"```python\n(.*?)```", page, re.S)
    module = types.ModuleType("adding_a_method_example")
    sys.modules[module.__name__] = module
    exec(compile(code, "docs/adding_a_method.md", "exec"), module.__dict__)
    return module.BitFit


BitFit = _documented_example()
CASES += [  # biases: GPT-2 blocks 192 + 64 + 256 + 64 + 2 LayerNorms of 64, final LayerNorm 64
    Case("doc-bitfit-gpt2", "tiny-gpt2", lambda: BitFit(), 2 * (192 + 64 + 256 + 64 + 2 * 64) + 64),
    # BERT: embedding LayerNorm 32, blocks q/k/v/o 4·32 + 2 LayerNorms 2·32 + MLP 64 + 32, pooler 32
    Case(
        "doc-bitfit-bert",
        "tiny-bert",
        lambda: BitFit(exclude=["pooler"]),
        32 + 2 * (4 * 32 + 2 * 32 + 64 + 32),
    ),
]


def cases(predicate=lambda c: True):
    chosen = [c for c in CASES if predicate(c)]
    return pytest.mark.parametrize("case", chosen, ids=[c.id for c in chosen])


def output(model, ids) -> torch.Tensor:
    """Logits of a causal LM, last hidden state of an encoder (eval mode: no dropout)."""
    model.eval()
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


def base_output(case: Case, make_model, ids) -> torch.Tensor:
    model = make_model(case.model)
    if case.base:
        case.base(model)
    return output(model, ids)


def applied(case: Case, make_model):
    model = make_model(case.model)
    method = case.method()
    method.apply(model)
    return model, method


def assert_differs(a: torch.Tensor, b: torch.Tensor) -> None:
    assert (a - b).abs().max().item() > 1e-3, "the method changes nothing: the check would prove nothing"


# ------------------------------------------------------------------------------- the table
@cases()
def test_starts_as_the_base(case, make_model, make_batch):
    model, _ = applied(case, make_model)
    ids = make_batch(model)
    base = base_output(case, make_model, ids)
    if case.starts_as_base is not None:  # by design: the check is that it changes the output at all
        assert_differs(output(model, ids), base)
        return
    # PiSSA/OLoRA move s·B A out of the base weight: equal up to float rounding
    torch.testing.assert_close(output(model, ids), base, atol=1e-5, rtol=0)


@cases()
def test_only_method_parameters_get_gradients_and_their_count_is_the_formula(case, make_model, make_batch):
    model, method = applied(case, make_model)
    perturb(model)  # LoRA's B = 0 would give A a zero gradient
    model.train()
    out = model(input_ids=make_batch(model))
    # every tensor output (BERT's pooler_output too), so a trainable pooler gets a gradient
    sum(v.float().pow(2).mean() for v in out.values() if isinstance(v, torch.Tensor)).backward()

    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert {n for n, p in model.named_parameters() if p.grad is not None} == trainable
    for n, p in model.named_parameters():
        if p.grad is not None:
            assert torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, n
    assert count_parameters(model)[0] == method.num_parameters(model) == case.formula


@cases()
def test_save_load_round_trip(case, make_model, make_batch, tmp_path):
    model, method = applied(case, make_model)
    ids = make_batch(model)
    perturb(model)
    adapted = output(model, ids)
    path = save_adapter(tmp_path / "adapter", model, method, fingerprint(case, model))
    assert sorted(p.name for p in path.iterdir()) == ["adapter.json", "adapter.safetensors"]

    fresh = make_model(case.model)
    loaded, extra = load_adapter(path, fresh, fingerprint(case, fresh))
    assert extra == {} and type(loaded) is type(method) and loaded.hparams() == method.hparams()
    torch.testing.assert_close(output(fresh, ids), adapted, atol=1e-5, rtol=0)
    assert count_parameters(fresh) == count_parameters(model)
    for (n, p), (n2, p2) in zip(model.named_parameters(), fresh.named_parameters()):
        assert n == n2 and p.requires_grad == p2.requires_grad, n
        if p.requires_grad:
            assert torch.equal(p, p2), n


@cases()
def test_disabled_gives_the_base(case, make_model, make_batch):
    model, method = applied(case, make_model)
    if case.disable_error:
        with pytest.raises(MethodError, match=case.disable_error):
            method.disabled(model)  # refused when asked, not only when entered
        return
    ids = make_batch(model)
    perturb(model)
    adapted = output(model, ids)
    base = base_output(case, make_model, ids)
    assert_differs(adapted, base)
    with method.disabled(model):
        torch.testing.assert_close(output(model, ids), base, atol=1e-6, rtol=0)
    assert torch.equal(output(model, ids), adapted)  # switched back on after the block
    with pytest.raises(ZeroDivisionError), method.disabled(model):
        _ = 1 / 0
    assert torch.equal(output(model, ids), adapted)  # also after an error inside the block


@cases()
def test_merge_and_unload_leaves_a_plain_model(case, make_model, make_batch, tmp_path):
    model, method = applied(case, make_model)
    if case.merge_error:
        with pytest.raises(MethodError, match=case.merge_error):
            method.merge_and_unload(model)
        return
    ids = make_batch(model)
    perturb(model)
    adapted = output(model, ids)
    method.merge_and_unload(model)
    plain = make_model(case.model)
    if case.base:  # QLoRA folds into dense weights
        assert not any(type(m).__name__ == "Linear4bit" for m in model.modules())
    assert [type(m) for m in model.modules()] == [type(m) for m in plain.modules()]
    assert [n for n, _ in model.named_parameters()] == [n for n, _ in plain.named_parameters()]
    torch.testing.assert_close(output(model, ids), adapted, atol=1e-5, rtol=1e-5)
    if case.model == "tiny-llama":  # and plain transformers reads it back
        from transformers import AutoModelForCausalLM

        model.save_pretrained(tmp_path / "merged")
        reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
        torch.testing.assert_close(output(reloaded, ids), adapted, atol=1e-5, rtol=1e-5)


def test_every_method_class_is_in_the_table():
    import ftlab.peft as peft
    from ftlab.peft.method import Method

    methods = {obj for obj in vars(peft).values() if isinstance(obj, type) and issubclass(obj, Method)} - {
        Method
    }
    assert methods | {BitFit} == {type(c.method()) for c in CASES}


def test_the_documented_example_refuses_a_model_without_biases(make_model):
    with pytest.raises(MethodError, match="BitFit: LlamaForCausalLM has no bias vectors to train"):
        BitFit().apply(make_model("tiny-llama"))
