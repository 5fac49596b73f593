"""Bottleneck adapters: Parameter-Efficient Transfer Learning for NLP (Houlsby et al., 2019,
arXiv:1902.00751) and the single-adapter placement of AdapterFusion (Pfeiffer et al., 2021,
arXiv:2005.00247).

A small residual MLP is inserted on a sublayer's output ``y`` (before the block's own residual
add and layer norm):

    y ← y + W_up f(W_down y + b_down) + b_up,    W_down: (b × H), W_up: (H × b), b = H / reduction_factor

``W_up`` and ``b_up`` start at zero, so the adapted model starts exactly equal to the base. Placement:

- ``houlsby``: after the attention output projection and after the feed-forward output projection;
- ``pfeiffer``: after the feed-forward output projection only.

Blocks are found by structure: Llama-style (``self_attn.o_proj``, ``mlp.down_proj``), GPT-2
(``attn.c_proj``, ``mlp.c_proj``) and BERT (``attention.output.dense``, ``output.dense``). Only the
adapters train (Houlsby's paper also tunes the layer norms; that is left to ``Full``/LoRA's
``trainable``-style extensions).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from typing import Any, Literal

import torch
from torch import nn

from ftlab.peft.method import Method, freeze
from ftlab.peft.targets import LAYER_RE, TargetError, num_layers, select_layers, set_submodule

Placement = Literal["houlsby", "pfeiffer"]
Activation = Literal["relu", "gelu", "tanh", "silu"]
_ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "tanh": nn.Tanh, "silu": nn.SiLU}
#: family -> (attention output projection, feed-forward output projection), relative to a block.
FAMILIES: dict[str, tuple[str, str]] = {
    "llama": ("self_attn.o_proj", "mlp.down_proj"),
    "gpt2": ("attn.c_proj", "mlp.c_proj"),
    "bert": ("attention.output.dense", "output.dense"),
}


class BottleneckAdapter(nn.Module):
    """A frozen output projection ``base`` followed by a zero-initialised residual bottleneck."""

    def __init__(self, base: nn.Module, hidden: int, bottleneck: int, activation: Activation = "relu"):
        super().__init__()
        weight = next(base.parameters())
        # In the base's dtype, or fp32 beside a quantized (integer-packed) weight.
        dtype = weight.dtype if weight.dtype.is_floating_point else torch.float32
        kw = {"device": weight.device, "dtype": dtype}
        self.base = base
        self.down = nn.Linear(hidden, bottleneck, **kw)  # (b, H)
        self.act = _ACTIVATIONS[activation]()
        self.up = nn.Linear(bottleneck, hidden, **kw)  # (H, b)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)
        self.enabled = True
        self.train(base.training)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)  # (..., H)
        if not self.enabled:
            return y
        h = self.act(self.down(y.to(self.down.weight.dtype)))  # (..., b)
        return y + self.up(h).to(y.dtype)  # (..., H)

    def extra_repr(self) -> str:
        return f"hidden={self.up.out_features}, bottleneck={self.down.out_features}, enabled={self.enabled}"


def find_sublayers(model: nn.Module) -> tuple[str, dict[int, dict[str, str]]]:
    """The architecture family and, per block, the names of its ``attention`` and ``ffn`` output
    projections. Raises ``TargetError`` naming the expected structures for an unknown model."""
    relative: dict[str, list[tuple[int, str]]] = {}
    for name, _ in model.named_modules():
        found = LAYER_RE.search(name)
        if found and found.end() < len(name):
            relative.setdefault(name[found.end():], []).append((int(found.group(1)), name))
    n = num_layers(model)
    for family, (attn, ffn) in FAMILIES.items():
        a, f = dict(relative.get(attn, [])), dict(relative.get(ffn, []))
        if len(a) == len(f) == n:
            return family, {i: {"attention": a[i], "ffn": f[i]} for i in range(n)}
    expected = "; ".join(f"{fam}: '{a}' + '{f}'" for fam, (a, f) in FAMILIES.items())
    raise TargetError(
        f"Adapter does not know the block structure of {type(model).__name__}: expected, in each of its {n} "
        f"blocks, an attention and a feed-forward output projection named like {expected}"
    )


class Adapter(Method):
    """Bottleneck adapters in chosen blocks; the backbone stays frozen.

    Args:
        placement: ``houlsby`` (after attention and after the feed-forward block) or ``pfeiffer``
            (after the feed-forward block only).
        reduction_factor: Bottleneck size is ``hidden_size // reduction_factor`` (≤ hidden size).
        bottleneck_size: Explicit bottleneck size; overrides ``reduction_factor``.
        activation: Nonlinearity between the projections: ``relu``, ``gelu``, ``tanh``, ``silu``.
        layers: Which transformer blocks get adapters: all (null), a list of indices, ``"a-b"``,
            ``"top:k"`` (the upper blocks are the usual recommendation), ``"bottom:k"``,
            ``"top_half"``, ``"bottom_half"``.
    """

    def __init__(
        self,
        placement: Placement = "pfeiffer",
        reduction_factor: int = 16,
        bottleneck_size: int | None = None,
        activation: Activation = "relu",
        layers: list[int] | str | None = None,
    ):
        if placement not in ("houlsby", "pfeiffer"):
            raise ValueError(f"placement must be 'houlsby' or 'pfeiffer', got {placement!r}")
        if reduction_factor <= 0:
            raise ValueError(f"reduction_factor must be > 0, got {reduction_factor}")
        if bottleneck_size is not None and bottleneck_size <= 0:
            raise ValueError(f"bottleneck_size must be > 0, got {bottleneck_size}")
        if activation not in _ACTIVATIONS:
            raise ValueError(f"activation must be one of {sorted(_ACTIVATIONS)}, got {activation!r}")
        self.placement, self.reduction_factor = placement, reduction_factor
        self.bottleneck_size = bottleneck_size
        self.activation, self.layers = activation, layers

    def bottleneck(self, hidden: int) -> int:
        if self.bottleneck_size is not None:
            return self.bottleneck_size
        if self.reduction_factor > hidden:
            raise ValueError(
                f"reduction_factor {self.reduction_factor} is larger than the hidden size {hidden}"
            )
        return hidden // self.reduction_factor

    def apply(self, model: nn.Module) -> None:
        if any(isinstance(m, BottleneckAdapter) for m in model.modules()):
            raise ValueError("this model already has adapters (Adapter was applied twice)")
        hidden = model.config.hidden_size
        size = self.bottleneck(hidden)
        chosen = select_layers(self.layers, num_layers(model))
        _, blocks = find_sublayers(model)
        sites = ("attention", "ffn") if self.placement == "houlsby" else ("ffn",)
        freeze(model)
        for i in sorted(chosen):
            for site in sites:
                name = blocks[i][site]
                adapter = BottleneckAdapter(model.get_submodule(name), hidden, size, self.activation)
                set_submodule(model, name, adapter)

    def hparams(self) -> dict[str, Any]:
        return dict(placement=self.placement, reduction_factor=self.reduction_factor,
                    bottleneck_size=self.bottleneck_size, activation=self.activation, layers=self.layers)

    def num_parameters(self, model: nn.Module) -> int:
        """The formula ``n_adapters · (2 · H · b + b + H)``."""
        return sum(2 * m.up.out_features * m.down.out_features + m.down.out_features + m.up.out_features
                   for m in adapter_layers(model))

    def disabled(self, model: nn.Module) -> AbstractContextManager[None]:
        return disable_adapters(model)


# ---------------------------------------------------------------------------------- functions
def adapter_layers(model: nn.Module) -> Iterator[BottleneckAdapter]:
    return (m for m in model.modules() if isinstance(m, BottleneckAdapter))


@contextmanager
def disable_adapters(model: nn.Module) -> Iterator[None]:
    """Run the base model: every bottleneck adapter off inside the block."""
    layers = list(adapter_layers(model))
    saved = [m.enabled for m in layers]
    for m in layers:
        m.enabled = False
    try:
        yield
    finally:
        for m, enabled in zip(layers, saved):
            m.enabled = enabled
