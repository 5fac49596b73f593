"""Bottleneck adapters: Parameter-Efficient Transfer Learning for NLP (Houlsby et al., 2019,
arXiv:1902.00751) and the single-adapter placement of AdapterFusion (Pfeiffer et al., 2021,
arXiv:2005.00247).

A small residual MLP is inserted on a sublayer's output ``y`` (before the block's own residual
add and layer norm):

    y ← y + W_up f(W_down y + b_down) + b_up,    W_down: (b × H), W_up: (H × b), b = H / reduction_factor

``W_up`` and ``b_up`` start at zero, so the adapted model starts exactly equal to the base. Placement:

- ``houlsby``: after the attention output projection and after the feed-forward output projection;
- ``pfeiffer``: after the feed-forward output projection only.

The two output projections of each block are found by structure (``ftlab.peft.blocks``: the last
linear layer of the self-attention, and of the block outside its attention), so any Hugging Face
family works; ``attention_output`` / ``ffn_output`` patterns override that for an exotic model. Only
the adapters train (Houlsby's paper also tunes the layer norms; that is left to ``Full``/LoRA's
``trainable``-style extensions).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import AbstractContextManager
from typing import Any, Literal

import torch
from torch import nn

from ftlab.peft.blocks import find_blocks
from ftlab.peft.layers import LinearWrapper, features
from ftlab.peft.method import Method, freeze, switched_off
from ftlab.peft.targets import TargetError, num_layers, select_layers, set_submodule

Placement = Literal["houlsby", "pfeiffer"]
Activation = Literal["relu", "gelu", "tanh", "silu"]
_ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "tanh": nn.Tanh, "silu": nn.SiLU}


class BottleneckAdapter(LinearWrapper):
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


def find_sublayers(
    model: nn.Module, attention_output: list[str] | None = None, ffn_output: list[str] | None = None
) -> dict[str, dict[str, str]]:
    """Per block (by name), the names of its ``attention`` and ``ffn`` output projections. Raises
    ``TargetError`` naming what is missing, and the override that would fix it."""
    blocks = {}
    for block in find_blocks(model, attention_output, ffn_output):
        missing = [part for part in ("attention_output", "ffn_output") if getattr(block, part) is None]
        if missing:
            raise TargetError(
                f"Adapter cannot find the {' and '.join(missing)} projection of block {block.name} in "
                f"{type(model).__name__}; name it with Adapter's {missing[0]} argument (a module-name "
                "pattern)"
            )
        blocks[block.name] = {
            "attention": block.attention_output,
            "ffn": block.ffn_output,
            "index": block.index,
        }
    return blocks


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
        attention_output: Module-name patterns of the attention output projections, for a model whose
            blocks are not found by structure (null: found by structure).
        ffn_output: Module-name patterns of the feed-forward output projections (null: by structure).
    """

    def __init__(
        self,
        placement: Placement = "pfeiffer",
        reduction_factor: int = 16,
        bottleneck_size: int | None = None,
        activation: Activation = "relu",
        layers: list[int] | str | None = None,
        attention_output: list[str] | None = None,
        ffn_output: list[str] | None = None,
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
        self.attention_output, self.ffn_output = attention_output, ffn_output

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
        chosen = select_layers(self.layers, num_layers(model))
        blocks = find_sublayers(model, self.attention_output, self.ffn_output)
        sites = ("attention", "ffn") if self.placement == "houlsby" else ("ffn",)
        freeze(model)
        for parts in blocks.values():
            if parts["index"] not in chosen:
                continue
            for site in sites:
                base = model.get_submodule(parts[site])
                hidden = features(base)[1]
                adapter = BottleneckAdapter(base, hidden, self.bottleneck(hidden), self.activation)
                set_submodule(model, parts[site], adapter)

    def hparams(self) -> dict[str, Any]:
        return dict(
            placement=self.placement,
            reduction_factor=self.reduction_factor,
            bottleneck_size=self.bottleneck_size,
            activation=self.activation,
            layers=self.layers,
            attention_output=self.attention_output,
            ffn_output=self.ffn_output,
        )

    def num_parameters(self, model: nn.Module) -> int:
        """The formula ``n_adapters · (2 · H · b + b + H)``."""
        return sum(
            2 * m.up.out_features * m.down.out_features + m.down.out_features + m.up.out_features
            for m in adapter_layers(model)
        )

    def disabled(self, model: nn.Module) -> AbstractContextManager[None]:
        return disable_adapters(model)


# ---------------------------------------------------------------------------------- functions
def adapter_layers(model: nn.Module) -> Iterator[BottleneckAdapter]:
    return (m for m in model.modules() if isinstance(m, BottleneckAdapter))


def disable_adapters(model: nn.Module) -> AbstractContextManager[None]:
    """Run the base model: every bottleneck adapter off inside the block."""
    return switched_off(adapter_layers(model))
