"""PPO pieces against hand-computed values: GAE, whitening, clipped losses, KL control."""

import math

import pytest
import torch

from ftlab.losses import (
    KLController,
    adaptive_kl_coef,
    clip_rewards,
    entropy_from_logits,
    explained_variance,
    gae,
    kl_penalty_rewards,
    masked_mean,
    masked_whiten,
    ppo_policy_loss,
    ppo_value_loss,
    token_logprobs,
)


def close(actual: torch.Tensor, expected) -> bool:
    return torch.allclose(actual.float(), torch.tensor(expected, dtype=torch.float), atol=1e-6)


def test_gae_by_hand_with_a_masked_tail():
    rewards = torch.tensor([[0.0, 0.0, 1.0], [0.5, 0.0, 0.0]])
    values = torch.tensor([[0.5, 0.2, 0.1], [0.3, 0.4, 9.9]])  # 9.9 sits on padding: ignored
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    adv, ret = gae(rewards, values, mask, gamma=0.9, lam=0.5)
    # row 0: δ = [0 + .9·.2 - .5, 0 + .9·.1 - .2, 1 - .1] = [-.32, -.11, .9]; A_t = δ_t + .45 A_{t+1}
    # row 1: the episode ends after t=1, so V(2) counts as 0: δ = [.5 + .9·.4 - .3, -.4]
    expected = torch.tensor([[-0.32 + 0.45 * 0.295, -0.11 + 0.45 * 0.9, 0.9], [0.56 - 0.45 * 0.4, -0.4, 0.0]])
    assert torch.allclose(adv, expected, atol=1e-6)
    assert torch.allclose(ret, (expected + values) * mask, atol=1e-6)
    # λ = 1, γ = 1: advantages are reward-to-go minus the value
    adv1, _ = gae(rewards, values, mask, gamma=1.0, lam=1.0)
    assert torch.allclose(adv1[0], torch.tensor([1 - 0.5, 1 - 0.2, 1 - 0.1]), atol=1e-6)


def test_whitening_uses_unmasked_values_only():
    x = torch.tensor([[1.0, 2.0, 3.0, 100.0]])
    mask = torch.tensor([[1, 1, 1, 0]])
    # mean 2, unbiased variance ((1)² + 0 + 1²) / 2 = 1
    assert close(masked_whiten(x, mask), [[-1.0, 0.0, 1.0, 0.0]])
    assert close(masked_whiten(x, mask, shift_mean=False), [[1.0, 2.0, 3.0, 0.0]])
    assert masked_mean(x, mask).item() == pytest.approx(2.0)


def test_clipped_policy_loss_by_hand():
    old = torch.zeros(1, 3)
    logp = torch.log(torch.tensor([[1.5, 0.5, 1.1]])).requires_grad_(True)  # ratios 1.5, 0.5, 1.1
    adv = torch.tensor([[1.0, 1.0, -1.0]])
    mask = torch.ones(1, 3)
    loss, clip_frac, approx_kl = ppo_policy_loss(logp, old, adv, mask, cliprange=0.2)
    # token 0: max(-1.5, -1.2) = -1.2 (clipped); token 1: max(-0.5, -0.8) = -0.5; token 2: max(1.1, 1.1)
    assert loss.item() == pytest.approx((-1.2 - 0.5 + 1.1) / 3, abs=1e-6)
    assert clip_frac.item() == pytest.approx(1 / 3)
    squares = math.log(1.5) ** 2 + math.log(0.5) ** 2 + math.log(1.1) ** 2
    assert approx_kl.item() == pytest.approx(0.5 * squares / 3, abs=1e-6)
    loss.backward()
    # the clipped token gets no gradient; the others get -A·ρ / n
    assert close(logp.grad, [[0.0, -0.5 / 3, 1.1 / 3]])
    # a pessimistic clip on the other side: A < 0 and ρ = 0.5 -> max(0.5, 0.8) = 0.8, no gradient
    low = torch.log(torch.tensor([[0.5]])).requires_grad_(True)
    neg, frac, _ = ppo_policy_loss(low, torch.zeros(1, 1), torch.tensor([[-1.0]]), torch.ones(1, 1), 0.2)
    neg.backward()
    assert neg.item() == pytest.approx(0.8) and frac.item() == 1.0 and low.grad.item() == 0.0


def test_masked_tokens_do_not_count_in_the_policy_loss():
    logp = torch.tensor([[0.1, 5.0]])
    loss, _, _ = ppo_policy_loss(logp, torch.zeros(1, 2), torch.ones(1, 2), torch.tensor([[1, 0]]), 0.2)
    assert loss.item() == pytest.approx(-math.exp(0.1))


def test_clipped_value_loss_by_hand():
    values = torch.tensor([[1.0, 0.0]])
    old = torch.tensor([[0.5, 0.5]])
    returns = torch.tensor([[1.0, 1.0]])
    loss, clip_frac = ppo_value_loss(values, old, returns, torch.ones(1, 2), cliprange_value=0.2)
    # v0: clipped to 0.7 -> max(0, 0.09); v1: clipped to 0.3 -> max(1, 0.49)
    assert loss.item() == pytest.approx(0.5 * (0.09 + 1.0) / 2, abs=1e-6)
    assert clip_frac.item() == pytest.approx(0.5)


def test_kl_penalty_rewards_put_the_score_on_the_last_real_token():
    scores = torch.tensor([2.0, -1.0])
    logp = torch.tensor([[-1.0, -2.0, -3.0], [-1.0, -1.0, 0.0]])
    ref = torch.tensor([[-1.5, -2.0, -2.0], [-0.5, -1.0, -7.0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    rewards, kl = kl_penalty_rewards(scores, logp, ref, mask, kl_coef=0.1)
    assert close(kl, [[0.5, 0.0, -1.0], [-0.5, 0.0, 0.0]])
    assert close(rewards, [[-0.05, 0.0, 2.1], [0.05, -1.0, 0.0]])
    assert clip_rewards(torch.tensor([-20.0, 5.0, 20.0]), 10.0).tolist() == [-10.0, 5.0, 10.0]
    assert clip_rewards(torch.tensor([-20.0]), None).tolist() == [-20.0]


def test_adaptive_kl_controller_by_hand():
    # error clip(8/6 - 1, ±0.2) = 0.2 -> 0.1 · (1 + 0.2 · 32/1000)
    assert adaptive_kl_coef(0.1, 8.0, 32, 6.0, 1000) == pytest.approx(0.1 * 1.0064)
    # error 5.4/6 - 1 = -0.1 -> 0.1 · (1 - 0.1 · 0.032)
    assert adaptive_kl_coef(0.1, 5.4, 32, 6.0, 1000) == pytest.approx(0.1 * 0.9968)
    ctl = KLController(0.1, target=6.0, horizon=1000)
    for _ in range(3):
        ctl.update(100.0, 32)
    assert ctl.value == pytest.approx(0.1 * 1.0064**3)
    fixed = KLController(0.1, target=None)
    assert fixed.update(100.0, 32) == 0.1
    with pytest.raises(ValueError, match="target must be > 0"):
        KLController(0.1, target=0.0)


def test_explained_variance_entropy_and_token_logprobs():
    mask = torch.ones(1, 3)
    returns = torch.tensor([[1.0, 2.0, 3.0]])
    assert explained_variance(returns, returns, mask).item() == pytest.approx(1.0)
    assert explained_variance(torch.full((1, 3), 2.0), returns, mask).item() == pytest.approx(0.0)
    assert close(entropy_from_logits(torch.zeros(2, 5, 4)), [[math.log(4)] * 5] * 2)
    logits = torch.randn(2, 3, 7, generator=torch.Generator().manual_seed(0))
    tokens = torch.tensor([[0, 6, 3], [1, 1, 2]])
    expected = torch.log_softmax(logits, -1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    assert torch.allclose(token_logprobs(logits, tokens), expected)
