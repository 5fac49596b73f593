"""PPO for language models, as pure functions over per-token tensors.

PPO (Schulman et al., 2017, arXiv:1707.06347) applied to text as in Ziegler et al. (2019,
arXiv:1909.08593) and InstructGPT (Ouyang et al., 2022). A rollout is a prompt and a sampled
response of R tokens; tensors are (B, R) over response tokens, with ``mask`` 1 on real tokens
(up to and including the first EOS) and 0 on padding after it.

    reward     r_t = −β (log π_old(a_t) − log π_ref(a_t)) + [t = last] · clip(score, ±c_r)
    GAE        δ_t = r_t + γ V(t+1) − V(t),   A_t = δ_t + γλ A_{t+1},   returns R_t = A_t + V(t)
    policy     ρ_t = π(a_t) / π_old(a_t),     L_pg = mean max(−A_t ρ_t, −A_t clip(ρ_t, 1 ± ε))
    value      V̂_t = V_old(t) + clip(V(t) − V_old(t), ± ε_v),   L_v = ½ mean max((V − R)², (V̂ − R)²)
    KL coef    β ← β (1 + clip(KL / target − 1, ±0.2) · n / horizon)      (adaptive controller)

Means are over unmasked tokens of the whole batch.
"""

from __future__ import annotations

import torch


# ---------------------------------------------------------------------------------- masked stats
def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of ``x`` over positions where ``mask`` is 1: (B, R), (B, R) -> scalar, or (B,) with dim=1."""
    mask = mask.to(x.dtype)
    if dim is None:
        return (x * mask).sum() / mask.sum().clamp_min(1)
    return (x * mask).sum(dim) / mask.sum(dim).clamp_min(1)


def masked_var(x: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    """Variance of the unmasked values of ``x`` (Bessel-corrected when ``unbiased``): a scalar."""
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    n = mask.sum()
    if unbiased and n > 1:
        var = var * n / (n - 1)
    return var


def masked_whiten(
    x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8
) -> torch.Tensor:
    """``(x − mean) / sqrt(var + eps)`` over unmasked positions (mean added back unless ``shift_mean``).

    (B, R) -> (B, R); masked positions come back as 0. Whitening advantages keeps the policy
    step size independent of the reward's scale.
    """
    mean, var = masked_mean(x, mask), masked_var(x, mask)
    out = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return out * mask.to(x.dtype)


# ---------------------------------------------------------------------------------- rewards
def clip_rewards(scores: torch.Tensor, cliprange_reward: float | None) -> torch.Tensor:
    """Scores clamped to ``[−c, c]`` (``None`` or 0 leaves them): (B,) -> (B,)."""
    if not cliprange_reward:
        return scores
    return scores.clamp(-cliprange_reward, cliprange_reward)


def kl_penalty_rewards(
    scores: torch.Tensor,
    logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    mask: torch.Tensor,
    kl_coef: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token rewards: ``−kl_coef · KL_t`` everywhere, plus the sequence score on the last real token.

    Args:
        scores: (B,) reward-model or reward-function scores (already clipped).
        logprobs: (B, R) log π_old of the sampled tokens.
        ref_logprobs: (B, R) log π_ref of the same tokens.
        mask: (B, R) 1 on real response tokens.
        kl_coef: β, the KL penalty coefficient.

    Returns ``(rewards, kl)``, both (B, R) and zero where masked; ``kl`` is the per-token estimate
    ``log π_old − log π_ref`` (its sum over a response is an unbiased sample of KL(π‖π_ref)).
    """
    m = mask.to(logprobs.dtype)
    kl = (logprobs - ref_logprobs) * m  # (B, R)
    rewards = -kl_coef * kl
    positions = torch.arange(mask.size(1), device=mask.device)  # (R,)
    last = (mask.long() * positions).argmax(dim=1)  # (B,) last real token
    rewards[torch.arange(mask.size(0), device=mask.device), last] += scores.to(rewards.dtype)
    return rewards, kl


# ---------------------------------------------------------------------------------- advantages
def gae(
    rewards: torch.Tensor,
    values: torch.Tensor,
    mask: torch.Tensor,
    gamma: float = 1.0,
    lam: float = 0.95,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation (Schulman et al., 2016, arXiv:1506.02438).

    Args:
        rewards: (B, R) per-token rewards.
        values: (B, R) value estimates V(t) of the state before token t.
        mask: (B, R) 1 on real tokens; the value after the last real token is 0 (episode ends).
        gamma: Discount.
        lam: GAE λ (0: one-step TD; 1: Monte-Carlo returns minus the value).

    Returns ``(advantages, returns)``, (B, R) each, no gradient, zero where masked.
    """
    m = mask.to(values.dtype)
    rewards, values = (rewards * m).detach(), (values * m).detach()
    R = rewards.size(1)
    advantages = torch.zeros_like(rewards)
    running = torch.zeros_like(rewards[:, 0])  # A_{t+1}
    for t in reversed(range(R)):
        next_value = values[:, t + 1] if t + 1 < R else torch.zeros_like(running)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        running = (delta + gamma * lam * running) * m[:, t]
        advantages[:, t] = running
    return advantages, (advantages + values) * m


# ---------------------------------------------------------------------------------- losses
def ppo_policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    cliprange: float = 0.2,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Clipped surrogate objective.

    Args:
        logprobs: (B, R) log π of the sampled tokens now (with gradient).
        old_logprobs: (B, R) log π_old when they were sampled.
        advantages: (B, R), usually whitened.
        mask: (B, R) 1 on real tokens.
        cliprange: ε; the ratio is clipped to ``[1 − ε, 1 + ε]``.

    Returns ``(loss, clip_frac, approx_kl)``: scalars; ``clip_frac`` is the share of tokens where
    the clipped term was the active one, ``approx_kl`` is ``½ mean (log π − log π_old)²``.
    """
    log_ratio = logprobs - old_logprobs  # (B, R)
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1.0 - cliprange, 1.0 + cliprange)
    loss = masked_mean(torch.maximum(unclipped, clipped), mask)
    clip_frac = masked_mean((clipped > unclipped).float(), mask).detach()
    approx_kl = 0.5 * masked_mean(log_ratio.detach() ** 2, mask)
    return loss, clip_frac, approx_kl


def ppo_value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    cliprange_value: float = 0.2,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Clipped value loss: the new value may not move more than ``cliprange_value`` from the old.

    Args:
        values: (B, R) value-head outputs now (with gradient).
        old_values: (B, R) value-head outputs at rollout time.
        returns: (B, R) GAE returns (targets).
        mask: (B, R) 1 on real tokens.
        cliprange_value: ε_v, in the reward's units.

    Returns ``(loss, clip_frac)``: scalars.
    """
    clipped = old_values + (values - old_values).clamp(-cliprange_value, cliprange_value)
    err, err_clipped = (values - returns) ** 2, (clipped - returns) ** 2
    loss = 0.5 * masked_mean(torch.maximum(err, err_clipped), mask)
    clip_frac = masked_mean((err_clipped > err).float(), mask).detach()
    return loss, clip_frac


def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``1 − Var[R − V] / Var[R]`` over unmasked tokens: 1 is a perfect critic, ≤ 0 a useless one."""
    var_returns = masked_var(returns, mask)
    return 1.0 - masked_var(returns - values, mask) / var_returns.clamp_min(1e-8)


# ---------------------------------------------------------------------------------- KL control
def adaptive_kl_coef(kl_coef: float, current_kl: float, n_steps: int, target: float, horizon: int) -> float:
    """One update of the adaptive KL controller (Ziegler et al., 2019).

    The proportional error ``clip(KL / target − 1, ±0.2)`` moves ``kl_coef`` by the fraction
    ``n_steps / horizon`` of itself: up when the policy drifts further than ``target`` nats from the
    reference, down when it stays closer.
    """
    error = min(max(current_kl / target - 1.0, -0.2), 0.2)
    return kl_coef * (1.0 + error * n_steps / horizon)


class KLController:
    """The KL coefficient β: adaptive towards ``target`` nats, or fixed when ``target`` is None.

    Args:
        init_kl_coef: Starting β.
        target: KL (nats per response, summed over tokens) to steer towards; None keeps β fixed.
        horizon: Rollouts over which a full proportional correction is applied.
    """

    def __init__(self, init_kl_coef: float = 0.05, target: float | None = 6.0, horizon: int = 10000):
        if init_kl_coef < 0:
            raise ValueError(f"init_kl_coef must be >= 0, got {init_kl_coef}")
        if target is not None and target <= 0:
            raise ValueError(f"KL target must be > 0 (or null for a fixed coefficient), got {target}")
        if horizon <= 0:
            raise ValueError(f"KL horizon must be > 0, got {horizon}")
        self.value, self.target, self.horizon = float(init_kl_coef), target, horizon

    def update(self, current_kl: float, n_steps: int) -> float:
        if self.target is not None:
            self.value = adaptive_kl_coef(self.value, current_kl, n_steps, self.target, self.horizon)
        return self.value
