"""Adapter files: ftlab's own format for every method, and PEFT's format both ways.

ftlab format (a directory), written and read through the method protocol:
    adapter.safetensors   the method's tensors (``method.state_dict(model)``, read by ``load_state_dict``)
    adapter.json          {"format": "ftlab-adapter", "method": "<import path>",
                           "init_args": method.hparams(), "base": <backbone fingerprint>, "extra": {...}}

PEFT format: ``adapter_config.json`` + ``adapter_model.safetensors`` (keys such as
``base_model.model.<module>.lora_A.weight``) — what ``peft.PeftModel.from_pretrained`` reads. The
methods that have one (``ftlab.peft.method.PEFT_FORMATS``: LoRA, DoRA) convert themselves.

Writes go to a temporary directory first and replace the target only when complete, so a
failure never leaves a half-written adapter over a good one.
"""

from __future__ import annotations

import importlib
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ftlab.peft.method import PEFT_FORMATS, Method, MethodError

WEIGHTS, CONFIG = "adapter.safetensors", "adapter.json"
PEFT_WEIGHTS, PEFT_CONFIG = "adapter_model.safetensors", "adapter_config.json"


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
    path: str | os.PathLike,
    model: nn.Module,
    method: Method,
    base: dict[str, Any],
    extra_tensors: dict[str, torch.Tensor] | None = None,
    extra: dict[str, Any] | None = None,
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
        hint = (
            " (it looks like a PEFT adapter: use load_peft_adapter)" if (path / PEFT_CONFIG).exists() else ""
        )
        raise AdapterError(f"{path} is not an ftlab adapter: {CONFIG} is missing{hint}")
    meta = json.loads((path / CONFIG).read_text())
    if meta.get("format") != "ftlab-adapter":
        raise AdapterError(f"{path / CONFIG} is not an ftlab adapter config")
    return meta, load_file(path / WEIGHTS)


def build_method(meta: dict[str, Any]) -> Method:
    """Instantiate the method an adapter config names, from its import path and ``init_args``.

    Only code that is already trusted is run: a class under ``ftlab.`` or in a module this process
    has already imported (a method of your own, imported by your config or script). An adapter file
    never makes ftlab import a module it names.
    """
    module_name, _, cls_name = meta["method"].rpartition(".")
    if not module_name.startswith("ftlab.") and module_name not in sys.modules:
        raise AdapterError(
            f"adapter names method {meta['method']!r}, which is neither an ftlab method nor in a "
            "module this process has imported; import it first"
        )
    cls = getattr(importlib.import_module(module_name), cls_name, None)
    if not (isinstance(cls, type) and issubclass(cls, Method)):
        raise AdapterError(f"adapter names method {meta['method']!r}, which is not a method class")
    return cls(**meta["init_args"])


def check_base(meta: dict[str, Any], base: dict[str, Any], where: str | os.PathLike = "adapter") -> None:
    saved = meta.get("base", {})
    if saved.get("digest") != base.get("digest"):
        raise AdapterError(
            f"{where} was trained on base {saved.get('name_or_path')!r} "
            f"({_shape(saved)}) but this model is {base.get('name_or_path')!r} ({_shape(base)})"
        )


def _shape(fp: dict[str, Any]) -> str:
    return ", ".join(
        f"{k}={fp.get(k)}" for k in ("model_type", "hidden_size", "num_hidden_layers", "vocab_size")
    )


def load_adapter(
    path: str | os.PathLike, model: nn.Module, base: dict[str, Any]
) -> tuple[Method, dict[str, torch.Tensor]]:
    """Apply the saved method to ``model`` (a fresh base) and load its tensors.

    Returns the method and the ``extra`` tensors (e.g. a classification head) for the caller.
    """
    meta, state = read_adapter(path)
    check_base(meta, base, path)
    method = build_method(meta)
    method.apply(model)
    extra = {k[len("extra.") :]: v for k, v in state.items() if k.startswith("extra.")}
    try:
        method.load_state_dict(model, {k: v for k, v in state.items() if not k.startswith("extra.")})
    except (MethodError, KeyError, ValueError) as err:
        raise AdapterError(f"{path}: {err.args[0] if err.args else err}") from None
    return method, extra


# ------------------------------------------------------------------------------- PEFT format
def save_peft_adapter(
    path: str | os.PathLike,
    model: nn.Module,
    method: Method,
    base_model_name_or_path: str,
    task_type: str = "CAUSAL_LM",
) -> Path:
    """Write ``method``'s adapter in PEFT's format (methods that implement ``to_peft``: LoRA, DoRA)."""
    if not hasattr(method, "to_peft"):
        formats = ", ".join(c.__name__ for c in PEFT_FORMATS)
        raise AdapterError(f"{type(method).__name__} has no PEFT format (methods with one: {formats})")
    try:
        config, tensors = method.to_peft(model)
    except MethodError as err:
        raise AdapterError(str(err)) from None
    config = {
        **config,
        "task_type": task_type,
        "base_model_name_or_path": base_model_name_or_path,
        "inference_mode": True,
    }
    with atomic_dir(path) as tmp:
        save_file(_contiguous(tensors), tmp / PEFT_WEIGHTS)
        (tmp / PEFT_CONFIG).write_text(json.dumps(config, indent=2))
    return Path(path)


def load_peft_adapter(path: str | os.PathLike, model: nn.Module, adapter_name: str = "default") -> Method:
    """Read a PEFT adapter onto ``model`` (a fresh base) with the method that reads its config."""
    path = Path(path)
    if not (path / PEFT_CONFIG).exists():
        raise AdapterError(f"{path} is not a PEFT adapter: {PEFT_CONFIG} is missing")
    config = json.loads((path / PEFT_CONFIG).read_text())
    cls = next((c for c in reversed(PEFT_FORMATS) if c.reads_peft(config)), None)
    if cls is None:
        kind = config.get("peft_type") + (" with use_dora" if config.get("use_dora") else "")
        raise AdapterError(
            f"{path / PEFT_CONFIG}: peft_type {kind!r} is not a format ftlab reads "
            f"({', '.join(c.__name__ for c in PEFT_FORMATS)} do)"
        )
    try:
        return cls.from_peft(config, load_file(path / PEFT_WEIGHTS), model, adapter_name)
    except (MethodError, KeyError) as err:
        raise AdapterError(f"{path}: {err.args[0] if err.args else err}") from None
