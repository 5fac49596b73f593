"""Direct preference optimisation: the policy is its own reward model.

DPO (Rafailov et al., 2023, arXiv:2305.18290). With ``π`` the policy, ``π_ref`` the frozen
reference, and log-probabilities of the chosen ``y_c`` and rejected ``y_r`` responses to a prompt
``x``, the implicit reward of a response is ``r(x, y) = β (log π(y|x) − log π_ref(y|x))`` and

    h = (log π(y_c|x) − log π(y_r|x)) − (log π_ref(y_c|x) − log π_ref(y_r|x))
    sigmoid:  L = −(1 − ε) log σ(β h) − ε log σ(−β h)        (ε: label smoothing, cDPO)
    ipo:      L = (h − 1 / (2β))²                           (Azar et al., 2023, arXiv:2310.12036)

IPO regresses the log-ratio gap to a fixed target instead of pushing it to infinity, so it does
not overfit deterministic preferences; it is usually run on length-averaged log-probabilities
(the objective does that).
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

LossType = Literal["sigmoid", "ipo"]


def dpo_logits(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
) -> torch.Tensor:
    """``h``: the policy's chosen-minus-rejected log-ratio gap relative to the reference's.

    All four arguments are (B,) response log-probabilities; returns (B,) in fp32.
    """
    return (policy_chosen.float() - policy_rejected.float()) - (ref_chosen.float() - ref_rejected.float())


def dpo_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    beta: float = 0.1,
    loss_type: LossType = "sigmoid",
    label_smoothing: float = 0.0,
) -> torch.Tensor:
    """Mean DPO (``sigmoid``) or IPO (``ipo``) loss over the batch.

    Args:
        policy_chosen, policy_rejected: (B,) log π of the chosen / rejected responses.
        ref_chosen, ref_rejected: (B,) log π_ref of the same responses (no gradient needed).
        beta: Strength of the implicit KL constraint (larger: stay closer to the reference).
        loss_type: ``sigmoid`` (DPO) or ``ipo``.
        label_smoothing: ε, the assumed share of flipped labels (sigmoid loss only; 0 is plain DPO).

    Returns a scalar.
    """
    if beta <= 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    h = dpo_logits(policy_chosen, policy_rejected, ref_chosen, ref_rejected)  # (B,)
    if loss_type == "sigmoid":
        losses = -(1 - label_smoothing) * F.logsigmoid(beta * h) - label_smoothing * F.logsigmoid(-beta * h)
    elif loss_type == "ipo":
        if label_smoothing:
            raise ValueError("label_smoothing applies to the sigmoid loss only, not to ipo")
        losses = (h - 1 / (2 * beta)) ** 2
    else:
        raise ValueError(f"unknown DPO loss_type {loss_type!r}; use 'sigmoid' or 'ipo'")
    return losses.mean()


def implicit_rewards(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    beta: float = 0.1,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``β (log π − log π_ref)`` of the chosen and of the rejected responses: (B,) each, detached."""
    chosen = beta * (policy_chosen.float() - ref_chosen.float()).detach()
    rejected = beta * (policy_rejected.float() - ref_rejected.float()).detach()
    return chosen, rejected
