"""QLoRA beyond the invariant table, over quantization settings (nf4/fp4, double quantization,
storage dtype, Conv1D): applying it changes outputs only by quantization (the zero-init adapter adds
nothing to the 4-bit model); a dense merge equals the adapted model and unmerges to the dequantized
base; quantized bytes; CPU train -> validate -> train.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable
from dataclasses import dataclass

import lightning as L
import pytest
import torch
from conftest import DEVICE

from ftlab.models.backbone import Backbone
from ftlab.peft import LoRALinear, QLoRA
from ftlab.peft.layers import dense_weight
from ftlab.peft.lora import adapter_state_dict, load_adapter_state_dict, lora_layers, unmerge
from ftlab.peft.lora import merge as lora_merge
from ftlab.peft.qlora import (
    QuantizationError,
    dequantize,
    linear_weight_bytes,
    merge,
    quantize,
    weight_bytes,
)

bnb = pytest.importorskip("bitsandbytes")
Linear4bit = bnb.nn.Linear4bit


@dataclass
class Case:
    id: str
    model: str
    method: Callable[[], QLoRA]
    lora: int  # r · (in + out) summed over adapted layers
    quantized: int  # number of 4-bit layers

    def __str__(self) -> str:
        return self.id


def r_in_out(r, i, o, n=1):
    return n * r * (i + o)


LLAMA_ALL = 4 * (r_in_out(1, 128, 128, 4) + r_in_out(1, 128, 384, 2) + r_in_out(1, 384, 128))
CASES = [
    Case("llama-nf4-dq-all-linear-r4", "tiny-llama", lambda: QLoRA(rank=4, alpha=8), 4 * LLAMA_ALL, 28),
    Case(
        "llama-fp4-no-dq-qv-r8",
        "tiny-llama",
        lambda: QLoRA(rank=8, targets=["q_proj", "v_proj"], quant_type="fp4", double_quant=False),
        r_in_out(8, 128, 128, 8),
        28,
    ),
    Case(
        "llama-nf4-bf16-storage-mlp-blocks",
        "tiny-llama",
        lambda: QLoRA(rank=4, targets=["mlp.*"], quantize=["mlp.*"], quant_storage="bfloat16", blocksize=128),
        4 * r_in_out(4, 128, 384, 2) + 4 * r_in_out(4, 384, 128),
        12,
    ),
    Case(
        "gpt2-conv1d-c_attn",
        "tiny-gpt2",
        lambda: QLoRA(rank=8, targets=["c_attn"]),
        r_in_out(8, 64, 192, 2),
        8,
    ),
]
cases = pytest.mark.parametrize("case", CASES, ids=str)


def output(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def perturb(model, std=0.05, seed=123):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=gen).to(p.device, p.dtype) * std)


def quantized_only(case, make_model):
    """The base quantized exactly as the case's QLoRA does, with no adapter."""
    model, m = make_model(case.model), case.method()
    quantize(
        model,
        m.quantize,
        m.keep_dense,
        m.quant_type,
        m.double_quant,
        None,
        getattr(torch, m.quant_storage),
        m.blocksize,
    )
    return model


def assert_close_to_dense(out, dense):
    """4-bit logits stay near the dense ones. Each 4-bit weight is off by ~9% (nf4) to ~12% (fp4) in
    norm; through a random tiny model that compounds to ~20% on the logits (~5% on the pretrained
    tiny-llama). A broken quantization gives > 100%."""
    rel = (out - dense).norm() / dense.norm()
    assert 0 < rel < 0.4, rel


# ------------------------------------------------------------------------------ the table
@cases
def test_apply_changes_outputs_by_quantization_only(case, make_model, make_batch):
    model = make_model(case.model)
    ids = make_batch(model)
    dense = output(model, ids)
    weights = {n: m.weight.detach().clone() for n, m in model.named_modules() if hasattr(m, "weight")}
    method = case.method()
    method.apply(model)
    quantized = {n.removesuffix(".base"): m for n, m in model.named_modules() if isinstance(m, Linear4bit)}
    assert len(quantized) == case.quantized
    for n, m in quantized.items():
        w = weights[n].T if case.model == "tiny-gpt2" else weights[n]  # Conv1D stores (in, out)
        assert (dense_weight(m) - w).norm() / w.norm() < 0.15, n
    out = output(model, ids)
    assert torch.equal(out, output(quantized_only(case, make_model), ids))  # zero-init adapter: no change
    assert_close_to_dense(out, dense)
    assert all(not m.support_avx512bf16_for_cpu for m in model.modules() if isinstance(m, Linear4bit))


@cases
def test_dense_merge_equals_adapted_and_unmerge_restores(case, make_model, make_batch):
    model = make_model(case.model)
    ids = make_batch(model)
    case.method().apply(model)
    perturb(model)
    adapted = output(model, ids)
    assert (adapted - output(quantized_only(case, make_model), ids)).abs().max() > 1e-3

    with pytest.raises(RuntimeError, match="quantized base"):  # adding to packed codes would corrupt them
        lora_merge(model)
    assert dequantize(model) and not any(isinstance(m, Linear4bit) for m in model.modules())
    torch.testing.assert_close(output(model, ids), adapted, atol=1e-5, rtol=1e-5)
    weights = {id(m): m.base.weight.detach().clone() for m in lora_layers(model)}
    lora_merge(model)
    torch.testing.assert_close(output(model, ids), adapted, atol=1e-5, rtol=1e-5)
    unmerge(model)
    for m in lora_layers(model):
        torch.testing.assert_close(m.base.weight, weights[id(m)], atol=1e-6, rtol=0)


@cases
def test_merge_dense_or_requantized(case, make_model, make_batch):
    model = make_model(case.model)
    ids = make_batch(model)
    case.method().apply(model)
    perturb(model)
    adapted = output(model, ids)
    requantized = make_model(case.model)
    case.method().apply(requantized)
    perturb(requantized)

    merge(model)
    assert not any(isinstance(m, (LoRALinear, Linear4bit)) for m in model.modules())
    torch.testing.assert_close(output(model, ids), adapted, atol=1e-5, rtol=1e-5)

    merge(requantized, requantize=True)
    assert not any(isinstance(m, LoRALinear) for m in requantized.modules())
    layers = {n: m for n, m in requantized.named_modules() if isinstance(m, Linear4bit)}
    assert len(layers) == case.quantized
    dense = dict(model.named_modules())
    for n, m in layers.items():  # the dense merge, rounded once more to 4 bits with the same settings
        w = dense[n].weight.T if case.model == "tiny-gpt2" else dense[n].weight
        assert (dense_weight(m) - w).norm() / w.norm() < 0.15, n
    m = case.method()
    quantize(
        model,
        m.quantize,
        m.keep_dense,
        m.quant_type,
        m.double_quant,
        None,
        getattr(torch, m.quant_storage),
        m.blocksize,
    )
    assert torch.equal(output(requantized, ids), output(model, ids))


# ------------------------------------------------------------------------------ memory
@pytest.mark.parametrize(
    "dtype, double_quant, at_least",
    [
        ("float32", True, 7.0),  # 32 bits -> ~4.13
        # 16 bits -> ~4.13 (+ a 1 KiB second-level code book per layer: 3.6x on these 128-wide layers)
        ("bfloat16", True, 3.5),
        ("bfloat16", False, 3.5),  # 16 bits -> 4.5 (one fp32 absmax per 64 values)
    ],
)
def test_quantized_bytes(make_model, dtype, double_quant, at_least):
    model = Backbone("tiny-llama", pretrained=False, dtype=dtype).load("causal_lm")
    before = linear_weight_bytes(model)
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logger = logging.getLogger("ftlab")
    logger.addHandler(handler)
    old_level = logger.level
    logger.setLevel(logging.INFO)
    try:
        method = QLoRA(rank=4, double_quant=double_quant)
        method.apply(model)
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)
    report = method.report
    assert report.layers == 28
    assert report.ratio >= at_least
    # the LM head is tied to the embeddings: it stays dense, and its bytes are counted on both sides
    head = weight_bytes(model.lm_head)
    assert report.bytes_before == before - head
    assert linear_weight_bytes(model) == report.bytes_after + head
    assert any(
        "28 linear layers to 4 bits" in r.getMessage() and "x smaller" in r.getMessage() for r in records
    )


def test_compute_dtype_sets_adapter_dtype(make_model, make_batch):
    model = make_model("tiny-llama")
    QLoRA(rank=4, targets=["q_proj"], compute_dtype="bfloat16", quant_storage="float32").apply(model)
    assert {p.dtype for n, p in model.named_parameters() if "lora_" in n} == {torch.bfloat16}
    assert {m.base.compute_dtype for m in lora_layers(model)} == {torch.bfloat16}
    assert output(model, make_batch(model)).dtype == torch.float32


# ------------------------------------------------------------------------------ bad input
def test_model_without_linear_layers_is_an_error():
    model = torch.nn.Sequential(torch.nn.Embedding(10, 8), torch.nn.LayerNorm(8))
    with pytest.raises(QuantizationError, match="no linear layers to quantize.*Embedding"):
        QLoRA().apply(model)


def test_keep_dense_everything_is_an_error(make_model):
    with pytest.raises(QuantizationError, match="leaves no layer"):
        QLoRA(quantize=["q_proj"], keep_dense=["q_proj"]).apply(make_model("tiny-llama"))


def test_bitsandbytes_missing_is_one_clear_line(make_model, monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # import fails as if not installed
    with pytest.raises(ImportError, match=r"QLoRA needs bitsandbytes \(a dependency of ftlab\): pip install"):
        QLoRA().apply(make_model("tiny-llama"))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"quant_type": "int4"}, "quant_type"),
        ({"blocksize": 48}, "blocksize"),
        ({"blocksize": 8192}, "blocksize"),
    ],
)
def test_bad_settings(kwargs, match):
    with pytest.raises(ValueError, match=match):
        QLoRA(**kwargs)


# ------------------------------------------------------------------------------ training on CPU
@pytest.mark.skipif(DEVICE.type != "cpu", reason="the CPU fallback of paged optimizers")
def test_paged_8bit_adamw_steps_on_cpu(make_model, make_batch):
    model = make_model("tiny-llama")
    QLoRA(rank=64, targets=["up_proj"]).apply(model)  # A: 64 x 128 = 8192 values, over min_8bit_size
    perturb(model)
    params = [p for p in model.parameters() if p.requires_grad]
    before = [p.detach().clone() for p in params]
    with pytest.warns(UserWarning, match="Paged optimizers are not supported on CPU"):
        opt = bnb.optim.PagedAdamW8bit(params, lr=1e-2)
        model.train()
        model(input_ids=make_batch(model)).logits.pow(2).mean().backward()
        opt.step()
    assert all(not torch.equal(b, p) for b, p in zip(before, params))
    assert any(s["state1"].dtype == torch.uint8 for s in opt.state.values())


def lora_grads(model, ids) -> dict[str, torch.Tensor]:
    model.train()
    model.zero_grad()
    model(input_ids=ids).logits.pow(2).mean().backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def test_eval_forward_does_not_change_training_gradients(make_model, make_batch):
    """DESIGN.md's trap: on AVX512-BF16 CPUs an eval-mode no_grad forward repacks the 4-bit weights
    in place, and later gradients are silently wrong. They must equal a never-evaluated twin's."""
    model, twin = make_model("tiny-llama"), make_model("tiny-llama")
    for m in (model, twin):
        QLoRA(rank=4).apply(m)
    perturb(model)
    load_adapter_state_dict(twin, adapter_state_dict(model, "default"), "default")
    ids = make_batch(model)
    model.eval()
    with torch.no_grad():
        model(input_ids=ids)
    assert not any(
        getattr(m.weight.quant_state, "packing_format_for_cpu", False)
        for m in model.modules()
        if isinstance(m, Linear4bit)
    )
    got, want = lora_grads(model, ids), lora_grads(twin, ids)
    for n in want:
        torch.testing.assert_close(got[n], want[n], atol=1e-6, rtol=1e-5, msg=n)


def test_lightning_train_validate_train_keeps_lora_gradients(tmp_path):
    """Sanity check (eval, no_grad) -> train -> validate -> train -> validate on CPU through a
    Lightning Trainer: every step gets a LoRA gradient, and afterwards the gradients equal those of a
    copy of the model that never ran in eval mode (DESIGN.md: AVX512-BF16 repacking breaks them)."""
    import copy

    from ftlab.data import InstructionData
    from ftlab.objectives import CausalLM

    class GradNorms(L.Callback):
        def __init__(self):
            self.norms: list[float] = []

        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            self.norms.append(
                sum(float(p.grad.abs().sum()) for n, p in pl_module.named_parameters() if "lora_B" in n)
            )

    L.seed_everything(0)
    model = CausalLM(
        Backbone(pretrained=False),
        QLoRA(rank=4, alpha=8),
        optimizer=lambda p: torch.optim.AdamW(p, lr=1e-2),
        exact_match=False,
    )
    model.configure_model()
    twin = copy.deepcopy(model.model)  # never sees eval mode
    data = InstructionData(
        template="alpaca_short",
        max_length=96,
        batch_size=4,
        synthetic_train_size=32,
        synthetic_val_size=4,
        tokenizer="tiny-llama",
    )
    grads = GradNorms()
    trainer = L.Trainer(
        accelerator=DEVICE.type,
        devices=1,
        max_steps=4,
        val_check_interval=2,
        num_sanity_val_steps=1,
        limit_val_batches=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
        callbacks=[grads],
    )
    trainer.fit(model, data)
    assert len(grads.norms) == 4 and all(g > 0 for g in grads.norms), grads.norms
    assert trainer.validate(model, data, verbose=False)[0]["val/loss"] > 0

    load_adapter_state_dict(twin, adapter_state_dict(model.model, "default"), "default")
    twin.to(DEVICE)
    ids = next(iter(data.train_dataloader()))["input_ids"].to(DEVICE)
    got, want = lora_grads(model.model, ids), lora_grads(twin, ids)
    assert got.keys() == want.keys()
    for n in want:
        torch.testing.assert_close(got[n], want[n], atol=1e-6, rtol=1e-5, msg=n)


def test_model_quantized_at_load_time_by_transformers(make_model, make_batch, tmp_path):
    """A base loaded with BitsAndBytesConfig keeps its 4-bit layers; LoRA goes on top, made safe for CPU."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    make_model("tiny-llama").save_pretrained(tmp_path)
    config = BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32
    )
    place = {"device_map": {"": DEVICE.index or 0}} if DEVICE.type == "cuda" else {}
    model = AutoModelForCausalLM.from_pretrained(tmp_path, quantization_config=config, **place)
    method = QLoRA(rank=4)
    method.apply(model)
    assert method.report.layers == 0 and "already 4-bit" in str(method.report)
    assert all(
        isinstance(m.base, Linear4bit) and not m.base.support_avx512bf16_for_cpu for m in lora_layers(model)
    )
    perturb(model)
    ids = make_batch(model)
    model.eval()
    with torch.no_grad():
        model(input_ids=ids)
    assert all(g.abs().sum() > 0 for n, g in lora_grads(model, ids).items() if "lora_B" in n)


def test_readmes_main_install_brings_bitsandbytes(make_model):
    """README's first command installs the core dependencies only: bitsandbytes must be one of them
    (not only of an extra), and QLoRA then builds."""
    import re
    from pathlib import Path

    import tomllib

    project = tomllib.loads((Path(__file__).parents[2] / "pyproject.toml").read_text())["project"]
    core = {re.split(r"[<>=!~\[ ]", d, maxsplit=1)[0].lower() for d in project["dependencies"]}
    assert "bitsandbytes" in core
    assert all(
        "bitsandbytes" not in d for deps in project.get("optional-dependencies", {}).values() for d in deps
    )
    model = make_model("tiny-llama")
    QLoRA(rank=2, targets=["q_proj"]).apply(model)
    assert any(type(m).__name__ == "Linear4bit" for m in model.modules())
