"""Adapter files: ftlab's own format, and PEFT's LoRA format both ways.

ftlab format (a directory):
    adapter.safetensors   the method's tensors (``method.state_dict(model)``)
    adapter.json          {"format": "ftlab-adapter", "method": "<import path>", "init_args": {...},
                           "base": <backbone fingerprint>, "extra": {...}}

PEFT format: ``adapter_config.json`` + ``adapter_model.safetensors`` with keys
``base_model.model.<module>.lora_{A,B}.weight`` — what ``peft.PeftModel.from_pretrained`` reads.

Writes go to a temporary directory first and replace the target only when complete, so a
failure never leaves a half-written adapter over a good one.
"""

from __future__ import annotations

import importlib
import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ftlab.peft._method import Method
from ftlab.peft.lora import LoRA, LoRALinear, _is_conv1d, adapter_state_dict, load_adapter_state_dict

WEIGHTS, CONFIG = "adapter.safetensors", "adapter.json"
PEFT_WEIGHTS, PEFT_CONFIG = "adapter_model.safetensors", "adapter_config.json"
_PEFT_PREFIX = "base_model.model."


class AdapterError(ValueError):
    """An adapter file that cannot be loaded onto this model."""


@contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary sibling directory that replaces ``path`` only if the block succeeds, so a
    failure never leaves a half-written folder over a good one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        yield tmp
        if path.exists():
            old = path.with_name(f".{path.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            path.rename(old)
            tmp.rename(path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _contiguous(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Plain, contiguous CPU tensors; FSDP2 shards (DTensor) are gathered, a collective."""
    out = {}
    for k, v in state.items():
        v = v.detach()
        if hasattr(v, "full_tensor"):
            v = v.full_tensor()
        out[k] = v.contiguous().cpu()
    return out


# ------------------------------------------------------------------------------- ftlab format
def save_adapter(
    path: str | os.PathLike, model: nn.Module, method: Method, base: dict[str, Any],
    extra_tensors: dict[str, torch.Tensor] | None = None, extra: dict[str, Any] | None = None,
    write: bool = True,
) -> Path:
    """Write the method's tensors (plus ``extra_tensors``, e.g. a head) and its config to ``path``.

    ``write=False`` only gathers the tensors: what the non-zero ranks do under FSDP.
    """
    state = dict(method.state_dict(model))
    for key, value in (extra_tensors or {}).items():
        state[f"extra.{key}"] = value
    meta = {
        "format": "ftlab-adapter",
        "method": f"{type(method).__module__}.{type(method).__qualname__}",
        "init_args": method.hparams(),
        "base": base,
        "extra": extra or {},
    }
    state = _contiguous(state)
    bad = [k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise AdapterError(f"refusing to write {path}: tensors hold NaN/inf ({', '.join(bad[:3])})")
    if not write:
        return Path(path)
    with atomic_dir(path) as tmp:
        save_file(state, tmp / WEIGHTS)
        (tmp / CONFIG).write_text(json.dumps(meta, indent=2))
    return Path(path)


def read_adapter(path: str | os.PathLike) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(config, tensors) of an ftlab adapter directory, with clear errors for missing files."""
    path = Path(path)
    if not (path / CONFIG).exists():
        hint = " (it looks like a PEFT adapter: use load_peft_adapter)" if (path / PEFT_CONFIG).exists() else ""
        raise AdapterError(f"{path} is not an ftlab adapter: {CONFIG} is missing{hint}")
    meta = json.loads((path / CONFIG).read_text())
    if meta.get("format") != "ftlab-adapter":
        raise AdapterError(f"{path / CONFIG} is not an ftlab adapter config")
    return meta, load_file(path / WEIGHTS)


def build_method(meta: dict[str, Any]) -> Method:
    """Instantiate the method an adapter config names (ftlab.peft classes only)."""
    module_name, _, cls_name = meta["method"].rpartition(".")
    if not module_name.startswith("ftlab."):
        raise AdapterError(f"adapter names method {meta['method']!r}, which is not an ftlab method")
    cls = getattr(importlib.import_module(module_name), cls_name)
    return cls(**meta["init_args"])


def check_base(meta: dict[str, Any], base: dict[str, Any], where: str | os.PathLike = "adapter") -> None:
    saved = meta.get("base", {})
    if saved.get("digest") != base.get("digest"):
        raise AdapterError(
            f"{where} was trained on base {saved.get('name_or_path')!r} "
            f"({_shape(saved)}) but this model is {base.get('name_or_path')!r} ({_shape(base)})"
        )


def _shape(fp: dict[str, Any]) -> str:
    return ", ".join(f"{k}={fp.get(k)}" for k in ("model_type", "hidden_size", "num_hidden_layers", "vocab_size"))


def load_adapter(path: str | os.PathLike, model: nn.Module, base: dict[str, Any]) -> tuple[Method, dict[str, torch.Tensor]]:
    """Apply the saved method to ``model`` (a fresh base) and load its tensors.

    Returns the method and the ``extra`` tensors (e.g. a classification head) for the caller.
    """
    meta, state = read_adapter(path)
    check_base(meta, base, path)
    method = build_method(meta)
    method.apply(model)
    extra = {k[len("extra."):]: v for k, v in state.items() if k.startswith("extra.")}
    load_method_state(model, method, {k: v for k, v in state.items() if not k.startswith("extra.")})
    return method, extra


def load_method_state(model: nn.Module, method: Method, state: dict[str, torch.Tensor]) -> None:
    """Inverse of ``method.state_dict``: LoRA tensors by adapter, the rest by parameter name."""
    if isinstance(method, LoRA):
        lora = {k: v for k, v in state.items() if k.endswith((".lora_A", ".lora_B"))}
        load_adapter_state_dict(model, lora, method.adapter_name)
        state = {k: v for k, v in state.items() if k not in lora}
    if state:
        result = model.load_state_dict(state, strict=False)
        if result.unexpected_keys:
            raise AdapterError(f"adapter tensors with no place in this model: {result.unexpected_keys[:5]}")


# ------------------------------------------------------------------------------- PEFT format
def save_peft_adapter(
    path: str | os.PathLike, model: nn.Module, method: LoRA, base_model_name_or_path: str,
    task_type: str = "CAUSAL_LM",
) -> Path:
    """Write ``method``'s adapter in PEFT's LoRA format."""
    if method.trainable:
        raise AdapterError("PEFT export supports LoRA matrices only; this LoRA also trains " f"{method.trainable}")
    state, names, conv1d = {}, [], False
    for key, value in adapter_state_dict(model, method.adapter_name).items():
        module_name, _, part = key.rpartition(".")
        state[f"{_PEFT_PREFIX}{module_name}.{part}.weight"] = value
        if part == "lora_A":
            names.append(module_name)
            conv1d |= _is_conv1d(model.get_submodule(module_name).base)
    config = {
        "peft_type": "LORA", "task_type": task_type, "base_model_name_or_path": base_model_name_or_path,
        "r": method.rank, "lora_alpha": method.alpha, "lora_dropout": method.dropout,
        "use_rslora": method.rslora, "target_modules": sorted(names), "fan_in_fan_out": conv1d,
        "bias": "none", "modules_to_save": None, "init_lora_weights": True, "inference_mode": True,
    }
    with atomic_dir(path) as tmp:
        save_file(_contiguous(state), tmp / PEFT_WEIGHTS)
        (tmp / PEFT_CONFIG).write_text(json.dumps(config, indent=2))
    return Path(path)


def load_peft_adapter(path: str | os.PathLike, model: nn.Module, adapter_name: str = "default") -> LoRA:
    """Read a PEFT LoRA adapter onto ``model`` (a fresh base); returns the equivalent ``LoRA``."""
    path = Path(path)
    if not (path / PEFT_CONFIG).exists():
        raise AdapterError(f"{path} is not a PEFT adapter: {PEFT_CONFIG} is missing")
    cfg = json.loads((path / PEFT_CONFIG).read_text())
    if cfg.get("peft_type") != "LORA":
        raise AdapterError(f"{path / PEFT_CONFIG}: peft_type {cfg.get('peft_type')!r} is not LORA")
    for key in ("rank_pattern", "alpha_pattern"):
        if cfg.get(key):
            raise AdapterError(f"{path / PEFT_CONFIG}: per-module {key} is not supported")
    if cfg.get("use_dora"):
        raise AdapterError(f"{path / PEFT_CONFIG}: DoRA adapters are not supported")
    if cfg.get("modules_to_save"):
        raise AdapterError(f"{path / PEFT_CONFIG}: modules_to_save is not supported")
    raw = load_file(path / PEFT_WEIGHTS)
    state = {}
    for key, value in raw.items():
        if not (key.startswith(_PEFT_PREFIX) and key.endswith((".lora_A.weight", ".lora_B.weight"))):
            raise AdapterError(f"{path / PEFT_WEIGHTS}: unexpected tensor {key}")
        state[key[len(_PEFT_PREFIX):-len(".weight")]] = value
    modules = sorted({k.rpartition(".")[0] for k in state})
    method = LoRA(
        rank=int(cfg["r"]), alpha=float(cfg["lora_alpha"]), dropout=float(cfg.get("lora_dropout") or 0.0),
        targets=modules, rslora=bool(cfg.get("use_rslora")), adapter_name=adapter_name,
    )
    method.apply(model)
    load_adapter_state_dict(model, state, adapter_name)
    return method


def is_lora_model(model: nn.Module) -> bool:
    return any(isinstance(m, LoRALinear) for m in model.modules())
