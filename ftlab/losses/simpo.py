"""SimPO: simple preference optimisation with a length-normalised reward and no reference model.

SimPO (Meng et al., 2024, arXiv:2405.14734). The implicit reward of a response is its average
log-probability scaled by β, and the chosen one must beat the rejected one by a margin γ:

    r(x, y) = (β / |y|) log π(y|x)
    L = −(1 − ε) log σ(r_c − r_r − γ) − ε log σ(−(r_c − r_r − γ))      (ε: label smoothing)

Without a reference, ``γ`` keeps the gap growing beyond zero; the length normalisation keeps the
policy from preferring long answers for their lower per-token cost. The paper's ranges: β 2–10,
γ 0.3–1.6 (γ/β ≈ 0.5 in its Llama-3 runs).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def simpo_loss(
    chosen: torch.Tensor,
    rejected: torch.Tensor,
    beta: float = 2.0,
    gamma: float = 1.0,
    label_smoothing: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Mean SimPO loss.

    Args:
        chosen: (B,) length-averaged log π of the chosen responses.
        rejected: (B,) length-averaged log π of the rejected responses.
        beta: β, the reward scale.
        gamma: γ, the target margin between the chosen and rejected rewards.
        label_smoothing: ε, the assumed share of flipped labels.

    Returns ``(loss, chosen_rewards, rejected_rewards)``: a scalar and (B,) detached rewards ``β ℓ``.
    """
    if beta <= 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5), got {label_smoothing}")
    rc, rr = beta * chosen.float(), beta * rejected.float()  # (B,)
    z = rc - rr - gamma
    losses = -(1 - label_smoothing) * F.logsigmoid(z) - label_smoothing * F.logsigmoid(-z)
    return losses.mean(), rc.detach(), rr.detach()
