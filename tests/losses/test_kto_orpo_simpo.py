"""KTO, ORPO and SimPO losses against hand-computed values, including the signs of their gradients."""

import math

import pytest
import torch

from ftlab.losses import kto_loss, kto_reference_point, log_odds, log_odds_ratio, orpo_loss, simpo_loss


def _sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def test_kto_by_hand_and_gradient_signs():
    policy = torch.tensor([-1.0, -2.0], requires_grad=True)
    ref = torch.tensor([-2.0, -1.0])  # implied rewards r = [1, -1]
    desirable = torch.tensor([True, False])
    loss, rewards = kto_loss(
        policy, ref, desirable, 0.5, beta=1.0, desirable_weight=2.0, undesirable_weight=1.0
    )
    # desirable: 2 (1 - σ(1 - 0.5)); undesirable: 1 - σ(0.5 - (-1))
    assert loss.item() == pytest.approx((2 * (1 - _sigmoid(0.5)) + (1 - _sigmoid(1.5))) / 2, abs=1e-6)
    assert rewards.tolist() == [1.0, -1.0]
    loss.backward()
    assert policy.grad[0] < 0 < policy.grad[1]  # descending raises the desirable, lowers the undesirable
    # dL/dπ_0 = -2 σ'(0.5) / 2
    assert policy.grad[0].item() == pytest.approx(-_sigmoid(0.5) * (1 - _sigmoid(0.5)), abs=1e-6)


def test_kto_reference_point_is_a_clamped_mean_without_gradient():
    policy = torch.tensor([1.0, 2.0], requires_grad=True)
    assert kto_reference_point(policy, torch.tensor([0.0, -1.0])).item() == pytest.approx(2.0)
    assert kto_reference_point(policy, torch.tensor([3.0, 4.0])).item() == 0.0  # mean -2 clamped at 0
    assert not kto_reference_point(policy, torch.zeros(2)).requires_grad
    with pytest.raises(ValueError, match="beta must be > 0"):
        kto_loss(policy, policy, torch.tensor([True, False]), 0.0, beta=0.0)


def test_orpo_by_hand_and_gradient_signs():
    chosen = torch.tensor([-0.5], requires_grad=True)
    rejected = torch.tensor([-1.0], requires_grad=True)
    odds_c = -0.5 - math.log(1 - math.exp(-0.5))
    odds_r = -1.0 - math.log(1 - math.exp(-1.0))
    assert log_odds(chosen).item() == pytest.approx(odds_c, abs=1e-6)
    assert log_odds_ratio(chosen, rejected).item() == pytest.approx(odds_c - odds_r, abs=1e-6)
    loss, nll, _ = orpo_loss(chosen, rejected, lam=0.1)
    assert nll.item() == pytest.approx(0.5)
    assert loss.item() == pytest.approx(0.5 + 0.1 * math.log1p(math.exp(-(odds_c - odds_r))), abs=1e-6)
    loss.backward()
    assert chosen.grad.item() < 0 < rejected.grad.item()
    # λ = 0 is plain SFT on the chosen responses: no gradient reaches the rejected ones
    c2, r2 = chosen.detach().requires_grad_(True), rejected.detach().requires_grad_(True)
    orpo_loss(c2, r2, lam=0.0)[0].backward()
    assert c2.grad.item() == pytest.approx(-1.0) and (r2.grad is None or r2.grad.item() == 0)
    assert torch.isfinite(log_odds(torch.tensor([0.0, -1e-9]))).all()  # probability 1: capped, not inf


def test_simpo_by_hand_and_gradient_signs():
    chosen = torch.tensor([-0.5, -2.0], requires_grad=True)
    rejected = torch.tensor([-1.0, -1.0], requires_grad=True)
    loss, rc, rr = simpo_loss(chosen, rejected, beta=2.0, gamma=0.5)
    # z = β(ℓ_c − ℓ_r) − γ = [0.5, -2.5]
    assert loss.item() == pytest.approx(
        (math.log1p(math.exp(-0.5)) + math.log1p(math.exp(2.5))) / 2, abs=1e-6
    )
    assert rc.tolist() == [-1.0, -4.0] and rr.tolist() == [-2.0, -2.0]
    loss.backward()
    assert (chosen.grad < 0).all() and (rejected.grad > 0).all()
    # dL/dℓ_c = -β σ(-z) / B
    assert chosen.grad[0].item() == pytest.approx(-2.0 * _sigmoid(-0.5) / 2, abs=1e-6)
    # the margin γ makes a tie cost more than log 2
    tie, _, _ = simpo_loss(torch.tensor([-1.0]), torch.tensor([-1.0]), beta=2.0, gamma=1.0)
    assert tie.item() == pytest.approx(math.log1p(math.e), abs=1e-6)
    smooth, _, _ = simpo_loss(torch.tensor([-1.0]), torch.tensor([-1.0]), 2.0, 1.0, label_smoothing=0.1)
    assert smooth.item() == pytest.approx(0.9 * math.log1p(math.e) + 0.1 * math.log1p(1 / math.e), abs=1e-6)
    with pytest.raises(ValueError, match="beta must be > 0"):
        simpo_loss(chosen, rejected, beta=0.0)
