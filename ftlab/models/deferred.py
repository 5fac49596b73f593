"""Low-memory loading for FSDP2: build the model empty, shard it, then read each rank's rows.

A plain load builds the whole model in every rank's host memory before FSDP2 shards it: N ranks
on one node hold N full copies. Instead (``Objective.configure_model`` under a device mesh):

1. ``build_empty`` builds the model from its config on the meta device (no memory, no init) and
   gives every parameter the checkpoint holds a *placeholder*: a stride-0 view of one NaN, full
   shape, no memory. Buffers (rotary frequencies...) and parameters the checkpoint lacks (a new
   classification head) are created and initialised as ``from_pretrained`` initialises them.
2. The method is applied as usual (LoRA adapters are real and start as they would), then
   ``Placeholders.check`` makes sure it did not read or replace a base weight: a placeholder
   removed or rewritten (QLoRA quantizes the base; PiSSA rewrites it), an error writing into one,
   or a NaN in any other tensor (DoRA's magnitudes, a prompt initialised from the vocabulary)
   means the method needs the real weights, and the objective loads plainly instead.
3. The placeholders become meta parameters and FSDP2 shards the model: each is then a rank-local
   meta shard of ⌈rows / N⌉ rows (FSDP2 refuses stride-0 tensors, and meta is its own route).
4. ``Placeholders.fill`` allocates the shards (``to_empty``, keeping every real tensor's value) and
   reads each one's rows from the safetensors files (``get_slice``: only those bytes), casting to
   the model's dtype on the way, one tensor at a time.

Host memory per rank is then about the model's size / N plus one tensor's slice, and nothing is
ever held at full size, so the result equals a plain load (tested on 2 gloo processes).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

log = logging.getLogger("ftlab")


def safetensors_index(folder: str | Path) -> dict[str, Path] | None:
    """Tensor name -> file of a local checkpoint folder in safetensors form (sharded or not), else None."""
    folder = Path(folder)
    index = folder / "model.safetensors.index.json"
    if index.exists():
        files = {k: folder / v for k, v in json.loads(index.read_text())["weight_map"].items()}
        return files if all(f.exists() for f in set(files.values())) else None  # a partly cached snapshot
    single = folder / "model.safetensors"
    if not single.exists():
        return None
    from safetensors import safe_open

    with safe_open(single, "pt") as f:
        return dict.fromkeys(f.keys(), single)


@dataclass
class Placeholders:
    """The parameters of an empty-built model that the checkpoint fills, and where each one is."""

    #: id(placeholder) -> (placeholder, file, key in the checkpoint)
    sources: dict[int, tuple[nn.Parameter, Path, str]] = field(default_factory=dict)
    bound: list[tuple[nn.Module, str, Path, str]] = field(default_factory=list)

    def check(self, model: nn.Module) -> str | None:
        """Why the model (after the method was applied) cannot be filled shard by shard, or None."""
        present = {id(p) for p in model.parameters()}
        for param, _, key in self.sources.values():
            if id(param) not in present:
                return f"the method replaced {key} using its value"
            if param.stride() != (0,) * param.dim():
                return f"the method rewrote {key}"
        for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
            if id(tensor) not in self.sources and tensor.is_floating_point() and torch.isnan(tensor).any():
                return f"the method computed {name} from the base weights"
        return None

    def to_meta(self, model: nn.Module) -> None:
        """Placeholders -> meta parameters, which FSDP2 shards (it refuses stride-0 tensors); each is
        remembered by (module, attribute), since sharding swaps parameter objects."""
        meta: dict[int, nn.Parameter] = {}
        for module in model.modules():
            for name, p in module._parameters.items():
                if p is not None and id(p) in self.sources:
                    if id(p) not in meta:  # tied weights stay one parameter
                        meta[id(p)] = nn.Parameter(
                            torch.empty(p.shape, dtype=p.dtype, device="meta"), requires_grad=p.requires_grad
                        )
                    module._parameters[name] = meta[id(p)]
                    self.bound.append((module, name, *self.sources[id(p)][1:]))

    @torch.no_grad()
    def fill(self, root: nn.Module, device: torch.device) -> int:
        """Allocate ``root``'s meta parameters on ``device`` (their FSDP2 shards only) and read each
        one's rows on this rank from the checkpoint; everything else keeps its value. Returns the
        number of tensors read."""
        from safetensors import safe_open
        from torch.distributed.tensor import DTensor, Shard

        def local(t):
            return t.to_local() if isinstance(t, DTensor) else t

        # to_empty is FSDP2's way to materialise sharded meta parameters; it re-allocates the rest too
        kept = [
            (m, kind, name, local(t).clone())
            for m in root.modules()
            for kind in ("_parameters", "_buffers")
            for name, t in getattr(m, kind).items()
            if t is not None and not t.is_meta
        ]
        shared: dict[int, list[tuple[nn.Module, str]]] = {}  # tied weights, which to_empty may untie
        for module in root.modules():
            for name, p in module._parameters.items():
                if p is not None:
                    shared.setdefault(id(p), []).append((module, name))
        root.to_empty(device=device)
        for (first, first_name), *others in (group for group in shared.values() if len(group) > 1):
            for module, name in others:  # FSDP2 keeps them tied; plain modules get one tensor each
                module._parameters[name] = first._parameters[first_name]
        for module, kind, name, value in kept:
            local(getattr(module, kind)[name]).copy_(value)
        done: set[int] = set()
        for module, name, file, key in self.bound:
            param = module._parameters[name]
            if id(param) in done:  # tied weights: one tensor under two names
                continue
            done.add(id(param))
            start = 0
            if isinstance(param, DTensor):
                if tuple(param.placements) != (Shard(0),):
                    raise RuntimeError(f"cannot fill {key}: sharded as {param.placements}, not by rows")
                rows = -(-param.shape[0] // param.device_mesh.size())  # torch.chunk's split: ⌈n / N⌉ each
                start = min(param.shape[0], param.device_mesh.get_local_rank() * rows)
            target = local(param)
            with safe_open(file, "pt") as f:  # opened per tensor: only this slice's pages are mapped in
                value = (
                    f.get_slice(key)[start : start + target.shape[0]] if target.dim() else f.get_tensor(key)
                )
            if tuple(value.shape) != tuple(target.shape):
                raise RuntimeError(
                    f"{file}: {key} has shape {tuple(value.shape)} here, the model expects "
                    f"{tuple(target.shape)}"
                )
            target.copy_(value)
        return len(done)


def build_empty(auto, cfg, files: dict[str, Path], **from_config) -> tuple[nn.Module, Placeholders]:
    """``auto.from_config(cfg)`` with placeholders for every parameter in ``files`` (see the module doc)."""
    with torch.device("meta"):
        model = auto.from_config(cfg, **from_config)
    prefix = model.base_model_prefix
    placeholders, swapped = Placeholders(), {}
    for module in model.modules():
        for name, buf in module._buffers.items():
            if buf is not None and buf.is_meta:
                module._buffers[name] = torch.empty_like(buf, device="cpu")
    for module_name, module in model.named_modules():
        for name, param in list(module._parameters.items()):
            if param is None:
                continue
            if id(param) not in swapped:  # tied parameters share one replacement
                key = _checkpoint_key(f"{module_name}.{name}" if module_name else name, files, prefix)
                if key is None:
                    new = nn.Parameter(
                        torch.empty_like(param, device="cpu"), requires_grad=param.requires_grad
                    )
                else:
                    hollow = torch.full((), float("nan"), dtype=param.dtype).expand(param.shape)
                    new = nn.Parameter(hollow, requires_grad=param.requires_grad)
                    new._is_hf_initialized = True  # transformers' init functions leave it alone
                    placeholders.sources[id(new)] = (new, files[key], key)
                swapped[id(param)] = new
            module._parameters[name] = swapped[id(param)]
    model.initialize_weights()  # buffers and the parameters the checkpoint lacks, as from_pretrained does
    for name, buf in model.named_buffers():  # a persistent buffer the checkpoint holds: its value
        if (key := _checkpoint_key(name, files, prefix)) is not None:
            from safetensors import safe_open

            with safe_open(files[key], "pt") as f:
                buf.copy_(f.get_tensor(key))
    return model, placeholders


def _checkpoint_key(name: str, files: dict[str, Path], prefix: str) -> str | None:
    """The checkpoint's name for the model's tensor ``name``: itself, or with the base model's prefix
    added or removed (a base model loaded from a task model's checkpoint, or the other way round)."""
    for key in (name, f"{prefix}.{name}", name.removeprefix(f"{prefix}.")):
        if key in files:
            return key
    return None
