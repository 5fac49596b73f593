"""LoRA: Low-Rank Adaptation of Large Language Models (Hu et al., 2021, arXiv:2106.09685).

A frozen linear map ``W0`` (out × in) gets a trainable low-rank update:

    h = W0 x + s · B A x,     A: (r × in), B: (out × r), s = alpha / r   (rsLoRA: alpha / sqrt(r))

With the default initialisation ``B`` starts at zero, so the adapted model starts equal to the
base (``ftlab.peft.lora_init`` has the others: gaussian, PiSSA, OLoRA). The update is computed as
``(x Aᵀ) Bᵀ`` through the rank-r bottleneck; ``B A`` is only materialised to merge. Adapters live in
the base layer's compute dtype unless ``adapter_dtype`` says otherwise (no silent fp32 upcast).

Several named adapters can sit on one model; ``set_adapter`` picks the active one at runtime and
``disable_adapters`` gives the base model back.

Variants (DoRA...) subclass ``LoRALinear`` (overriding ``add_adapter``, ``forward``,
``delta_weight``, ``unmerge``) and ``LoRA`` (setting ``layer_class``); everything here that
touches adapter tensors works on every ``ParameterDict`` of the layer whose name starts with
``lora_``, so a variant's extra tensors are saved, loaded and switched with the rest.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from ftlab.peft.layers import (
    LinearWrapper,
    add_to_weight,
    compute_dtype,
    features,
    is_conv1d,
    is_quantized,
    linear_kinds,
)
from ftlab.peft.lora_init import INITS, ResidualInit
from ftlab.peft.method import Method, MethodError, freeze, load_named, peft_format
from ftlab.peft.targets import LayerSelection, TargetError, find_targets, set_submodule

PEFT_PREFIX = "base_model.model."


class LoRALinear(LinearWrapper):
    """A frozen linear layer (``nn.Linear`` or a subclass, GPT-2 ``Conv1D``, bitsandbytes 4-bit or
    8-bit) plus named low-rank adapters, of which at most one is active."""

    def __init__(self, base: nn.Module):
        super().__init__()
        self.base = base
        self.in_features, self.out_features = features(base)
        self.lora_A = nn.ParameterDict()  # name -> (r, in)
        self.lora_B = nn.ParameterDict()  # name -> (out, r)
        self.scaling: dict[str, float] = {}
        self.dropout = nn.ModuleDict()
        self.active: str | None = None
        self.merged: str | None = None
        self.train(base.training)  # injected into an eval-mode model, stay in eval mode (no dropout)

    def add_adapter(
        self,
        name: str,
        rank: int,
        alpha: float,
        dropout: float = 0.0,
        rslora: bool = False,
        dtype: torch.dtype | None = None,
        init: str = "kaiming",
    ) -> None:
        if name in self.lora_A:
            raise ValueError(f"adapter {name!r} already exists")
        dtype = dtype or compute_dtype(self.base)
        device = next(self.base.parameters()).device
        self.lora_A[name] = nn.Parameter(torch.empty(rank, self.in_features, dtype=dtype, device=device))
        self.lora_B[name] = nn.Parameter(torch.zeros(self.out_features, rank, dtype=dtype, device=device))
        self.scaling[name] = alpha / (math.sqrt(rank) if rslora else rank)
        self.dropout[name] = (nn.Dropout(dropout) if dropout > 0 else nn.Identity()).train(self.training)
        INITS[init](self, name)
        if self.active is None:
            self.active = name

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)  # (..., out)
        name = self.active
        if name is None or name == self.merged:
            return y
        a, b = self.lora_A[name], self.lora_B[name]
        h = F.linear(self.dropout[name](x).to(a.dtype), a) * self.scaling[name]  # (..., r): scaling the
        # r-wide tensor, not the out-wide one, is the same result with fewer multiplies
        if b.dtype == y.dtype:  # one GEMM that adds into the base output: no out-wide temporary
            return torch.addmm(y.reshape(-1, y.size(-1)), h.reshape(-1, h.size(-1)), b.t()).view_as(y)
        return y + F.linear(h, b).to(y.dtype)

    def delta_weight(self, name: str) -> torch.Tensor:
        """What merging adapter ``name`` adds to the dense (out, in) weight: ``s · B A``."""
        return (self.lora_B[name] @ self.lora_A[name]) * self.scaling[name]

    def merge(self, name: str | None = None) -> None:
        name = name or self.active
        if self.merged is not None:
            raise RuntimeError(f"adapter {self.merged!r} is already merged; unmerge it first")
        if is_quantized(self.base):  # adding to packed codes would silently corrupt them
            raise RuntimeError("cannot merge into a quantized base in place: use ftlab.peft.qlora.merge")
        with torch.no_grad():
            add_to_weight(self.base, self.delta_weight(name))
        self.merged = name

    def unmerge(self) -> None:
        if self.merged is not None:
            with torch.no_grad():
                add_to_weight(self.base, -self.delta_weight(self.merged))
            self.merged = None

    def adapter_tensors(self) -> dict[str, nn.ParameterDict]:
        """Every per-adapter tensor family of this layer: ``lora_A``, ``lora_B`` and a variant's own."""
        return {
            n: d
            for n, d in self.named_children()
            if n.startswith("lora_") and isinstance(d, nn.ParameterDict)
        }

    def extra_repr(self) -> str:
        ranks = {n: p.shape[0] for n, p in self.lora_A.items()}
        return f"in={self.in_features}, out={self.out_features}, adapters={ranks}, active={self.active!r}"


@peft_format
class LoRA(Method):
    """LoRA on chosen linear layers; everything else frozen.

    Args:
        rank: Rank r of the update ``B A`` (> 0).
        alpha: Scaling numerator: the update is multiplied by ``alpha / rank``.
        dropout: Dropout on the adapter's input (0 disables the op entirely).
        targets: Module-name patterns to adapt (``q_proj``, ``attn.*``, ``re:...``, ``all-linear``).
        layers: Which transformer blocks: all (null), a list of indices, ``"a-b"``, ``"top:k"``,
            ``"bottom:k"``, ``"top_half"``, ``"bottom_half"``.
        rslora: Rank-stabilised scaling ``alpha / sqrt(rank)`` (Kalajdzievski, 2023).
        init: How A and B start: ``kaiming`` (B = 0), ``gaussian`` (B = 0), ``pissa`` (principal
            singular components of W0 move into A and B) or ``olora`` (QR of W0); see
            ``ftlab.peft.lora_init``.
        adapter_name: Name of the adapter this method creates (several can live on one model).
        adapter_dtype: Adapter dtype; null uses the base layer's dtype (the compute dtype).
        trainable: Extra module-name patterns to train fully (e.g. ``lm_head``), like PEFT's
            ``modules_to_save``.
    """

    #: The wrapper this method puts around each target; variants set their own.
    layer_class: type[LoRALinear] = LoRALinear
    #: Our tensor family name -> its name in PEFT's files (``<module>.lora_A.weight``).
    PEFT_KEYS = {"lora_A": "lora_A.weight", "lora_B": "lora_B.weight"}

    def __init__(
        self,
        rank: int = 8,
        alpha: float = 16.0,
        dropout: float = 0.0,
        targets: list[str] = ["q_proj", "v_proj"],  # noqa: B006 - jsonargparse needs a literal default
        layers: list[int] | str | None = None,
        rslora: bool = False,
        init: Literal["kaiming", "gaussian", "pissa", "olora"] = "kaiming",
        adapter_name: str = "default",
        adapter_dtype: Literal["float32", "bfloat16", "float16"] | None = None,
        trainable: list[str] | None = None,
    ):
        if rank <= 0:
            raise ValueError(f"LoRA rank must be > 0, got {rank}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"LoRA dropout must be in [0, 1), got {dropout}")
        if init not in INITS:
            raise ValueError(f"LoRA init {init!r} is not one of {sorted(INITS)}")
        self.rank, self.alpha, self.dropout, self.rslora, self.init = rank, alpha, dropout, rslora, init
        self.targets, self.layers = list(targets), layers
        self.adapter_name, self.adapter_dtype = adapter_name, adapter_dtype
        self.trainable = list(trainable or [])

    def apply(self, model: nn.Module) -> None:
        freeze(model)
        inject(
            model,
            self.targets,
            self.layers,
            self.adapter_name,
            rank=self.rank,
            alpha=self.alpha,
            dropout=self.dropout,
            rslora=self.rslora,
            init=self.init,
            layer_class=self.layer_class,
            dtype=getattr(torch, self.adapter_dtype) if self.adapter_dtype else None,
        )
        set_adapter(model, self.adapter_name)
        for pattern in self.trainable:
            for _, module in find_targets(model, pattern, kinds=(nn.Module,)):
                module.requires_grad_(True)

    def state_dict(self, model: nn.Module) -> dict[str, torch.Tensor]:
        return adapter_state_dict(model, self.adapter_name) | {
            n: p.detach() for n, p in model.named_parameters() if p.requires_grad and "lora_" not in n
        }

    def load_state_dict(self, model: nn.Module, state: dict[str, torch.Tensor]) -> None:
        ours = {k: v for k, v in state.items() if k.rpartition(".")[2].startswith("lora_")}
        load_adapter_state_dict(model, ours, self.adapter_name)
        load_named(model, {k: v for k, v in state.items() if k not in ours})

    def hparams(self) -> dict[str, Any]:
        return dict(
            rank=self.rank,
            alpha=self.alpha,
            dropout=self.dropout,
            targets=self.targets,
            layers=self.layers,
            rslora=self.rslora,
            init=self.init,
            adapter_name=self.adapter_name,
            adapter_dtype=self.adapter_dtype,
            trainable=self.trainable,
        )

    def num_parameters(self, model: nn.Module) -> int:
        """The formula ``r · (in + out)`` summed over adapted layers, plus the ``trainable`` modules."""
        layers = [m for m in lora_layers(model) if self.adapter_name in m.lora_A]
        extra = {
            id(p): p.numel()
            for pattern in self.trainable
            for _, module in find_targets(model, pattern, kinds=(nn.Module,))
            for p in module.parameters()
        }
        return sum(self.rank * (m.in_features + m.out_features) for m in layers) + sum(extra.values())

    def disabled(self, model: nn.Module) -> AbstractContextManager[None]:
        if self.trainable:
            raise MethodError(
                f"{type(self).__name__} also trains {self.trainable} of the base itself, so "
                "switching the adapters off does not give the frozen base"
            )
        if isinstance(INITS[self.init], ResidualInit):
            raise MethodError(
                f"init={self.init!r} rewrote the base weights (W0 - s·B0A0), so switching the "
                "adapters off does not give the frozen base; use kaiming or gaussian init"
            )
        return disable_adapters(model)

    def merge_and_unload(self, model: nn.Module) -> None:
        merge(model, self.adapter_name)
        unwrap(model)

    # ------------------------------------------------------------------ PEFT's format
    @classmethod
    def reads_peft(cls, config: dict[str, Any]) -> bool:
        return config.get("peft_type") == "LORA" and not config.get("use_dora")

    def to_peft(self, model: nn.Module) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        """PEFT's ``adapter_config.json`` fields and ``adapter_model.safetensors`` tensors."""
        if self.trainable:
            raise MethodError(
                f"PEFT export supports LoRA matrices only; this LoRA also trains {self.trainable}"
            )
        if isinstance(INITS[self.init], ResidualInit):
            raise MethodError(
                f"an init={self.init!r} adapter is relative to a rewritten base; PEFT's files need "
                "the original base: save it in ftlab's format"
            )
        tensors, names, conv1d = {}, set(), False
        for key, value in adapter_state_dict(model, self.adapter_name).items():
            module_name, _, family = key.rpartition(".")
            tensors[f"{PEFT_PREFIX}{module_name}.{self.PEFT_KEYS[family]}"] = value
            names.add(module_name)
            conv1d |= is_conv1d(model.get_submodule(module_name).base)
        config = {
            "peft_type": "LORA",
            "r": self.rank,
            "lora_alpha": self.alpha,
            "lora_dropout": self.dropout,
            "use_rslora": self.rslora,
            "target_modules": sorted(names),
            "fan_in_fan_out": conv1d,
            "bias": "none",
            "modules_to_save": None,
            "init_lora_weights": True,
            "use_dora": False,
        }
        return config, tensors

    @classmethod
    def from_peft(
        cls,
        config: dict[str, Any],
        tensors: dict[str, torch.Tensor],
        model: nn.Module,
        adapter_name: str = "default",
    ) -> LoRA:
        """Apply the adapter PEFT's ``config`` describes to ``model`` and load its ``tensors``."""
        for key in ("rank_pattern", "alpha_pattern", "modules_to_save", "layer_replication", "lora_bias"):
            if config.get(key):
                raise MethodError(f"PEFT adapter with {key} is not supported")
        if config.get("init_lora_weights") not in (None, True, False, "gaussian"):
            raise MethodError(
                f"PEFT adapter with init_lora_weights={config['init_lora_weights']!r} holds a "
                "rewritten base; convert it with PEFT first"
            )
        ours = {v: k for k, v in cls.PEFT_KEYS.items()}
        state = {}
        for key, value in tensors.items():
            family = next((p for p in ours if key.endswith("." + p)), None)
            if not key.startswith(PEFT_PREFIX) or family is None:
                raise MethodError(f"unexpected tensor {key} in a PEFT {cls.__name__} adapter")
            state[f"{key[len(PEFT_PREFIX) : -len(family) - 1]}.{ours[family]}"] = value
        method = cls(
            rank=int(config["r"]),
            alpha=float(config["lora_alpha"]),
            dropout=float(config.get("lora_dropout") or 0.0),
            targets=sorted({k.rpartition(".")[0] for k in state}),
            rslora=bool(config.get("use_rslora")),
            adapter_name=adapter_name,
        )
        missing = sorted(
            f"{module}.{family}"
            for module in method.targets
            for family in cls.PEFT_KEYS
            if f"{module}.{family}" not in state
        )
        if missing:  # checked before the model is touched
            raise MethodError(f"the PEFT {cls.__name__} adapter lacks tensors: {missing[:3]}")
        method.apply(model)
        method.load_state_dict(model, state)
        return method


# ---------------------------------------------------------------------------------- functions
def inject(
    model: nn.Module,
    targets: list[str],
    layers: LayerSelection,
    name: str,
    *,
    rank: int,
    alpha: float,
    dropout: float = 0.0,
    rslora: bool = False,
    dtype: torch.dtype | None = None,
    init: str = "kaiming",
    layer_class: type[LoRALinear] = LoRALinear,
) -> list[str]:
    """Add adapter ``name`` to every target (wrapping plain layers in ``layer_class``); returns the names.

    Adapter parameters train; nothing else is touched, so call ``freeze`` first when needed.
    """
    chosen = [
        (n, m)
        for n, m in find_targets(model, targets, layers, linear_kinds() + (LoRALinear,))
        if not n.endswith(".base")
    ]
    for module_name, module in chosen:
        if not isinstance(module, LoRALinear):
            module = layer_class(module)
            set_submodule(model, module_name, module)
        elif type(module) is not layer_class:
            raise TargetError(
                f"{module_name} holds {type(module).__name__} adapters; a {layer_class.__name__} "
                "adapter cannot join them on the same layer"
            )
        module.add_adapter(name, rank, alpha, dropout, rslora, dtype, init)
    return [n for n, _ in chosen]


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
        for family in m.adapter_tensors().values():
            for n, p in family.items():
                p.requires_grad_(n == name)


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
    """``{'<module>.lora_A': A, '<module>.lora_B': B, ...}`` for adapter ``name`` (every family)."""
    out = {}
    for module_name, m in model.named_modules():
        if isinstance(m, LoRALinear) and name in m.lora_A:
            for family, tensors in m.adapter_tensors().items():
                out[f"{module_name}.{family}"] = tensors[name].detach()
    return out


def load_adapter_state_dict(model: nn.Module, state: dict[str, torch.Tensor], name: str) -> None:
    """Copy tensors saved by ``adapter_state_dict`` into adapter ``name`` (shapes must match)."""
    modules = dict(model.named_modules())
    for key, value in state.items():
        module_name, _, family = key.rpartition(".")
        m = modules.get(module_name)
        tensors = m.adapter_tensors().get(family) if isinstance(m, LoRALinear) else None
        if tensors is None or name not in tensors:
            raise KeyError(f"adapter tensor {key} has no place in this model")
        target = tensors[name]
        if target.shape != value.shape:
            raise ValueError(f"adapter tensor {key}: shape {tuple(value.shape)} != {tuple(target.shape)}")
        with torch.no_grad():
            target.copy_(value)
