"""Causal language-modelling loss on labelled positions only."""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE = -100


def masked_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over positions whose label is not ``-100``.

    Args:
        logits: (B, T, V) scores for the token at each position's successor.
        labels: (B, T) token ids; ``-100`` marks prompt and padding positions.

    Returns a scalar. Position t predicts ``labels[:, t + 1]``; fp32 for a stable log-softmax.
    """
    shift_logits = logits[:, :-1].reshape(-1, logits.size(-1)).float()  # (B·(T-1), V)
    shift_labels = labels[:, 1:].reshape(-1)  # (B·(T-1),)
    return F.cross_entropy(shift_logits, shift_labels, ignore_index=IGNORE)

