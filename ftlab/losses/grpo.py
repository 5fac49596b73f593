"""Critic-free policy gradients with group baselines: GRPO and RLOO, as pure functions.

Each prompt gets G sampled responses (a *group*; rows ``g·G … g·G + G − 1`` of a batch) with
sequence rewards ``r_1 … r_G``. No value head: the group itself is the baseline.

    GRPO  (Shao et al., 2024, arXiv:2402.03300)      A_i = (r_i − mean_j r_j) / (std_j r_j + eps)
          (Dr. GRPO, Liu et al., 2025, drops the std: ``scale=False``)
    RLOO  (Ahmadian et al., 2024, arXiv:2402.14740)  A_i = r_i − 1/(G−1) Σ_{j≠i} r_j

Every token of response i gets A_i. The policy loss is PPO's clipped surrogate on the sampled
tokens, ``max(−A ρ_t, −A clip(ρ_t, 1 ± ε))``, averaged per token over the batch (``token``, as
DAPO) or per response then over responses (``sequence``, as the GRPO paper). The KL to the
reference is either a loss term with the k3 estimator (GRPO),

    k3_t = π_ref/π − log(π_ref/π) − 1   (≥ 0, unbiased for KL(π‖π_ref); Schulman, 2020)

or subtracted from the reward before the baseline (RLOO): ``r_i ← r_i − β Σ_t (log π − log π_ref)``.
"""

from __future__ import annotations

from typing import Literal

import torch

Aggregation = Literal["token", "sequence"]


def _groups(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    if group_size < 2:
        raise ValueError(f"a group baseline needs group_size >= 2 samples per prompt, got {group_size}")
    if rewards.dim() != 1 or rewards.numel() % group_size:
        raise ValueError(
            f"rewards must be (N,) with N a multiple of group_size={group_size}, got {tuple(rewards.shape)}"
        )
    return rewards.float().view(-1, group_size)  # (P, G)


def group_advantages(
    rewards: torch.Tensor, group_size: int, scale: bool = True, eps: float = 1e-4
) -> torch.Tensor:
    """GRPO: each reward minus its group's mean, divided by the group's std when ``scale``.

    (N,) rewards with N = prompts × group_size, grouped contiguously -> (N,) advantages. A group
    whose rewards are all equal gets advantages 0 (nothing to learn from it), not 0/0.
    """
    r = _groups(rewards, group_size)
    centred = r - r.mean(1, keepdim=True)  # (P, G)
    if scale:
        centred = centred / (r.std(1, keepdim=True) + eps)
    return centred.flatten()


def leave_one_out_advantages(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """RLOO: each reward minus the mean of the *other* rewards of its group: (N,) -> (N,).

    The baseline does not depend on the sample it is subtracted from, so the estimate stays
    unbiased; ``A_i = G/(G−1) · (r_i − mean_j r_j)``.
    """
    r = _groups(rewards, group_size)
    baseline = (r.sum(1, keepdim=True) - r) / (group_size - 1)  # (P, G)
    return (r - baseline).flatten()


def k3_kl(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """Per-token k3 estimate of KL(π‖π_ref): ``exp(d) − d − 1`` with ``d = log π_ref − log π``.

    (B, R), (B, R) -> (B, R), ≥ 0 everywhere. Its gradient pulls ``log π`` towards ``log π_ref``.
    """
    d = ref_logprobs.float() - logprobs.float()
    return torch.exp(d) - d - 1.0


def aggregate(x: torch.Tensor, mask: torch.Tensor, how: Aggregation = "token") -> torch.Tensor:
    """Mean of (B, R) ``x`` over unmasked tokens: of the whole batch (``token``) or per response,
    then over responses (``sequence``). Returns a scalar."""
    m = mask.to(x.dtype)
    if how == "token":
        return (x * m).sum() / m.sum().clamp_min(1)
    if how == "sequence":
        return ((x * m).sum(1) / m.sum(1).clamp_min(1)).mean()
    raise ValueError(f"unknown aggregation {how!r}; use 'token' or 'sequence'")


def clipped_policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    cliprange: float = 0.2,
    how: Aggregation = "token",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """PPO's clipped surrogate with one advantage per response.

    Args:
        logprobs: (B, R) log π of the sampled tokens now (with gradient).
        old_logprobs: (B, R) log π_old when they were sampled.
        advantages: (B,) per response (or (B, R) per token).
        mask: (B, R) 1 on real response tokens.
        cliprange: ε; the ratio is clipped to ``[1 − ε, 1 + ε]``.
        how: ``token`` or ``sequence`` aggregation (see ``aggregate``).

    Returns ``(loss, clip_frac, approx_kl)``: scalars; ``approx_kl`` is ``½ mean (log π − log π_old)²``.
    """
    adv = advantages.float()
    if adv.dim() == 1:
        adv = adv[:, None].expand_as(logprobs)  # (B, R)
    log_ratio = logprobs - old_logprobs
    ratio = torch.exp(log_ratio)
    unclipped = -adv * ratio
    clipped = -adv * ratio.clamp(1.0 - cliprange, 1.0 + cliprange)
    loss = aggregate(torch.maximum(unclipped, clipped), mask, how)
    clip_frac = aggregate((clipped > unclipped).float(), mask, "token").detach()
    approx_kl = 0.5 * aggregate(log_ratio.detach() ** 2, mask, "token")
    return loss, clip_frac, approx_kl
