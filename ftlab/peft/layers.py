"""Linear layers of every kind a method meets, seen one way: (out, in) shapes and dense weights.

Models hold their linear maps as ``nn.Linear`` and its subclasses (Falcon's ``FalconLinear``,
bitsandbytes' ``Linear4bit`` and ``Linear8bitLt``), or as GPT-2's ``Conv1D`` (weight stored (in, out)).
Methods use these helpers instead of branching on model families.
"""

from __future__ import annotations

import torch
from torch import nn


def linear_kinds() -> tuple[type, ...]:
    """Module types that are linear maps: ``nn.Linear`` (and subclasses) and transformers' ``Conv1D``."""
    from transformers.pytorch_utils import Conv1D

    return (nn.Linear, Conv1D)


def is_conv1d(module: nn.Module) -> bool:
    """transformers' GPT-2 ``Conv1D``: a linear map whose weight is stored (in, out)."""
    return type(module).__name__ == "Conv1D"


def is_4bit(module: nn.Module) -> bool:
    """A bitsandbytes 4-bit linear layer (packed codes: its weight is not a dense matrix)."""
    return type(module).__name__ in ("Linear4bit", "LinearNF4", "LinearFP4")


def is_8bit(module: nn.Module) -> bool:
    """A bitsandbytes 8-bit linear layer (int8 weight with per-row scales)."""
    return type(module).__name__ == "Linear8bitLt"


def is_quantized(module: nn.Module) -> bool:
    return is_4bit(module) or is_8bit(module)


def features(module: nn.Module) -> tuple[int, int]:
    """(in_features, out_features) of any linear layer."""
    if is_conv1d(module):
        return module.weight.shape[0], module.weight.shape[1]
    return module.in_features, module.out_features


def compute_dtype(module: nn.Module) -> torch.dtype:
    """The dtype a linear layer computes in: its weight's, or a quantized layer's compute dtype."""
    if is_quantized(module):  # packed codes may be stored as a float dtype: not the compute dtype
        return getattr(module, "compute_dtype", None) or torch.float32
    return module.weight.dtype


def dense_weight(module: nn.Module) -> torch.Tensor:
    """The (out, in) matrix a linear layer multiplies by: dequantized for 4-bit and 8-bit layers,
    transposed for ``Conv1D``. A copy for quantized layers, a view otherwise."""
    if is_4bit(module):
        import bitsandbytes.functional as bnbf

        w, qs = module.weight, module.weight.quant_state
        data = w.data
        if getattr(qs, "packing_format_for_cpu", False):  # repacked for CPU inference: undo it first
            from bitsandbytes.nn.modules import _convert_weight_packed_for_cpu_inverse

            data, qs = _convert_weight_packed_for_cpu_inverse(data, qs)
            w.data, w.quant_state = data, qs
            module.quant_state = qs
        return bnbf.dequantize_4bit(data, qs)
    if is_8bit(module):
        w = module.weight
        scale = getattr(w, "SCB", None)
        if scale is None:  # not quantized yet (before .to(device)): still the float weight
            return w.data
        return w.data.float() * scale.float().unsqueeze(1) / 127.0
    return module.weight.T if is_conv1d(module) else module.weight


def add_to_weight(module: nn.Module, delta: torch.Tensor) -> None:
    """``W += delta`` in place, ``delta`` (out, in) in any layout the layer stores. Quantized
    layers refuse: adding to packed codes would silently corrupt them."""
    if is_quantized(module):
        raise ValueError(
            f"cannot add to the weight of a quantized {type(module).__name__} in place; "
            "dequantize it first (ftlab.peft.qlora.dequantize)"
        )
    w = module.weight
    with torch.no_grad():
        w += (delta.T if is_conv1d(module) else delta).to(w.dtype)


def set_dense_weight(module: nn.Module, weight: torch.Tensor) -> None:
    """Make ``weight`` (out, in) the layer's matrix: copied in place for dense layers, re-quantized
    with the layer's own settings for 4-bit ones. 8-bit layers refuse."""
    if is_4bit(module):
        import bitsandbytes as bnb

        old = module.weight
        module.weight = bnb.nn.Params4bit(
            weight.to(compute_dtype(module)).contiguous(),
            requires_grad=False,
            blocksize=old.blocksize,
            compress_statistics=old.compress_statistics,
            quant_type=old.quant_type,
            quant_storage=old.quant_storage,
            module=module,
        ).to(weight.device)  # quantizes here
        return
    if is_8bit(module):
        raise ValueError("cannot rewrite the weight of an 8-bit bitsandbytes layer")
    with torch.no_grad():
        module.weight.copy_((weight.T if is_conv1d(module) else weight).to(module.weight.dtype))


class LinearWrapper(nn.Module):
    """Base of modules that stand in for a linear layer ``self.base`` (LoRA, IA³, bottleneck adapters).

    Model code that reads its layer's ``weight`` or ``bias`` (T5 casts its input to ``wo.weight.dtype``)
    sees the wrapped layer's.
    """

    base: nn.Module

    @property
    def weight(self) -> torch.Tensor:
        return self.base.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return getattr(self.base, "bias", None)
