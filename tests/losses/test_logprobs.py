"""The one per-token log-prob function every preference and RL objective uses."""

import math

import pytest
import torch

from ftlab.losses import entropy_from_logits, sequence_logprobs, token_logprobs


def test_token_logprobs_match_log_softmax_and_divide_by_the_temperature():
    logits = torch.randn(2, 3, 7, generator=torch.Generator().manual_seed(0))
    tokens = torch.tensor([[0, 6, 3], [1, 1, 2]])
    expected = torch.log_softmax(logits, -1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    assert torch.allclose(token_logprobs(logits, tokens), expected, atol=1e-6)
    hot = torch.log_softmax(logits / 0.5, -1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    assert torch.allclose(token_logprobs(logits, tokens, temperature=0.5), hot, atol=1e-6)
    assert token_logprobs(logits.bfloat16(), tokens).dtype == torch.float32
    assert torch.allclose(entropy_from_logits(torch.zeros(2, 5, 4)), torch.full((2, 5), math.log(4)))


def test_sequence_logprobs_count_labelled_tokens_only():
    logits = torch.zeros(1, 4, 4)  # uniform: every token has log-prob -log 4
    logits[0, 1, 2] = math.log(3.0)  # position 1 predicts token 2 with probability 3/6
    labels = torch.tensor([[-100, -100, 2, 1]])  # the last two tokens count
    total = sequence_logprobs(logits, labels)
    assert total.item() == pytest.approx(math.log(0.5) + math.log(0.25), abs=1e-6)
    assert sequence_logprobs(logits, labels, average=True).item() == pytest.approx(total.item() / 2, abs=1e-6)
