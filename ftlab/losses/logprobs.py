"""Per-token log-probabilities of a causal LM: the one place every preference and RL objective gets them.

DPO, IPO, KTO, ORPO, SimPO, PPO, GRPO and RLOO all need ``log π(y_t | x, y_<t)`` of given tokens.
They all call ``token_logprobs`` (through ``ftlab.rollouts`` and ``ftlab.preference_logps``), so a
cheaper way to compute it (e.g. chunked over the vocabulary, without the full (B, T, V) fp32
log-softmax) changes this file and nothing else.

    log π(y_t) = z_t[y_t] / τ − logsumexp(z_t / τ)        (z: logits, τ: sampling temperature)
"""

from __future__ import annotations

import torch

IGNORE = -100


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """log p(token) under ``logits / temperature``: (B, R, V), (B, R) -> (B, R), in fp32.

    ``logits[:, t]`` must be the scores *for* ``tokens[:, t]`` (already shifted by the caller).
    Token ids < 0 (``-100`` labels) are read as 0; the caller masks those positions.
    """
    logits = logits.float()
    if temperature != 1.0:
        logits = logits / temperature
    # gather then logsumexp: the same value as log_softmax(...).gather(...) without a second (B, R, V) tensor
    picked = logits.gather(-1, tokens.clamp_min(0).unsqueeze(-1)).squeeze(-1)  # (B, R)
    return picked - torch.logsumexp(logits, dim=-1)


def entropy_from_logits(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Entropy of the categorical distribution at each position: (B, R, V) -> (B, R), fp32."""
    logits = logits.float()
    if temperature != 1.0:
        logits = logits / temperature
    p = torch.softmax(logits, dim=-1)
    return torch.logsumexp(logits, dim=-1) - (p * logits).sum(-1)


def sequence_logprobs(logits: torch.Tensor, labels: torch.Tensor, average: bool = False) -> torch.Tensor:
    """Sum (or mean) over labelled tokens of each sequence's log-probability.

    Args:
        logits: (N, T, V) causal-LM logits; position t scores token t + 1.
        labels: (N, T) token ids, ``-100`` on positions that do not count (prompt, padding).
        average: Divide by the number of labelled tokens (length-normalised, as IPO, ORPO, SimPO use).

    Returns (N,) fp32.
    """
    target = labels[:, 1:]  # (N, T-1)
    keep = (target != IGNORE).float()
    picked = token_logprobs(logits[:, :-1], target) * keep  # (N, T-1)
    total = picked.sum(-1)
    return total / keep.sum(-1).clamp_min(1) if average else total
