"""Pairwise preference losses for reward models.

Bradley–Terry (Bradley & Terry, 1952), as used for reward models in InstructGPT (Ouyang et al.,
2022): the probability that ``chosen`` beats ``rejected`` is ``σ(r_c − r_r)``, so the loss is
``L = −mean log σ(r_c − r_r − m)``; the optional margin ``m`` (Llama 2) asks for a larger gap on
pairs rated as clearly different.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def bradley_terry_loss(
    chosen: torch.Tensor, rejected: torch.Tensor, margin: float | torch.Tensor = 0.0
) -> torch.Tensor:
    """``−mean log σ(r_chosen − r_rejected − margin)``.

    Args:
        chosen: (B,) rewards of the preferred responses.
        rejected: (B,) rewards of the other responses.
        margin: a float or (B,) per-pair margins.

    Returns a scalar; ``logsigmoid`` keeps it finite for large gaps.
    """
    return -F.logsigmoid(chosen.float() - rejected.float() - margin).mean()


def pairwise_accuracy(chosen: torch.Tensor, rejected: torch.Tensor) -> torch.Tensor:
    """Share of (B,) pairs whose chosen reward is strictly above the rejected one; a scalar."""
    return (chosen > rejected).float().mean()
