"""KTO: Kahneman-Tversky optimisation on unpaired desirable / undesirable examples, as pure functions.

KTO (Ethayarajh et al., 2024, arXiv:2402.01306). Each example is one response ``y`` to a prompt
``x`` with a binary label; there is no paired alternative. With the implied reward
``r(x, y) = log π(y|x) − log π_ref(y|x)`` and a reference point ``z0`` (an estimate of
KL(π‖π_ref) over the batch, no gradient, at least 0),

    desirable:    L = λ_D (1 − σ(β (r − z0)))
    undesirable:  L = λ_U (1 − σ(β (z0 − r)))

averaged over the batch's examples. ``z0`` is the mean of ``r`` over *mismatched* pairs (each
prompt with another example's response), so it measures how far the policy has moved in general
rather than on the labelled answers. ``λ_D / λ_U`` rebalances unequal numbers of desirable and
undesirable examples (the paper keeps ``λ_D n_D / (λ_U n_U)`` in [1, 4/3]).
"""

from __future__ import annotations

import torch


def kto_reference_point(policy_mismatched: torch.Tensor, ref_mismatched: torch.Tensor) -> torch.Tensor:
    """``z0 = max(0, mean(log π − log π_ref))`` over mismatched pairs: (B,), (B,) -> scalar, no gradient."""
    return (policy_mismatched.float() - ref_mismatched.float()).mean().clamp_min(0).detach()


def kto_loss(
    policy_logps: torch.Tensor,
    ref_logps: torch.Tensor,
    desirable: torch.Tensor,
    reference_point: torch.Tensor | float,
    beta: float = 0.1,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean KTO loss over a batch of labelled examples.

    Args:
        policy_logps: (B,) log π(y|x) of each example's response (with gradient).
        ref_logps: (B,) log π_ref(y|x) of the same responses.
        desirable: (B,) bool, True for desirable examples.
        reference_point: z0, a scalar (see ``kto_reference_point``); it gets no gradient.
        beta: β, the sharpness of the value function (TRL's default 0.1).
        desirable_weight: λ_D.
        undesirable_weight: λ_U.

    Returns ``(loss, rewards)``: a scalar and the (B,) detached implied rewards ``β r``.
    """
    if beta <= 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    r = policy_logps.float() - ref_logps.float()  # (B,)
    z0 = torch.as_tensor(reference_point, dtype=r.dtype, device=r.device).detach()
    good = desirable_weight * (1 - torch.sigmoid(beta * (r - z0)))
    bad = undesirable_weight * (1 - torch.sigmoid(beta * (z0 - r)))
    losses = torch.where(desirable.bool(), good, bad)
    return losses.mean(), (beta * r).detach()
