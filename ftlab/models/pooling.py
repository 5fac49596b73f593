"""Pooling a sequence of hidden states into one vector per sequence."""

from __future__ import annotations

from typing import Literal

import torch

Pooling = Literal["auto", "mean", "cls", "last"]


def pool(hidden: torch.Tensor, mask: torch.Tensor, how: Pooling) -> torch.Tensor:
    """(B, T, H) hidden states and (B, T) attention mask -> (B, H).

    ``mean`` averages non-padding positions, ``cls`` takes position 0, ``last`` takes the last
    non-padding position (works for left and right padding). ``auto`` is resolved by the caller.
    """
    if how == "mean":
        m = mask.unsqueeze(-1).to(hidden.dtype)  # (B, T, 1)
        return (hidden * m).sum(1) / m.sum(1).clamp_min(1e-9)
    if how == "cls":
        return hidden[:, 0]
    if how == "last":
        positions = torch.arange(mask.size(1), device=mask.device)  # (T,)
        last = (mask.long() * positions).argmax(dim=1)  # (B,)
        return hidden[torch.arange(hidden.size(0), device=hidden.device), last]
    raise ValueError(f"unknown pooling {how!r}; use mean, cls or last")


def default_pooling(model: torch.nn.Module) -> str:
    """``last`` for decoder-only models, ``mean`` for encoders."""
    cfg = getattr(model, "config", None)
    decoder = bool(getattr(cfg, "is_decoder", False)) or getattr(cfg, "model_type", "") in (
        "llama",
        "gpt2",
        "mistral",
        "qwen2",
        "qwen3",
        "gemma",
        "gemma2",
        "phi",
        "phi3",
        "gpt_neox",
        "opt",
        "falcon",
    )
    return "last" if decoder else "mean"
