"""A causal LM's final hidden states and its output head, apart: what chunked losses need.

``hidden_states(model, ...)`` runs the model's own forward (every hook a method put on it, prompt
tuning's included) and catches what reaches the output head: the head then computes the last
position's logits only, instead of (B, T, V). ``OutputHead.of(model)`` is
the head as plain tensors — weight, bias and the logit transforms some families apply after it
(Gemma's ``final_logit_softcapping``, Cohere's ``logit_scale``, Granite's ``logits_scaling``) — and
``OutputHead.matches`` checks it against the logits the model computed itself, so a family with a
transform not listed here is caught instead of trained on wrong logits.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class OutputHead:
    """``logits = softcap(scale · (hidden @ weight.T + bias))``; ``softcap(x) = c · tanh(x / c)``."""

    weight: torch.Tensor  # (V, H)
    bias: torch.Tensor | None = None  # (V,)
    scale: float = 1.0
    softcap: float | None = None

    @classmethod
    def of(cls, model: nn.Module) -> OutputHead | None:
        """The head of a transformers LM, or None when it is not a plain ``nn.Linear`` (e.g. an adapter
        wraps it: its output is then more than ``W h + b``)."""
        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        if type(head) is not nn.Linear:
            return None
        cfg = model.config
        scale = float(getattr(cfg, "logit_scale", None) or 1.0)  # Cohere multiplies
        if getattr(cfg, "logits_scaling", None):  # Granite divides
            scale /= float(cfg.logits_scaling)
        return cls(head.weight, head.bias, scale, getattr(cfg, "final_logit_softcapping", None) or None)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """(..., H) -> (..., V) logits, as the model computes them (in its dtype)."""
        z = nn.functional.linear(hidden, self.weight, self.bias) * self.scale
        if self.softcap:
            z = torch.tanh(z / self.softcap) * self.softcap
        return z

    @torch.no_grad()
    def matches(self, hidden: torch.Tensor, logits: torch.Tensor) -> bool:
        """Whether this head turns ``hidden`` (B, H) into the model's own ``logits`` (B, V)."""
        mine, theirs = self.logits(hidden).float(), logits.float()
        tolerance = 1e-4 if logits.dtype == torch.float32 else 2e-2
        return bool(((mine - theirs).abs().max() <= tolerance * theirs.abs().max().clamp_min(1.0)).item())


def hidden_states(model: nn.Module, length: int, **inputs) -> tuple[torch.Tensor, torch.Tensor]:
    """What a model's output head reads (B, T, H), and the model's logits for the last position (B, 1, V).

    ``inputs`` go to ``model(...)`` as they are (``input_ids``, ``attention_mask``/``position_ids``,
    ``decoder_input_ids``...); ``length`` is T, the positions the caller has labels for. Positions a
    method put in front (prompt tuning's virtual tokens) are cut off, as the model's own output cuts
    them from the logits.
    """
    caught: list[torch.Tensor] = []

    def catch(module, args):  # the head computes the last position only
        caught.append(args[0])
        return (args[0][:, -1:],)

    handle = model.get_output_embeddings().register_forward_pre_hook(catch)
    try:
        out = model(**inputs, use_cache=False)
    finally:
        handle.remove()
    hidden = caught[-1]
    return hidden[:, hidden.size(1) - length :], out.logits


def chunked_logprobs(
    model: nn.Module, tokens: torch.Tensor, start: int, temperature: float = 1.0, **inputs
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """log π of ``tokens[:, start:]`` read from the positions one earlier, a chunk of positions at a
    time (``ftlab.losses.chunked``): the (N, T, V) logits never exist. Every preference and RL
    objective's log-probs come through here.

    ``tokens`` (N, T) are the ids the model reads (``inputs`` go to ``model(...)`` as they are);
    ids < 0 (``-100`` labels) are read as 0 and left for the caller to mask. Returns the log-probs
    (N, T - start) in fp32 and the hidden states that scored them (N, T - start, H: what a value
    head reads), or None when the model's output head is not one ftlab can split (the caller then
    computes the logits).
    """
    from ftlab.losses.chunked import chunked_token_logprobs

    head = OutputHead.of(model)
    if head is None:
        return None
    hidden, last = hidden_states(model, tokens.size(1), **inputs)  # (N, T, H), (N, 1, V)
    if not head.matches(hidden[:, -1], last[:, -1]):
        return None
    hidden = hidden[:, start - 1 : -1]  # (N, R, H): position t - 1 scores token t
    logprobs = chunked_token_logprobs(
        hidden,
        head.weight,
        tokens[:, start:].clamp_min(0),
        head.bias,
        temperature=temperature,
        scale=head.scale,
        softcap=head.softcap,
    )
    return logprobs, hidden
