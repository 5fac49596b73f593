"""GRPO/RLOO pieces against hand-computed values: group advantages, k3 KL, clipped loss, gradient signs."""

import math

import pytest
import torch

from ftlab.losses import aggregate, clipped_policy_loss, group_advantages, k3_kl, leave_one_out_advantages


def test_group_advantages_by_hand():
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 2.0, 2.0, 2.0, 2.0])  # two groups of 4
    std = math.sqrt(4 * 0.25 / 3)  # unbiased std of [1, 0, 0, 1]
    expected = [0.5 / (std + 1e-4), -0.5 / (std + 1e-4)] * 2
    adv = group_advantages(rewards, 4)
    assert adv[:4].tolist() == pytest.approx([expected[0], expected[1], expected[1], expected[0]], abs=1e-5)
    assert adv[4:].tolist() == [0.0] * 4  # all equal: nothing to learn, not 0/0
    assert group_advantages(rewards, 4, scale=False)[:4].tolist() == [0.5, -0.5, -0.5, 0.5]  # Dr. GRPO


def test_leave_one_out_advantages_by_hand():
    adv = leave_one_out_advantages(torch.tensor([1.0, 0.0, 0.0, 1.0, 3.0, 1.0]), 2)
    # groups [1, 0], [0, 1], [3, 1]: each reward minus the other one
    assert adv.tolist() == [1.0, -1.0, -1.0, 1.0, 2.0, -2.0]
    four = leave_one_out_advantages(torch.tensor([1.0, 0.0, 0.0, 1.0]), 4)
    # r_0 - (0 + 0 + 1) / 3 = 2/3 = G/(G-1) (r_0 - mean)
    assert four.tolist() == pytest.approx([2 / 3, -2 / 3, -2 / 3, 2 / 3])


def test_groups_of_one_and_ragged_batches_are_refused():
    with pytest.raises(ValueError, match="group_size >= 2"):
        group_advantages(torch.ones(4), 1)
    with pytest.raises(ValueError, match="group_size >= 2"):
        leave_one_out_advantages(torch.ones(4), 1)
    with pytest.raises(ValueError, match="multiple of group_size=4"):
        group_advantages(torch.ones(6), 4)


def test_k3_kl_by_hand_and_its_gradient_pulls_towards_the_reference():
    logp = torch.log(torch.tensor([[0.5, 0.2]])).requires_grad_(True)
    ref = torch.log(torch.tensor([[0.25, 0.2]]))
    kl = k3_kl(logp, ref)
    # d = log(0.25/0.5): e^d - d - 1 = 0.5 + log 2 - 1; equal probabilities give 0
    assert kl.tolist()[0] == pytest.approx([0.5 + math.log(2) - 1, 0.0], abs=1e-6)
    kl.sum().backward()
    assert logp.grad[0, 0] > 0 and logp.grad[0, 1] == 0  # descending lowers log π towards log π_ref
    assert (k3_kl(torch.randn(3, 5), torch.randn(3, 5)) >= 0).all()


def test_clipped_loss_with_one_advantage_per_response_by_hand():
    logp = torch.log(torch.tensor([[1.5, 0.5], [1.0, 1.0]])).requires_grad_(True)  # ratios (old log-probs 0)
    old = torch.zeros(2, 2)
    adv = torch.tensor([1.0, -1.0])
    mask = torch.tensor([[1, 1], [1, 0]])
    # row 0 (A = 1): max(-1.5, -1.2) = -1.2 (clipped), max(-0.5, -0.8) = -0.5; row 1 (A = -1): 1, masked
    seq, frac, _ = clipped_policy_loss(logp, old, adv, mask, 0.2, "sequence")
    assert seq.item() == pytest.approx(((-1.2 - 0.5) / 2 + 1.0) / 2, abs=1e-6)
    assert frac.item() == pytest.approx(1 / 3)
    tok, _, _ = clipped_policy_loss(logp, old, adv, mask, 0.2, "token")
    assert tok.item() == pytest.approx((-1.2 - 0.5 + 1.0) / 3, abs=1e-6)
    tok.backward()
    # the clipped token gets no gradient; positive advantage -> raise log π; negative -> lower it
    assert logp.grad[0, 0] == 0 and logp.grad[0, 1] < 0 and logp.grad[1, 0] > 0 and logp.grad[1, 1] == 0


def test_aggregate_by_hand():
    x = torch.tensor([[1.0, 3.0, 100.0], [2.0, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    assert aggregate(x, mask, "token").item() == pytest.approx(2.0)  # (1 + 3 + 2) / 3
    assert aggregate(x, mask, "sequence").item() == pytest.approx(2.0)  # (2 + 2) / 2
    x[1, 0] = 5.0
    assert aggregate(x, mask, "token").item() == pytest.approx(3.0)
    assert aggregate(x, mask, "sequence").item() == pytest.approx(3.5)
    with pytest.raises(ValueError, match="unknown aggregation"):
        aggregate(x, mask, "mean")
