"""Adapter files: ftlab's format (base checks, atomic writes) and PEFT's LoRA and DoRA formats both ways."""

from __future__ import annotations

import json

import peft
import pytest
import torch
from safetensors.torch import load_file

from ftlab.models.backbone import Backbone
from ftlab.peft import DoRA, LoRA, LoRALinear, PromptTuning
from ftlab.peft import io as adapter_io
from ftlab.peft.io import (
    PEFT_CONFIG,
    PEFT_WEIGHTS,
    AdapterError,
    load_adapter,
    load_peft_adapter,
    save_adapter,
    save_peft_adapter,
)
from ftlab.peft.lora import adapter_state_dict, lora_layers

# PEFT calls a transformers API that transformers 5 deprecates; not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning")

# (preset, ftlab targets, PEFT target_modules, Conv1D layers?)
ARCHS = [
    ("tiny-llama", ["q_proj", "v_proj"], ["q_proj", "v_proj"], False),
    ("tiny-gpt2", ["c_attn", "mlp.c_fc"], ["c_attn", "c_fc"], True),
]


def is_lora_model(model) -> bool:
    return any(True for _ in lora_layers(model))


def output(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def randomize(named_params, seed=0):
    """Nonzero LoRA A and B, so an adapter that is loaded wrong changes the output."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in named_params:
            if "lora_A" in n or "lora_B" in n:
                p.normal_(0, 0.1, generator=gen)


def fingerprint(name, model, **overrides):
    return Backbone(name, pretrained=False, config_overrides=overrides or None).fingerprint(model)


def assert_differs(a, b):
    assert (a - b).abs().max() > 1e-3


# ------------------------------------------------------------------------------- PEFT interop
VARIANTS = [(LoRA, False, False), (LoRA, True, False), (DoRA, False, True)]  # (class, rslora, DoRA?)


@pytest.mark.parametrize("cls, rslora, dora", VARIANTS, ids=["lora", "rslora", "dora"])
@pytest.mark.parametrize("arch", ARCHS, ids=[a[0] for a in ARCHS])
def test_ftlab_to_peft(arch, cls, rslora, dora, make_model, make_batch, tmp_path):
    name, targets, _, conv1d = arch
    model = make_model(name)
    ids = make_batch(model)
    base_out = output(model, ids)
    method = cls(rank=4, alpha=8, targets=targets, rslora=rslora)
    method.apply(model)
    randomize(model.named_parameters())
    ours = output(model, ids)
    assert_differs(ours, base_out)

    path = save_peft_adapter(tmp_path / "peft", model, method, name)
    assert sorted(p.name for p in path.iterdir()) == [PEFT_CONFIG, PEFT_WEIGHTS]
    cfg = json.loads((path / PEFT_CONFIG).read_text())
    assert (cfg["peft_type"], cfg["r"], cfg["lora_alpha"], cfg["use_rslora"], cfg["use_dora"]) == (
        "LORA",
        4,
        8,
        rslora,
        dora,
    )
    assert cfg["fan_in_fan_out"] is conv1d
    keys = load_file(path / PEFT_WEIGHTS)
    assert len(keys) == (3 if dora else 2) * len(list(lora_layers(model)))
    assert all(k.startswith("base_model.model.") for k in keys)
    assert all(k.endswith((".lora_A.weight", ".lora_B.weight", ".lora_magnitude_vector")) for k in keys)

    theirs_model = peft.PeftModel.from_pretrained(make_model(name), str(path))
    theirs = output(theirs_model, ids)
    torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=1e-5)
    with theirs_model.disable_adapter():
        torch.testing.assert_close(output(theirs_model, ids), base_out, atol=1e-6, rtol=0)


@pytest.mark.parametrize("cls, rslora, dora", VARIANTS, ids=["lora", "rslora", "dora"])
@pytest.mark.parametrize("arch", ARCHS, ids=[a[0] for a in ARCHS])
def test_peft_to_ftlab(arch, cls, rslora, dora, make_model, make_batch, tmp_path):
    name, _, peft_targets, conv1d = arch
    base = make_model(name)
    ids = make_batch(base)
    base_out = output(base, ids)
    config = peft.LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=peft_targets,
        fan_in_fan_out=conv1d,
        use_rslora=rslora,
        use_dora=dora,
    )
    theirs_model = peft.get_peft_model(base, config)
    randomize(theirs_model.named_parameters(), seed=1)
    if dora:  # magnitudes away from the weight norms, so a magnitude loaded wrong shows
        with torch.no_grad():
            for n, p in theirs_model.named_parameters():
                if "lora_magnitude" in n:
                    p.mul_(1.5)
    theirs = output(theirs_model, ids)
    assert_differs(theirs, base_out)
    theirs_model.save_pretrained(str(tmp_path / "peft"))

    fresh = make_model(name)
    method = load_peft_adapter(tmp_path / "peft", fresh)
    assert type(method) is cls and (method.rank, method.alpha, method.rslora) == (4, 8.0, rslora)
    assert is_lora_model(fresh)
    assert len(list(lora_layers(fresh))) == len(peft_targets) * fresh.config.num_hidden_layers
    torch.testing.assert_close(output(fresh, ids), theirs, atol=1e-5, rtol=1e-5)
    # only the loaded adapter trains, as after LoRA.apply
    assert all(("lora_" in n) == p.requires_grad for n, p in fresh.named_parameters())


def test_peft_round_trip_is_lossless(make_model, make_batch, tmp_path):
    """ftlab → PEFT files → ftlab: the same tensors come back."""
    model = make_model("tiny-gpt2")
    method = LoRA(rank=2, alpha=3, targets=["c_attn"])
    method.apply(model)
    randomize(model.named_parameters())
    save_peft_adapter(tmp_path / "p", model, method, "tiny-gpt2")
    fresh = make_model("tiny-gpt2")
    load_peft_adapter(tmp_path / "p", fresh)
    a, b = adapter_state_dict(model, "default"), adapter_state_dict(fresh, "default")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_peft_export_refuses_extra_trainable_modules(make_model, tmp_path):
    model = make_model("tiny-llama")
    method = LoRA(rank=2, targets=["q_proj"], trainable=["norm"])
    method.apply(model)
    with pytest.raises(AdapterError, match="LoRA matrices only"):
        save_peft_adapter(tmp_path / "p", model, method, "tiny-llama")
    assert not (tmp_path / "p").exists()


@pytest.mark.parametrize(
    "change, message",
    [
        ({"peft_type": "IA3"}, "peft_type 'IA3' is not a format ftlab reads"),
        ({"use_dora": True}, "DoRA adapter lacks tensors"),
        ({"init_lora_weights": "pissa"}, "holds a rewritten base"),
        ({"rank_pattern": {"q_proj": 8}}, "rank_pattern is not supported"),
        ({"alpha_pattern": {"q_proj": 8}}, "alpha_pattern is not supported"),
        ({"modules_to_save": ["lm_head"]}, "modules_to_save"),
    ],
)
def test_unsupported_peft_configs_raise(change, message, make_model, tmp_path):
    model = make_model("tiny-llama")
    method = LoRA(rank=2, targets=["q_proj"])
    method.apply(model)
    path = save_peft_adapter(tmp_path / "p", model, method, "tiny-llama")
    cfg = json.loads((path / PEFT_CONFIG).read_text())
    (path / PEFT_CONFIG).write_text(json.dumps({**cfg, **change}))
    fresh = make_model("tiny-llama")
    with pytest.raises(AdapterError, match=message):
        load_peft_adapter(path, fresh)
    assert not is_lora_model(fresh)


# ------------------------------------------------------------------------------- ftlab format: errors
@pytest.mark.parametrize(
    "other, overrides, other_desc",
    [
        ("tiny-llama", {"hidden_size": 64}, "'tiny-llama' (model_type=llama, hidden_size=64"),
        ("tiny-llama", {"num_hidden_layers": 2}, "num_hidden_layers=2"),
        ("tiny-gpt2", {}, "'tiny-gpt2' (model_type=gpt2, hidden_size=64, num_hidden_layers=2"),
    ],
    ids=["hidden-64", "2-layers", "gpt2"],
)
def test_load_onto_different_base_raises(other, overrides, other_desc, make_model, tmp_path):
    model = make_model("tiny-llama")
    method = LoRA(rank=4, targets=["all-linear"])
    method.apply(model)
    path = save_adapter(tmp_path / "a", model, method, fingerprint("tiny-llama", model))

    target = make_model(other, **overrides)
    with pytest.raises(AdapterError) as err:
        load_adapter(path, target, fingerprint(other, target, **overrides))
    msg = str(err.value)
    assert "trained on base 'tiny-llama' (model_type=llama, hidden_size=128, num_hidden_layers=4" in msg
    assert other_desc in msg and str(path) in msg
    assert not is_lora_model(target)  # refused before touching the model


def test_directory_without_adapter_json(make_model, tmp_path):
    model = make_model("tiny-llama")
    (tmp_path / "empty").mkdir()
    with pytest.raises(AdapterError, match="adapter.json is missing"):
        load_adapter(tmp_path / "empty", model, fingerprint("tiny-llama", model))
    with pytest.raises(AdapterError, match="adapter.json is missing"):
        load_adapter(tmp_path / "does-not-exist", model, fingerprint("tiny-llama", model))
    with pytest.raises(AdapterError, match="adapter_config.json is missing"):
        load_peft_adapter(tmp_path / "empty", model)
    assert not is_lora_model(model)


def test_peft_directory_given_to_load_adapter_hints(make_model, tmp_path):
    model = make_model("tiny-llama")
    method = LoRA(rank=2, targets=["q_proj"])
    method.apply(model)
    save_peft_adapter(tmp_path / "p", model, method, "tiny-llama")
    with pytest.raises(AdapterError, match="looks like a PEFT adapter: use load_peft_adapter"):
        load_adapter(tmp_path / "p", make_model("tiny-llama"), fingerprint("tiny-llama", model))


def test_wrong_format_and_foreign_method(make_model, tmp_path):
    model = make_model("tiny-llama")
    method = LoRA(rank=2, targets=["q_proj"])
    method.apply(model)
    fp = fingerprint("tiny-llama", model)
    path = save_adapter(tmp_path / "a", model, method, fp)
    meta = json.loads((path / "adapter.json").read_text())

    (path / "adapter.json").write_text(json.dumps({**meta, "format": "something-else"}))
    with pytest.raises(AdapterError, match="not an ftlab adapter config"):
        load_adapter(path, make_model("tiny-llama"), fp)
    (path / "adapter.json").write_text(json.dumps({**meta, "method": "os.system"}))  # imported, but no method
    with pytest.raises(AdapterError, match="not a method class"):
        load_adapter(path, make_model("tiny-llama"), fp)
    (path / "adapter.json").write_text(json.dumps({**meta, "method": "somewhere.unimported.Method"}))
    with pytest.raises(AdapterError, match="nor in a module this process has imported"):
        load_adapter(path, make_model("tiny-llama"), fp)


def test_a_method_without_a_peft_format_says_so(make_model, tmp_path):
    model = make_model("tiny-llama")
    method = PromptTuning(num_virtual_tokens=2)
    method.apply(model)
    with pytest.raises(AdapterError, match="PromptTuning has no PEFT format"):
        save_peft_adapter(tmp_path / "p", model, method, "tiny-llama")


# ------------------------------------------------------------------------------- atomic writes
def _snapshot(directory):
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


def _fail(*args, **kwargs):
    raise OSError("disk full")


@pytest.mark.parametrize("fails", ["weights", "config"])
@pytest.mark.parametrize("fmt", ["ftlab", "peft"])
def test_failed_save_keeps_existing_adapter(fmt, fails, make_model, make_batch, tmp_path, monkeypatch):
    model = make_model("tiny-llama")
    ids = make_batch(model)
    method = LoRA(rank=4, alpha=8, targets=["q_proj", "v_proj"])
    method.apply(model)
    randomize(model.named_parameters(), seed=0)
    fp = fingerprint("tiny-llama", model)

    def save():
        if fmt == "ftlab":
            return save_adapter(tmp_path / "adapter", model, method, fp)
        return save_peft_adapter(tmp_path / "adapter", model, method, "tiny-llama")

    path = save()
    good, good_out = _snapshot(path), output(model, ids)

    randomize(model.named_parameters(), seed=1)  # "train" on, then fail to save
    with monkeypatch.context() as m:
        if fails == "weights":
            m.setattr(adapter_io, "save_file", _fail)
        else:
            m.setattr(adapter_io.json, "dumps", _fail)
        with pytest.raises(OSError, match="disk full"):
            save()

    assert _snapshot(path) == good
    assert [p.name for p in tmp_path.iterdir()] == ["adapter"]  # no temporary directory left behind
    fresh = make_model("tiny-llama")
    if fmt == "ftlab":
        load_adapter(path, fresh, fp)
    else:
        load_peft_adapter(path, fresh)
    torch.testing.assert_close(output(fresh, ids), good_out, atol=1e-6, rtol=0)


def test_save_overwrites_cleanly(make_model, tmp_path):
    model = make_model("tiny-llama")
    method = LoRA(rank=2, targets=["q_proj"])
    method.apply(model)
    fp = fingerprint("tiny-llama", model)
    save_adapter(tmp_path / "nested" / "adapter", model, method, fp)  # parents are created
    first = _snapshot(tmp_path / "nested" / "adapter")
    randomize(model.named_parameters())
    save_adapter(tmp_path / "nested" / "adapter", model, method, fp)
    assert _snapshot(tmp_path / "nested" / "adapter") != first
    assert [p.name for p in (tmp_path / "nested").iterdir()] == ["adapter"]


def test_adapter_json_contents(make_model, tmp_path):
    model = make_model("tiny-llama")
    method = LoRA(rank=2, alpha=4, targets=["q_proj"], layers=[0])
    method.apply(model)
    fp = fingerprint("tiny-llama", model)
    path = save_adapter(tmp_path / "a", model, method, fp, extra={"step": 7})
    meta = json.loads((path / "adapter.json").read_text())
    assert meta["format"] == "ftlab-adapter" and meta["method"] == "ftlab.peft.lora.LoRA"
    assert meta["init_args"]["rank"] == 2 and meta["init_args"]["layers"] == [0]
    assert meta["base"] == fp and meta["extra"] == {"step": 7}
    assert set(load_file(path / "adapter.safetensors")) == {
        "model.layers.0.self_attn.q_proj.lora_A",
        "model.layers.0.self_attn.q_proj.lora_B",
    }
    assert all(isinstance(m, LoRALinear) for m in lora_layers(model))
