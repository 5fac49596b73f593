"""DPO and IPO losses against hand-computed values."""

import math

import pytest
import torch

from ftlab.losses import dpo_logits, dpo_loss, implicit_rewards

PC, PR = torch.tensor([-1.0, -2.0]), torch.tensor([-3.0, -1.0])  # policy log-probs: chosen, rejected
RC, RR = torch.tensor([-2.0, -2.0]), torch.tensor([-2.0, -2.0])  # reference log-probs
# h = (pc - pr) - (rc - rr) = [2, -1]


def _log1pexp(x: float) -> float:
    return math.log1p(math.exp(x))


def test_sigmoid_loss_by_hand_and_gradient():
    pc = PC.clone().requires_grad_(True)
    assert dpo_logits(pc, PR, RC, RR).tolist() == [2.0, -1.0]
    loss = dpo_loss(pc, PR, RC, RR, beta=0.5)
    # -log σ(βh) = log(1 + e^{-βh}): βh = [1, -0.5]
    assert loss.item() == pytest.approx((_log1pexp(-1.0) + _log1pexp(0.5)) / 2, abs=1e-6)
    loss.backward()
    # dL/dpc_i = -β σ(-βh_i) / B
    expected = [-0.5 / (1 + math.exp(1.0)) / 2, -0.5 / (1 + math.exp(-0.5)) / 2]
    assert pc.grad.tolist() == pytest.approx(expected, abs=1e-6)


def test_label_smoothing_and_ipo_by_hand():
    smooth = dpo_loss(PC, PR, RC, RR, beta=0.5, label_smoothing=0.1)
    by_hand = [0.9 * _log1pexp(-b) + 0.1 * _log1pexp(b) for b in (1.0, -0.5)]
    assert smooth.item() == pytest.approx(sum(by_hand) / 2, abs=1e-6)
    # IPO: (h - 1/(2β))² = (2 - 1)², (-1 - 1)²
    assert dpo_loss(PC, PR, RC, RR, beta=0.5, loss_type="ipo").item() == pytest.approx(2.5)


def test_implicit_rewards_and_zero_gap_is_log2():
    chosen, rejected = implicit_rewards(PC, PR, RC, RR, beta=0.5)
    assert chosen.tolist() == [0.5, 0.0] and rejected.tolist() == [-0.5, 0.5]
    assert dpo_loss(RC, RR, RC, RR).item() == pytest.approx(math.log(2))  # policy == reference


def test_bad_arguments():
    with pytest.raises(ValueError, match="beta must be > 0"):
        dpo_loss(PC, PR, RC, RR, beta=0.0)
    with pytest.raises(ValueError, match="unknown DPO loss_type"):
        dpo_loss(PC, PR, RC, RR, loss_type="hinge")
    with pytest.raises(ValueError, match="sigmoid loss only"):
        dpo_loss(PC, PR, RC, RR, loss_type="ipo", label_smoothing=0.1)
