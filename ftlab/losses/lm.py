"""Causal language-modelling loss on labelled positions only."""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

IGNORE = -100


def masked_lm_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    reduction: Literal["mean", "sum"] = "mean",
) -> torch.Tensor:
    """Next-token cross-entropy over positions whose label is not ``-100``: their mean (or sum).

    Args:
        logits: (B, T, V) scores for the token at each position's successor.
        labels: (B, T) token ids; ``-100`` marks prompt and padding positions.
        reduction: ``mean`` over the labelled positions, or their ``sum``.

    Returns a scalar. Position t predicts ``labels[:, t + 1]``; fp32 for a stable log-softmax.
    ``ftlab.losses.chunked.chunked_lm_loss`` computes the same from the hidden states without (B, T, V).
    """
    shift_logits = logits[:, :-1].reshape(-1, logits.size(-1)).float()  # (B·(T-1), V)
    shift_labels = labels[:, 1:].reshape(-1)  # (B·(T-1),)
    return F.cross_entropy(shift_logits, shift_labels, ignore_index=IGNORE, reduction=reduction)


def count_targets(labels: torch.Tensor) -> int:
    """Positions ``masked_lm_loss`` averages over: labels after the first that are not ``-100``."""
    return int((labels[:, 1:] != IGNORE).sum())
