"""The contract every method meets, and helpers they share."""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import torch
from torch import nn


@runtime_checkable
class Method(Protocol):
    """How a backbone is adapted: which parameters exist and which train.

    ``apply`` freezes what must be frozen, injects modules in place and marks what trains.
    ``state_dict`` returns what an adapter file holds (default: the trainable tensors), and
    ``hparams`` the arguments that rebuild the method when the file is loaded.
    """

    def apply(self, model: nn.Module) -> None: ...

    def state_dict(self, model: nn.Module) -> dict[str, torch.Tensor]: ...

    def hparams(self) -> dict[str, Any]: ...


def freeze(model: nn.Module) -> None:
    for p in model.parameters():
        p.requires_grad_(False)


def trainable_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The tensors that train, by their name in ``model`` (detached, contiguous)."""
    return {n: p.detach().contiguous() for n, p in model.named_parameters() if p.requires_grad}


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; 4-bit packed weights count as the values they hold."""
    trainable = total = 0
    for p in model.parameters():
        # Two 4-bit values per byte of storage, whatever dtype the packed storage uses.
        n = p.numel() * (2 * p.element_size() if getattr(p, "quant_state", None) is not None else 1)
        total += n
        trainable += n if p.requires_grad else 0
    return trainable, total
