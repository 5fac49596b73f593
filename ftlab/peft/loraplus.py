"""LoRA+: Efficient Low Rank Adaptation of Large Models (Hayou et al., 2024, arXiv:2402.12354).

LoRA with a larger learning rate for ``B`` than for ``A``:

    η_B = λ · η_A,     λ = lr_ratio (the paper recommends about 2^4)

Nothing changes in the model; the optimizer gets three parameter groups (``A`` matrices at the
optimizer's learning rate, ``B`` matrices at ``lr_ratio`` times it, other trainable tensors at
the optimizer's), through the method protocol's ``param_groups``, which every objective asks for.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from ftlab.peft.lora import LoRA


class LoRAPlus(LoRA):
    """LoRA whose ``B`` matrices learn ``lr_ratio`` times faster than its ``A`` matrices.

    Args:
        lr_ratio: Learning rate of ``B`` over that of ``A`` (λ > 0).
        **kwargs: LoRA's arguments (rank, alpha, dropout, targets, layers, rslora, init,
            adapter_name, adapter_dtype, trainable).
    """

    def __init__(self, lr_ratio: float = 16.0, **kwargs: Any):
        super().__init__(**kwargs)
        if lr_ratio <= 0:
            raise ValueError(f"lr_ratio must be > 0, got {lr_ratio}")
        self.lr_ratio = lr_ratio

    def hparams(self) -> dict[str, Any]:
        return super().hparams() | {"lr_ratio": self.lr_ratio}

    def param_groups(self, model: nn.Module) -> list[dict[str, Any]]:
        groups: dict[str, list[nn.Parameter]] = {"A": [], "B": [], "other": []}
        for name, p in model.named_parameters():
            if p.requires_grad:
                groups["A" if ".lora_A." in name else "B" if ".lora_B." in name else "other"].append(p)
        scales = {"A": 1.0, "B": self.lr_ratio, "other": 1.0}
        return [{"params": ps, "lr_scale": scales[k]} for k, ps in groups.items() if ps]
