"""Full fine-tuning: every parameter trains, optionally with some blocks or modules frozen.

The baseline every parameter-efficient method is measured against: ``θ ← θ - η ∇L(θ)`` on all of
``θ`` (or on all but the frozen part).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ftlab.peft._method import trainable_state_dict
from ftlab.peft._targets import find_targets, layer_index, select_layers, num_layers


class Full:
    """Train the whole backbone.

    Args:
        freeze_layers: Transformer blocks to keep frozen (same syntax as LoRA's ``layers``:
            a list of indices, ``"a-b"``, ``"bottom:k"``, ``"bottom_half"``...); null freezes none.
        freeze_modules: Module-name patterns to keep frozen (e.g. ``embed_tokens``).
    """

    def __init__(self, freeze_layers: list[int] | str | None = None, freeze_modules: list[str] | None = None):
        self.freeze_layers = freeze_layers
        self.freeze_modules = list(freeze_modules or [])

    def apply(self, model: nn.Module) -> None:
        for p in model.parameters():
            p.requires_grad_(True)
        if self.freeze_layers is not None:
            frozen = select_layers(self.freeze_layers, num_layers(model))
            for name, p in model.named_parameters():
                if layer_index(name) in frozen:
                    p.requires_grad_(False)
        for pattern in self.freeze_modules:
            for _, module in find_targets(model, pattern, kinds=(nn.Module,)):
                module.requires_grad_(False)

    def state_dict(self, model: nn.Module) -> dict[str, torch.Tensor]:
        return trainable_state_dict(model)

    def hparams(self) -> dict[str, Any]:
        return {"freeze_layers": self.freeze_layers, "freeze_modules": self.freeze_modules}
