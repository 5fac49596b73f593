"""Contrastive losses against values worked out by hand, including the sign of their gradients."""

import math

import pytest
import torch

from ftlab.losses import cosent_loss, cosine_regression_loss, info_nce


def _lse(*xs):
    return math.log(sum(math.exp(x) for x in xs))


# Unit vectors in 2-D, so the cosines are easy to read: cos(a1, p1) = 1, cos(a1, p2) = 0.6, ...
A = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
P = torch.tensor([[1.0, 0.0], [0.6, 0.8]])
N = torch.tensor([[-1.0, 0.0], [0.8, 0.6]])


def test_info_nce_in_batch_negatives_by_hand():
    # logits = cos / 0.5: row 1 [2.0, 1.2], row 2 [0.0, 1.6]
    expected = ((_lse(2.0, 1.2) - 2.0) + (_lse(0.0, 1.6) - 1.6)) / 2
    assert info_nce(A, P, temperature=0.5).item() == pytest.approx(expected, abs=1e-6)
    # embeddings are normalised inside: scaling them changes nothing
    assert info_nce(3 * A, 0.5 * P, temperature=0.5).item() == pytest.approx(expected, abs=1e-6)


def test_info_nce_hard_negatives_join_every_row():
    # candidates [p1, p2, n1, n2]; row 1 cosines [1, .6, -1, .8], row 2 [0, .8, 0, .6]
    row1 = _lse(2.0, 1.2, -2.0, 1.6) - 2.0
    row2 = _lse(0.0, 1.6, 0.0, 1.2) - 1.6
    assert info_nce(A, P, N, temperature=0.5).item() == pytest.approx((row1 + row2) / 2, abs=1e-6)


def test_info_nce_symmetric_averages_both_directions():
    forward = ((_lse(2.0, 1.2) - 2.0) + (_lse(0.0, 1.6) - 1.6)) / 2
    # positive -> anchors: p1 against [a1, a2] = [1, 0] -> [2, 0]; p2 against [.6, .8] -> [1.2, 1.6]
    backward = ((_lse(2.0, 0.0) - 2.0) + (_lse(1.2, 1.6) - 1.6)) / 2
    got = info_nce(A, P, temperature=0.5, symmetric=True).item()
    assert got == pytest.approx((forward + backward) / 2, abs=1e-6)


def test_info_nce_gradient_pulls_anchor_to_its_positive():
    a = A.clone().requires_grad_(True)
    loss = info_nce(a, P, N, temperature=0.5)
    loss.backward()
    step = -a.grad[0]  # descent direction for anchor 1
    assert step @ (P[0] - P[1]) > 0  # towards its positive, away from the in-batch negative
    assert step @ (P[0] - N[1]) > 0  # and away from the hard negative
    with torch.no_grad():
        assert info_nce(a - 0.1 * a.grad, P, N, temperature=0.5) < loss


def test_learnable_temperature_gets_a_gradient():
    t = torch.tensor(0.5, requires_grad=True)
    info_nce(A, P, temperature=t).backward()
    # positives already score highest, so a sharper softmax (smaller τ) lowers the loss: dL/dτ > 0
    assert t.grad is not None and t.grad > 0


def test_duplicated_positives_are_not_negatives():
    # anchors 1 and 2 share one positive text: for anchor 1, column 2 is its own positive again
    a = torch.tensor([[1.0, 0.0], [0.6, 0.8], [0.0, 1.0]])
    p = torch.tensor([[0.8, 0.6], [0.8, 0.6], [0.0, 1.0]])
    ids = torch.tensor([7, 7, 9])
    naive = info_nce(a, p, temperature=1.0)
    masked = info_nce(a, p, temperature=1.0, positive_ids=ids)

    # by hand, rows 1-2 drop the duplicate column: row i over {p_i, p3}
    def c(x, y):  # cosine of unit vectors
        return float(x @ y)

    rows = [
        _lse(c(a[0], p[0]), c(a[0], p[2])) - c(a[0], p[0]),
        _lse(c(a[1], p[1]), c(a[1], p[2])) - c(a[1], p[1]),
        _lse(c(a[2], p[2]), c(a[2], p[0])) - c(a[2], p[2]),
    ]  # row 3 counts the shared text once
    assert masked.item() == pytest.approx(sum(rows) / 3, abs=1e-6)
    assert naive > masked  # counting the copy as a negative inflates the loss
    # the masked loss equals the loss of the deduplicated candidate set for anchor 1
    assert rows[0] == pytest.approx(info_nce(a[[0]], p[[0]], p[[2]], temperature=1.0).item(), abs=1e-6)


def test_duplicated_anchor_in_symmetric_direction_and_negative_equal_to_positive():
    a = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    p = torch.tensor([[0.8, 0.6], [0.6, 0.8]])
    with_ids = info_nce(
        a,
        p,
        temperature=1.0,
        symmetric=True,
        anchor_ids=torch.tensor([1, 1]),
        positive_ids=torch.tensor([2, 3]),
    )
    assert with_ids.item() == pytest.approx(0.0, abs=1e-6)  # every row left with only its own match
    neg = torch.tensor([[0.8, 0.6], [0.0, 1.0]])
    plain = info_nce(a[:1], p[:1], neg, temperature=1.0)
    masked = info_nce(
        a[:1], p[:1], neg, temperature=1.0, positive_ids=torch.tensor([2]), negative_ids=torch.tensor([2, 5])
    )
    assert masked.item() == pytest.approx(_lse(0.8, 0.0) - 0.8, abs=1e-6) and masked < plain


def test_cosent_by_hand_and_gradient_signs():
    cos = torch.tensor([0.9, 0.2, 0.5], requires_grad=True)
    scores = torch.tensor([5.0, 0.0, 3.0])
    loss = cosent_loss(cos, scores, scale=1.0)
    # ordered pairs (0>1), (0>2), (2>1): terms cos_low - cos_high
    assert loss.item() == pytest.approx(
        math.log(1 + math.exp(-0.7) + math.exp(-0.4) + math.exp(-0.3)), abs=1e-6
    )
    loss.backward()
    assert cos.grad[0] < 0 < cos.grad[1]  # raise the best pair, lower the worst
    assert cos.grad.sum().item() == pytest.approx(0.0, abs=1e-6)  # only differences matter


def test_cosent_ties_and_scale():
    cos = torch.tensor([0.1, 0.9])
    assert cosent_loss(cos, torch.tensor([2.0, 2.0])).item() == pytest.approx(
        0.0, abs=1e-7
    )  # no ordered pair
    # wrongly ordered pair: log(1 + exp(λ·0.8))
    assert cosent_loss(cos, torch.tensor([3.0, 1.0]), scale=20.0).item() == pytest.approx(
        math.log1p(math.exp(16.0)), rel=1e-6
    )


def test_cosine_regression_by_hand():
    cos = torch.tensor([0.9, 0.1], requires_grad=True)
    loss = cosine_regression_loss(cos, torch.tensor([0.5, 0.3]))
    assert loss.item() == pytest.approx((0.4**2 + 0.2**2) / 2, abs=1e-6)
    loss.backward()
    assert cos.grad[0] > 0 > cos.grad[1]  # too high goes down, too low goes up
