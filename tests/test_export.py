"""``ftlab export``: adapter + base -> a plain transformers model with the adapted model's logits.

The base is a local directory (a seeded random tiny Llama written with ``save_pretrained``), as a
user's model would be, so export rebuilds exactly the base the adapter was trained on.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from ftlab.cli import main
from ftlab.export import ExportError, export
from ftlab.models.backbone import Backbone
from ftlab.models.tokenizer import byte_tokenizer
from ftlab.peft import LongLoRA, LoRA, QLoRA
from ftlab.peft.io import save_adapter, save_peft_adapter


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("base")
    torch.manual_seed(0)
    Backbone("tiny-llama", pretrained=False).load("causal_lm").save_pretrained(path)
    byte_tokenizer().save_pretrained(path)
    return path


def perturb(model, std=0.05, seed=123):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=gen) * std)


def trained_adapter(base_dir, method, path):
    """Apply ``method`` to the base, 'train' it (noise), save the adapter; return the model and ids."""
    backbone = Backbone(str(base_dir))
    model = backbone.load("causal_lm").eval()
    method.apply(model)
    perturb(model)
    save_adapter(
        path,
        model,
        method,
        backbone.fingerprint(model),
        extra={"objective": "ftlab.objectives.causal_lm.CausalLM"},
    )
    return model, backbone


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


IDS = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(1))
METHODS = {
    "lora": lambda: LoRA(rank=4, alpha=8, targets=["q_proj", "v_proj", "down_proj"]),
    "qlora-nf4": lambda: QLoRA(rank=4, alpha=8),
    "qlora-fp4-bf16-storage": lambda: QLoRA(
        rank=4, quant_type="fp4", double_quant=False, quant_storage="bfloat16"
    ),
    "longlora": lambda: LongLoRA(rank=4, group_size=8),
}


@pytest.mark.parametrize("name", METHODS)
def test_export_reloads_with_the_adapted_logits(name, base_dir, tmp_path):
    model, backbone = trained_adapter(base_dir, METHODS[name](), tmp_path / "adapter")
    adapted = logits(model, IDS)
    with torch.no_grad():
        assert (adapted - logits(backbone.load("causal_lm"), IDS)).abs().max() > 1e-2  # the adapter matters

    out = export(tmp_path / "adapter", tmp_path / "merged", backbone)
    plain = AutoModelForCausalLM.from_pretrained(out).eval()
    # QLoRA: the dense weights are dequant(Q(W0)) + s·BA, what the 4-bit model computed with
    torch.testing.assert_close(logits(plain, IDS), adapted, atol=1e-4, rtol=1e-4)

    weights = load_file(out / "model.safetensors")
    assert not any("lora_" in k or "absmax" in k or "quant" in k for k in weights)
    assert {v.dtype for v in weights.values()} == {torch.float32}
    config = json.loads((out / "config.json").read_text())
    assert config.get("_attn_implementation", "sdpa") != "ftlab_s2attn"
    assert "quantization_config" not in config
    tok = AutoTokenizer.from_pretrained(out)
    assert tok("hi")["input_ids"] == byte_tokenizer()("hi")["input_ids"]


def test_export_in_bfloat16(base_dir, tmp_path):
    model, backbone = trained_adapter(base_dir, QLoRA(rank=4), tmp_path / "adapter")
    out = export(tmp_path / "adapter", tmp_path / "merged", backbone, dtype="bfloat16")
    assert {v.dtype for v in load_file(out / "model.safetensors").values()} == {torch.bfloat16}
    plain = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    ref = logits(model, IDS)
    rel = (logits(plain, IDS) - ref).norm() / ref.norm()
    assert rel < 0.05  # bf16 rounding of the weights


def test_export_peft_format(base_dir, tmp_path):
    method = LoRA(rank=4, targets=["q_proj", "v_proj"])
    backbone = Backbone(str(base_dir))
    model = backbone.load("causal_lm").eval()
    method.apply(model)
    perturb(model)
    save_peft_adapter(tmp_path / "peft", model, method, str(base_dir))
    out = export(tmp_path / "peft", tmp_path / "merged", backbone)
    torch.testing.assert_close(
        logits(AutoModelForCausalLM.from_pretrained(out), IDS), logits(model, IDS), atol=1e-5, rtol=1e-5
    )


def test_cli_export_reads_the_backbone_from_the_run_yaml(base_dir, tmp_path, capsys):
    model, _ = trained_adapter(base_dir, LoRA(rank=4), tmp_path / "adapter")
    config = tmp_path / "run.yaml"
    config.write_text(
        f"model:\n  class_path: ftlab.objectives.CausalLM\n  init_args:\n"
        f"    backbone: {{name_or_path: {base_dir}}}\n"
    )
    main(
        [
            "export",
            "--config",
            str(config),
            "--adapter",
            str(tmp_path / "adapter"),
            "--out",
            str(tmp_path / "m"),
            "--dtype",
            "float32",
        ]
    )
    assert "merged model written to" in capsys.readouterr().out
    torch.testing.assert_close(
        logits(AutoModelForCausalLM.from_pretrained(tmp_path / "m"), IDS),
        logits(model, IDS),
        atol=1e-5,
        rtol=1e-5,
    )


def _error(args, capsys) -> str:
    with pytest.raises(SystemExit) as exit_:
        main(args)
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err


def test_cli_random_init_base_is_one_clear_line(base_dir, tmp_path, capsys):
    trained_adapter(base_dir, LoRA(rank=4), tmp_path / "adapter")
    config = tmp_path / "run.yaml"
    config.write_text("model:\n  init_args:\n    backbone: {name_or_path: tiny-llama, pretrained: false}\n")
    err = _error(
        [
            "export",
            "--config",
            str(config),
            "--adapter",
            str(tmp_path / "adapter"),
            "--out",
            str(tmp_path / "m"),
        ],
        capsys,
    )
    assert "randomly initialised" in err


def test_cli_missing_adapter_is_one_clear_line(tmp_path, capsys):
    err = _error(["export", "--adapter", str(tmp_path / "nowhere"), "--out", str(tmp_path / "m")], capsys)
    assert "no such adapter folder" in err


def test_wrong_base_is_refused(base_dir, tmp_path):
    trained_adapter(base_dir, LoRA(rank=4), tmp_path / "adapter")
    other = tmp_path / "other"
    torch.manual_seed(0)
    Backbone("tiny-llama", pretrained=False, config_overrides={"num_hidden_layers": 2}).load(
        "causal_lm"
    ).save_pretrained(other)
    with pytest.raises(ValueError, match="was trained on base"):
        export(tmp_path / "adapter", tmp_path / "m", Backbone(str(other)))


def test_classifier_adapter_is_refused(base_dir, tmp_path):
    backbone = Backbone(str(base_dir))
    model = backbone.load("causal_lm")
    method = LoRA(rank=2)
    method.apply(model)
    save_adapter(
        tmp_path / "a",
        model,
        method,
        backbone.fingerprint(model),
        extra={"objective": "ftlab.objectives.sequence_classifier.SequenceClassifier"},
    )
    with pytest.raises(ExportError, match="SequenceClassifier, which has no plain-model form to export"):
        export(tmp_path / "a", tmp_path / "m", backbone)
