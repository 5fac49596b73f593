"""Bradley-Terry loss against hand-computed values and gradient signs."""

import math

import pytest
import torch

from ftlab.losses import bradley_terry_loss, pairwise_accuracy


def test_bradley_terry_by_hand_and_gradient_signs():
    chosen = torch.tensor([2.0, 0.0], requires_grad=True)
    rejected = torch.tensor([1.0, 1.0], requires_grad=True)
    loss = bradley_terry_loss(chosen, rejected)
    assert loss.item() == pytest.approx(
        (math.log1p(math.exp(-1.0)) + math.log1p(math.exp(1.0))) / 2, abs=1e-6
    )
    loss.backward()
    assert (chosen.grad < 0).all() and (rejected.grad > 0).all()
    # dL/dr_c = -σ(-(r_c - r_r)) / B
    assert chosen.grad[0].item() == pytest.approx(-1 / (1 + math.exp(1.0)) / 2, abs=1e-6)
    assert torch.allclose(chosen.grad, -rejected.grad)


def test_margin_shifts_the_gap():
    c, r = torch.tensor([1.5, -0.5]), torch.tensor([0.5, 0.5])
    assert bradley_terry_loss(c, r, 1.0).item() == pytest.approx(
        bradley_terry_loss(c - 1.0, r).item(), abs=1e-7
    )
    per_pair = torch.tensor([0.0, 2.0])
    expected = (math.log1p(math.exp(-1.0)) + math.log1p(math.exp(3.0))) / 2
    assert bradley_terry_loss(c, r, per_pair).item() == pytest.approx(expected, abs=1e-6)
    assert bradley_terry_loss(c, r, 1.0) > bradley_terry_loss(c, r)


def test_large_gaps_stay_finite_and_accuracy_counts_ties_as_wrong():
    assert bradley_terry_loss(torch.tensor([-500.0]), torch.tensor([500.0])).item() == pytest.approx(1000.0)
    assert bradley_terry_loss(torch.tensor([500.0]), torch.tensor([-500.0])).item() == pytest.approx(0.0)
    assert pairwise_accuracy(
        torch.tensor([1.0, 2.0, 0.0]), torch.tensor([0.0, 2.0, 1.0])
    ).item() == pytest.approx(1 / 3)
