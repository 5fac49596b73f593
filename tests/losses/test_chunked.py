"""Chunked cross-entropy and log-probs equal the plain ones, values and gradients."""

import pytest
import torch

from ftlab.losses.chunked import chunked_lm_loss, chunked_token_logprobs
from ftlab.losses.lm import IGNORE, masked_lm_loss
from ftlab.losses.logprobs import token_logprobs

B, T, H, V = 3, 11, 16, 37


def _inputs(seed: int, bias: bool):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, T, H, generator=g, dtype=torch.float64).float().requires_grad_()
    weight = (torch.randn(V, H, generator=g) * 0.5).requires_grad_()
    b = (torch.randn(V, generator=g) * 0.1).requires_grad_() if bias else None
    labels = torch.randint(0, V, (B, T), generator=g)
    labels[0, :4] = IGNORE  # a prompt
    labels[2, 7:] = IGNORE  # padding
    labels[1, 5] = IGNORE  # a sample start inside a packed row
    return hidden, weight, b, labels


def _grads(loss, *tensors):
    return torch.autograd.grad(loss, [t for t in tensors if t is not None], retain_graph=True)


def _plain_logits(hidden, weight, bias, scale=1.0, softcap=None):
    z = torch.nn.functional.linear(hidden, weight, bias) * scale
    return torch.tanh(z / softcap) * softcap if softcap else z


@pytest.mark.parametrize("bias,scale,softcap", [(False, 1.0, None), (True, 0.5, None), (False, 1.0, 3.0)])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_chunked_lm_loss_equals_the_plain_masked_loss_and_its_gradient(bias, scale, softcap, reduction):
    hidden, weight, b, labels = _inputs(0, bias)
    plain = masked_lm_loss(_plain_logits(hidden, weight, b, scale, softcap), labels, reduction=reduction)
    for chunk in (1, 4, 1000):  # one position per chunk, uneven chunks, one chunk
        mine = chunked_lm_loss(
            hidden, weight, labels, b, scale=scale, softcap=softcap, chunk_size=chunk, reduction=reduction
        )
        assert mine.item() == pytest.approx(plain.item(), rel=1e-5, abs=1e-6)
        for a, e in zip(_grads(mine * 1.7, hidden, weight, b), _grads(plain * 1.7, hidden, weight, b)):
            torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-6)


def test_chunked_lm_loss_gives_ignored_positions_no_gradient():
    hidden, weight, _, labels = _inputs(1, False)
    (grad,) = torch.autograd.grad(chunked_lm_loss(hidden, weight, labels, chunk_size=3), hidden)
    # position t predicts labels[t + 1]: row 0's first three and row 2's positions from 6 on predict nothing
    assert grad[0, :3].abs().sum() == 0 and grad[2, 6:].abs().sum() == 0
    assert grad[0, 3:-1].abs().sum(-1).min() > 0 and grad[:, -1].abs().sum() == 0  # the last predicts nothing
    everything_ignored = torch.full_like(labels, IGNORE)
    loss = chunked_lm_loss(hidden, weight, everything_ignored)
    assert loss.item() == 0 and torch.autograd.grad(loss, hidden)[0].abs().sum() == 0


@pytest.mark.parametrize(
    "bias,temperature,softcap", [(False, 1.0, None), (True, 0.7, None), (False, 1.3, 2.0)]
)
def test_chunked_token_logprobs_equal_token_logprobs_and_their_gradients(bias, temperature, softcap):
    hidden, weight, b, labels = _inputs(2, bias)
    tokens = labels.clamp_min(0)
    plain = token_logprobs(_plain_logits(hidden, weight, b, softcap=softcap) / temperature, tokens)  # (B, T)
    mine = chunked_token_logprobs(
        hidden, weight, tokens, b, temperature=temperature, softcap=softcap, chunk_size=5
    )
    assert mine.shape == (B, T) and mine.dtype == torch.float32
    torch.testing.assert_close(mine, plain, rtol=1e-5, atol=1e-6)
    weights = torch.randn(B, T, generator=torch.Generator().manual_seed(3))  # per-token, as PPO's advantages
    ours = _grads((mine * weights).sum(), hidden, weight, b)
    for a, e in zip(ours, _grads((plain * weights).sum(), hidden, weight, b)):
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-6)


def test_chunked_loss_in_bfloat16_stays_close_to_the_plain_one():
    hidden, weight, _, labels = _inputs(4, False)
    hidden, weight = hidden.detach().bfloat16().requires_grad_(), weight.detach().bfloat16().requires_grad_()
    plain = masked_lm_loss(_plain_logits(hidden, weight, None), labels)
    mine = chunked_lm_loss(hidden, weight, labels, chunk_size=4)
    assert mine.dtype == torch.float32 and mine.item() == pytest.approx(plain.item(), rel=1e-3)
    for a, e in zip(_grads(mine, hidden, weight), _grads(plain, hidden, weight)):
        assert a.dtype == torch.bfloat16 and float((a.float() - e.float()).norm() / e.float().norm()) < 2e-2
