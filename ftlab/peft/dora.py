"""DoRA: Weight-Decomposed Low-Rank Adaptation (Liu et al., 2024, arXiv:2402.09353).

The adapted weight is split into a magnitude per output row and a direction, and LoRA updates
the direction only:

    W' = m ⊙ (W0 + s·B A) / ‖W0 + s·B A‖_row,     m ∈ R^out starts at ‖W0‖_row

so the adapted model starts equal to the base (B = 0). As in the paper (§4.3), the row norm is
treated as a constant in the backward pass, which keeps memory close to LoRA's. The forward
never builds ``W'``; with ``y0 = W0 x`` it computes

    h = y0 + b + (m/‖·‖ − 1) ⊙ y0 + (m/‖·‖) ⊙ s·B A x

The row norm comes from ``W0 Aᵀ`` (out × r) and ``A Aᵀ`` (r × r), never the (out × in) sum.
Merging writes ``W'`` into the base weight; unmerging divides the scale out again, so it is exact
up to float rounding. Everything else is LoRA's: targets, layers, initialisations, several
adapters, PEFT's format (with ``use_dora``).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ftlab.peft.layers import add_to_weight, dense_weight
from ftlab.peft.lora import LoRA, LoRALinear, lora_layers
from ftlab.peft.method import peft_format


class DoRALinear(LoRALinear):
    """``LoRALinear`` with a trainable magnitude per output row (``lora_magnitude``)."""

    def __init__(self, base: nn.Module):
        super().__init__(base)
        self.lora_magnitude = nn.ParameterDict()  # name -> (out,)
        self._merged_scale: torch.Tensor | None = None  # m / ‖W0 + s·BA‖ at merge time, to unmerge

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
        super().add_adapter(name, rank, alpha, dropout, rslora, dtype, init)
        with torch.no_grad():
            norm = self._adapted_weight(name).norm(dim=1)  # (out,): equals ‖W0‖ while B A adds nothing
        self.lora_magnitude[name] = nn.Parameter(norm.to(self.lora_A[name].dtype))

    def _adapted_weight(self, name: str) -> torch.Tensor:
        """``W0 + s·B A`` (out, in) in the adapter's dtype."""
        a = self.lora_A[name]
        return dense_weight(self.base).to(a.dtype) + self.scaling[name] * (self.lora_B[name] @ a)

    def _scale(self, name: str) -> torch.Tensor:
        """``m / ‖W0 + s·B A‖_row`` (out,), the norm a constant (the paper's memory-saving choice):
        computed without autograd, so no (out, in) tensor is kept for the backward pass."""
        with torch.no_grad():
            norm = self._row_norm(name)  # (out,)
        return self.lora_magnitude[name] / norm

    def _row_norm(self, name: str) -> torch.Tensor:
        """``‖W0 + s·B A‖_row`` (out,) without building the (out, in) sum:
        ``‖W0_i‖² + 2s·B_i·(W0 Aᵀ)_i + s²·B_i (A Aᵀ) B_iᵀ``."""
        a, b, s = self.lora_A[name], self.lora_B[name], self.scaling[name]
        w0 = dense_weight(self.base).to(a.dtype)  # (out, in)
        squared = torch.linalg.vector_norm(w0, dim=1).square()  # (out,)
        squared = squared + 2 * s * (b * (w0 @ a.T)).sum(1) + s * s * ((b @ (a @ a.T)) * b).sum(1)
        return squared.clamp_min(0).sqrt()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)  # (..., out) = W0 x + b
        name = self.active
        if name is None or name == self.merged:
            return y
        a, b = self.lora_A[name], self.lora_B[name]
        dropout = self.dropout[name]
        xd = dropout(x).to(a.dtype)
        if isinstance(dropout, nn.Identity):  # W0 x is y without the bias: no second matmul
            w0x = (y if self.bias is None else y - self.bias).to(a.dtype)
        else:
            w0x = F.linear(xd, dense_weight(self.base).to(a.dtype))
        scale = self._scale(name)  # (out,)
        lora = F.linear(F.linear(xd, a) * self.scaling[name], b)  # (..., out)
        if isinstance(dropout, nn.Identity):  # h = b + scale ⊙ (W0 x + s·B A x): one product
            h = scale * (w0x + lora)
            return (h if self.bias is None else h + self.bias).to(y.dtype)
        return y + ((scale - 1) * w0x + scale * lora).to(y.dtype)

    def delta_weight(self, name: str) -> torch.Tensor:
        """``W' − W0``: what merging adds to the dense (out, in) weight."""
        scale = self._scale(name)[:, None]
        return scale * self._adapted_weight(name) - dense_weight(self.base).to(scale.dtype)

    def merge(self, name: str | None = None) -> None:
        with torch.no_grad():
            scale = self._scale(name or self.active)
        super().merge(name)
        self._merged_scale = scale

    def unmerge(self) -> None:
        if self.merged is None:
            return
        name, scale = self.merged, self._merged_scale[:, None]
        with torch.no_grad():
            merged = dense_weight(self.base).to(scale.dtype)
            w0 = merged / scale - self.scaling[name] * (self.lora_B[name] @ self.lora_A[name])
            add_to_weight(self.base, w0 - merged)
        self.merged, self._merged_scale = None, None


@peft_format
class DoRA(LoRA):
    """LoRA on the direction of each weight plus a trainable magnitude per output row.

    Args:
        **kwargs: LoRA's arguments (rank, alpha, dropout, targets, layers, rslora, init,
            adapter_name, adapter_dtype, trainable).
    """

    layer_class = DoRALinear
    PEFT_KEYS = {**LoRA.PEFT_KEYS, "lora_magnitude": "lora_magnitude_vector"}

    def __init__(self, **kwargs: Any):
        super().__init__(**kwargs)

    def num_parameters(self, model: nn.Module) -> int:
        """LoRA's ``r · (in + out)`` plus ``out`` magnitudes per adapted layer."""
        magnitudes = sum(m.out_features for m in lora_layers(model) if self.adapter_name in m.lora_A)
        return super().num_parameters(model) + magnitudes

    @classmethod
    def reads_peft(cls, config: dict[str, Any]) -> bool:
        return config.get("peft_type") == "LORA" and bool(config.get("use_dora"))

    def to_peft(self, model: nn.Module) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        config, tensors = super().to_peft(model)
        return {**config, "use_dora": True}, tensors
