"""Full fine-tuning: every parameter trains, optionally with some blocks or modules frozen.

The baseline every parameter-efficient method is measured against: ``θ ← θ - η ∇L(θ)`` on all of
``θ`` (or on all but the frozen part).
"""

from __future__ import annotations

from typing import Any

from torch import nn

from ftlab.peft.method import Method
from ftlab.peft.targets import find_targets, layer_index, num_layers, select_layers


class Full(Method):
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
        frozen = self._frozen(model)
        for p in model.parameters():
            p.requires_grad_(id(p) not in frozen)

    def _frozen(self, model: nn.Module) -> set[int]:
        """ids of the parameters kept frozen: those of the chosen blocks and modules."""
        frozen = set()
        if self.freeze_layers is not None:
            blocks = select_layers(self.freeze_layers, num_layers(model))
            frozen |= {id(p) for name, p in model.named_parameters() if layer_index(name) in blocks}
        for pattern in self.freeze_modules:
            frozen |= {
                id(p)
                for _, module in find_targets(model, pattern, kinds=(nn.Module,))
                for p in module.parameters()
            }
        return frozen

    def hparams(self) -> dict[str, Any]:
        return {"freeze_layers": self.freeze_layers, "freeze_modules": self.freeze_modules}

    def num_parameters(self, model: nn.Module) -> int:
        """Every parameter of the model but the frozen blocks and modules (shared tensors once)."""
        frozen = self._frozen(model)
        return sum(p.numel() for p in model.parameters() if id(p) not in frozen)

    def merge_and_unload(self, model: nn.Module) -> None:
        """Nothing to fold: the trained weights are the model's own."""
