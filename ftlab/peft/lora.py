"""LoRA: Low-Rank Adaptation of Large Language Models (Hu et al., 2021, arXiv:2106.09685).

A frozen linear map ``W0`` (out × in) gets a trainable low-rank update:

    h = W0 x + s · B A x,     A: (r × in), B: (out × r), s = alpha / r   (rsLoRA: alpha / sqrt(r))

``B`` starts at zero, so the adapted model starts equal to the base. The update is computed as
``(x Aᵀ) Bᵀ`` through the rank-r bottleneck; ``B A`` is only materialised to merge. Adapters live
in the base weight's dtype unless ``adapter_dtype`` says otherwise (no silent fp32 upcast).

Several named adapters can sit on one model; ``set_adapter`` picks the active one at runtime and
``disable_adapters`` gives the base model back.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from ftlab.peft._method import freeze
from ftlab.peft._targets import LayerSelection, TargetError, find_targets, set_submodule


def _is_conv1d(module: nn.Module) -> bool:
    # transformers' GPT-2 Conv1D stores its weight as (in, out).
    return type(module).__name__ == "Conv1D"


def _base_features(base: nn.Module) -> tuple[int, int]:
    if _is_conv1d(base):
        return base.weight.shape[0], base.weight.shape[1]
    return base.in_features, base.out_features


class LoRALinear(nn.Module):
    """A frozen linear layer (``nn.Linear``, GPT-2 ``Conv1D`` or bitsandbytes ``Linear4bit``) plus
    named low-rank adapters, of which at most one is active."""

    def __init__(self, base: nn.Module):
        super().__init__()
        self.base = base
        self.in_features, self.out_features = _base_features(base)
        self.lora_A = nn.ParameterDict()  # name -> (r, in)
        self.lora_B = nn.ParameterDict()  # name -> (out, r)
        self.scaling: dict[str, float] = {}
        self.dropout = nn.ModuleDict()
        self.active: str | None = None
        self.merged: str | None = None
        self.train(base.training)  # injected into an eval-mode model, stay in eval mode (no dropout)

    def add_adapter(
        self, name: str, rank: int, alpha: float, dropout: float = 0.0, rslora: bool = False,
        dtype: torch.dtype | None = None,
    ) -> None:
        if name in self.lora_A:
            raise ValueError(f"adapter {name!r} already exists")
        dtype = dtype or _compute_dtype(self.base)
        device = next(self.base.parameters()).device
        a = torch.empty(rank, self.in_features, dtype=dtype, device=device)
        nn.init.kaiming_uniform_(a, a=math.sqrt(5))  # as nn.Linear initialises its weight
        self.lora_A[name] = nn.Parameter(a)
        self.lora_B[name] = nn.Parameter(torch.zeros(self.out_features, rank, dtype=dtype, device=device))
        self.scaling[name] = alpha / (math.sqrt(rank) if rslora else rank)
        self.dropout[name] = (nn.Dropout(dropout) if dropout > 0 else nn.Identity()).train(self.training)
        if self.active is None:
            self.active = name

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)  # (..., out)
        name = self.active
        if name is None or name == self.merged:
            return y
        a, b = self.lora_A[name], self.lora_B[name]
        h = F.linear(self.dropout[name](x).to(a.dtype), a)  # (..., r)
        # Scale the r-wide tensor, not the out-wide one: same result, fewer multiplies.
        return y + F.linear(h * self.scaling[name], b).to(y.dtype)

    def delta_weight(self, name: str) -> torch.Tensor:
        """``s · B A`` in the base weight's layout: (out, in), or (in, out) for Conv1D."""
        delta = (self.lora_B[name] @ self.lora_A[name]) * self.scaling[name]
        return delta.T if _is_conv1d(self.base) else delta

    def merge(self, name: str | None = None) -> None:
        name = name or self.active
        if self.merged is not None:
            raise RuntimeError(f"adapter {self.merged!r} is already merged; unmerge it first")
        if _is_4bit(self.base):  # adding to packed 4-bit codes would silently corrupt them
            raise RuntimeError("cannot merge into a 4-bit base in place: use ftlab.peft.qlora.merge")
        w = self.base.weight
        with torch.no_grad():
            w += self.delta_weight(name).to(w.dtype)
        self.merged = name

    def unmerge(self) -> None:
        if self.merged is None:
            return
        w = self.base.weight
        with torch.no_grad():
            w -= self.delta_weight(self.merged).to(w.dtype)
        self.merged = None

    def extra_repr(self) -> str:
        ranks = {n: p.shape[0] for n, p in self.lora_A.items()}
        return f"in={self.in_features}, out={self.out_features}, adapters={ranks}, active={self.active!r}"


def _compute_dtype(base: nn.Module) -> torch.dtype:
    if _is_4bit(base):  # packed codes may be stored as a float dtype (quant_storage): not the compute dtype
        return getattr(base, "compute_dtype", None) or torch.float32
    w = base.weight
    if w.dtype.is_floating_point:
        return w.dtype
    return getattr(base, "compute_dtype", None) or torch.float32  # other quantized weights


class LoRA:
    """LoRA on chosen linear layers; everything else frozen.

    Args:
        rank: Rank r of the update ``B A`` (> 0).
        alpha: Scaling numerator: the update is multiplied by ``alpha / rank``.
        dropout: Dropout on the adapter's input (0 disables the op entirely).
        targets: Module-name patterns to adapt (``q_proj``, ``attn.*``, ``re:...``, ``all-linear``).
        layers: Which transformer blocks: all (null), a list of indices, ``"a-b"``, ``"top:k"``,
            ``"bottom:k"``, ``"top_half"``, ``"bottom_half"``.
        rslora: Rank-stabilised scaling ``alpha / sqrt(rank)`` (Kalajdzievski, 2023).
        adapter_name: Name of the adapter this method creates (several can live on one model).
        adapter_dtype: Adapter dtype; null uses the base layer's dtype (the compute dtype).
        trainable: Extra module-name patterns to train fully (e.g. ``lm_head``), like PEFT's
            ``modules_to_save``.
    """

    def __init__(
        self,
        rank: int = 8,
        alpha: float = 16.0,
        dropout: float = 0.0,
        targets: list[str] = ["q_proj", "v_proj"],  # noqa: B006 - jsonargparse needs a literal default
        layers: list[int] | str | None = None,
        rslora: bool = False,
        adapter_name: str = "default",
        adapter_dtype: Literal["float32", "bfloat16", "float16"] | None = None,
        trainable: list[str] | None = None,
    ):
        if rank <= 0:
            raise ValueError(f"LoRA rank must be > 0, got {rank}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"LoRA dropout must be in [0, 1), got {dropout}")
        self.rank, self.alpha, self.dropout, self.rslora = rank, alpha, dropout, rslora
        self.targets, self.layers = list(targets), layers
        self.adapter_name, self.adapter_dtype = adapter_name, adapter_dtype
        self.trainable = list(trainable or [])

    def apply(self, model: nn.Module) -> None:
        freeze(model)
        inject(
            model, self.targets, self.layers, self.adapter_name, self.rank, self.alpha, self.dropout,
            self.rslora, getattr(torch, self.adapter_dtype) if self.adapter_dtype else None,
        )
        set_adapter(model, self.adapter_name)
        for pattern in self.trainable:
            for _, module in find_targets(model, pattern, kinds=(nn.Module,)):
                module.requires_grad_(True)

    def state_dict(self, model: nn.Module) -> dict[str, torch.Tensor]:
        return adapter_state_dict(model, self.adapter_name) | {
            n: p.detach() for n, p in model.named_parameters()
            if p.requires_grad and "lora_" not in n
        }

    def hparams(self) -> dict[str, Any]:
        return dict(
            rank=self.rank, alpha=self.alpha, dropout=self.dropout, targets=self.targets, layers=self.layers,
            rslora=self.rslora, adapter_name=self.adapter_name, adapter_dtype=self.adapter_dtype,
            trainable=self.trainable,
        )

    def num_parameters(self, model: nn.Module) -> int:
        """The formula ``r · (in + out)`` summed over adapted layers of ``model``."""
        layers = [m for m in lora_layers(model) if self.adapter_name in m.lora_A]
        return sum(self.rank * (m.in_features + m.out_features) for m in layers)


# ---------------------------------------------------------------------------------- functions
def inject(
    model: nn.Module, targets: list[str], layers: LayerSelection, name: str, rank: int, alpha: float,
    dropout: float = 0.0, rslora: bool = False, dtype: torch.dtype | None = None,
) -> list[str]:
    """Add adapter ``name`` to every target (wrapping plain layers in ``LoRALinear``); returns the names.

    Adapter parameters train; nothing else is touched, so call ``freeze`` first when needed.
    """
    kinds = _linear_kinds()
    chosen = [(n, m) for n, m in find_targets(model, targets, layers, kinds + (LoRALinear,))
              if not n.endswith(".base")]
    for module_name, module in chosen:
        if not isinstance(module, LoRALinear):
            if isinstance(module, nn.Linear) and type(module) is not nn.Linear and not _is_4bit(module):
                raise TargetError(f"cannot wrap {module_name} of type {type(module).__name__}")
            module = LoRALinear(module)
            set_submodule(model, module_name, module)
        module.add_adapter(name, rank, alpha, dropout, rslora, dtype)
    return [n for n, _ in chosen]


def _is_4bit(module: nn.Module) -> bool:
    return type(module).__name__ in ("Linear4bit", "LinearNF4", "LinearFP4")


def _linear_kinds() -> tuple[type, ...]:
    kinds: list[type] = [nn.Linear]
    try:
        from transformers.pytorch_utils import Conv1D

        kinds.append(Conv1D)
    except ImportError:  # pragma: no cover
        pass
    return tuple(kinds)


def lora_layers(model: nn.Module) -> Iterator[LoRALinear]:
    return (m for m in model.modules() if isinstance(m, LoRALinear))


def adapter_names(model: nn.Module) -> list[str]:
    names: dict[str, None] = {}
    for m in lora_layers(model):
        names.update(dict.fromkeys(m.lora_A))
    return list(names)


def set_adapter(model: nn.Module, name: str) -> None:
    """Make ``name`` the active adapter everywhere: only its parameters train."""
    if name not in adapter_names(model):
        raise KeyError(f"no adapter named {name!r}; the model has {adapter_names(model)}")
    for m in lora_layers(model):
        if m.merged is not None and m.merged != name:
            raise RuntimeError(f"adapter {m.merged!r} is merged; unmerge before switching")
        m.active = name if name in m.lora_A else None
        for n in m.lora_A:
            m.lora_A[n].requires_grad_(n == name)
            m.lora_B[n].requires_grad_(n == name)


@contextmanager
def disable_adapters(model: nn.Module) -> Iterator[None]:
    """Run the base model: every adapter off inside the block (merged ones are unmerged first)."""
    layers = list(lora_layers(model))
    saved = [(m, m.active, m.merged) for m in layers]
    for m in layers:
        m.unmerge()
        m.active = None
    try:
        yield
    finally:
        for m, active, merged in saved:
            m.active = active
            if merged is not None:
                m.merge(merged)


def merge(model: nn.Module, name: str | None = None) -> None:
    """Fold the active (or named) adapter into the base weights: no extra cost at inference."""
    for m in lora_layers(model):
        # A layer without the adapter (active is None there after set_adapter) has nothing to fold in.
        target = name or m.active
        if target is not None and target in m.lora_A:
            m.merge(target)


def unmerge(model: nn.Module) -> None:
    for m in lora_layers(model):
        m.unmerge()


def unwrap(model: nn.Module) -> None:
    """Replace every ``LoRALinear`` by its base layer (merge first to keep the adapter's effect)."""
    for name, m in list(model.named_modules()):
        if isinstance(m, LoRALinear):
            set_submodule(model, name, m.base)


def adapter_state_dict(model: nn.Module, name: str) -> dict[str, torch.Tensor]:
    """``{'<module>.lora_A': A, '<module>.lora_B': B}`` for adapter ``name``."""
    out = {}
    for module_name, m in model.named_modules():
        if isinstance(m, LoRALinear) and name in m.lora_A:
            out[f"{module_name}.lora_A"] = m.lora_A[name].detach()
            out[f"{module_name}.lora_B"] = m.lora_B[name].detach()
    return out


def load_adapter_state_dict(model: nn.Module, state: dict[str, torch.Tensor], name: str) -> None:
    """Copy tensors saved by ``adapter_state_dict`` into adapter ``name`` (shapes must match)."""
    modules = dict(model.named_modules())
    for key, value in state.items():
        module_name, _, part = key.rpartition(".")
        m = modules.get(module_name)
        if not isinstance(m, LoRALinear) or part not in ("lora_A", "lora_B") or name not in m.lora_A:
            raise KeyError(f"adapter tensor {key} has no place in this model")
        target = getattr(m, part)[name]
        if target.shape != value.shape:
            raise ValueError(f"adapter tensor {key}: shape {tuple(value.shape)} != {tuple(target.shape)}")
        with torch.no_grad():
            target.copy_(value)
