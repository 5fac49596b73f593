"""Cross-entropy and token log-probabilities from hidden states, a chunk of positions at a time.

A causal LM's last step is ``logits = W h (+ b)`` over a vocabulary of V tokens; at V = 128k–256k
the (N, V) fp32 logits, their log-softmax and their gradient are the largest tensors of a training
step. These functions take the final hidden states ``h`` (N, H) and the head weight ``W`` (V, H)
instead and never hold more than ``chunk_size`` positions' logits:

    z_n = softcap(scale · (W h_n + b)) / temperature          (fp32; softcap(x) = c · tanh(x / c))
    log p(y_n) = z_n[y_n] − logsumexp(z_n)
    ∂(−log p(y_n)) / ∂z_n = softmax(z_n) − onehot(y_n)

``chunked_lm_loss`` (a scalar: the summed or mean loss) computes each chunk's gradient with respect
to ``h``, ``W`` and ``b`` already in the forward pass, as Liger's fused linear cross-entropy does:
the backward pass only scales them by the incoming scalar gradient, so no logits are kept and none
are recomputed. ``chunked_token_logprobs`` (one value per position, for DPO/PPO, whose per-token
weights are unknown in the forward) keeps only the per-position log-normaliser and recomputes each
chunk's logits in the backward pass. Both equal the plain computation (``masked_lm_loss``,
``token_logprobs``) to float rounding, gradients included.

On CUDA, with ``liger-kernel`` installed, ``chunked_lm_loss(..., liger=True)`` hands the work to
Liger's Triton kernel (not a dependency of ftlab; the CPU path is this file's).
"""

from __future__ import annotations

from typing import Literal

import torch

from ftlab.losses.lm import IGNORE

#: Default chunk: about this many logits (positions × vocabulary) at a time, 128 MiB in fp32.
CHUNK_ELEMENTS = 1 << 25


def default_chunk_size(vocab_size: int) -> int:
    """Positions per chunk so that a chunk holds about ``CHUNK_ELEMENTS`` logits."""
    return max(1, CHUNK_ELEMENTS // max(1, vocab_size))


def _chunk_logits(h, weight, bias, scale: float, softcap: float | None, temperature: float):
    """fp32 logits z (C, V) of hidden states h (C, H), and dz/d(W h + b) (a (C, V) tensor or a float)."""
    raw = h @ weight.T  # (C, V) in the compute dtype, as the model's own head computes it
    if bias is not None:
        raw = raw + bias
    z = raw.float()
    factor: torch.Tensor | float = scale / temperature
    if scale != 1.0:
        z = z * scale
    if softcap:
        z = torch.tanh(z / softcap)  # (C, V)
        factor = (1.0 - z * z) * (scale / temperature)  # d tanh = 1 − tanh²
        z = z * softcap
    if temperature != 1.0:
        z = z / temperature
    return z, factor


class _FusedLinearCrossEntropy(torch.autograd.Function):
    """Σ_n −log p(y_n) over hidden (N, H), gradients computed chunk by chunk in the forward."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, scale, softcap, chunk):
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        grad_h = torch.empty_like(hidden) if need_h else None  # (N, H)
        # In-place addmm accumulates the weight gradient in the weight's dtype without a (V, H) temporary.
        grad_w = torch.zeros_like(weight) if need_w else None  # (V, H)
        grad_b = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device) if need_b else None
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for start in range(0, hidden.size(0), chunk):
            h, y = hidden[start : start + chunk], targets[start : start + chunk]  # (C, H), (C,)
            z, factor = _chunk_logits(h, weight, bias, scale, softcap, 1.0)
            lse = torch.logsumexp(z, dim=-1)  # (C,)
            total += (lse - z.gather(1, y.unsqueeze(1)).squeeze(1)).sum()
            if not (need_h or need_w or need_b):
                continue
            g = z.sub_(lse.unsqueeze(1)).exp_()  # softmax, in z's memory (C, V)
            g[torch.arange(len(y), device=g.device), y] -= 1.0
            g = (g * factor) if isinstance(factor, torch.Tensor) else (g.mul_(factor) if factor != 1.0 else g)
            if need_b:
                grad_b += g.sum(0)
            g = g.to(weight.dtype)  # the plain path casts the logits' gradient back to the compute dtype too
            if need_h:
                grad_h[start : start + chunk] = g @ weight  # (C, H)
            if need_w:
                grad_w.addmm_(g.T, h)  # (V, H)
        ctx.save_for_backward(grad_h, grad_w, grad_b)
        ctx.bias_dtype = None if bias is None else bias.dtype
        return total

    @staticmethod
    def backward(ctx, grad_out):
        grads = [None if g is None else g * grad_out.to(g.dtype) for g in ctx.saved_tensors]
        if grads[2] is not None:
            grads[2] = grads[2].to(ctx.bias_dtype)
        return (*grads, None, None, None, None)


class _ChunkedLinearLogProbs(torch.autograd.Function):
    """log p(y_n) for hidden (N, H); the backward recomputes each chunk's logits."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, scale, softcap, temperature, chunk):
        out = torch.empty(hidden.size(0), dtype=torch.float32, device=hidden.device)  # (N,)
        lse = torch.empty_like(out)
        for start in range(0, hidden.size(0), chunk):
            z, _ = _chunk_logits(hidden[start : start + chunk], weight, bias, scale, softcap, temperature)
            lse[start : start + chunk] = torch.logsumexp(z, dim=-1)
            out[start : start + chunk] = z.gather(1, targets[start : start + chunk].unsqueeze(1)).squeeze(1)
        out -= lse
        ctx.save_for_backward(hidden, weight, bias, targets, lse)
        ctx.config = (scale, softcap, temperature, chunk)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        hidden, weight, bias, targets, lse = ctx.saved_tensors
        scale, softcap, temperature, chunk = ctx.config
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = torch.zeros_like(weight) if need_w else None
        grad_b = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device) if need_b else None
        grad_out = grad_out.float()
        for start in range(0, hidden.size(0), chunk):
            stop = start + chunk
            h, y, go = hidden[start:stop], targets[start:stop], grad_out[start:stop]
            z, factor = _chunk_logits(h, weight, bias, scale, softcap, temperature)
            # d log p(y) / dz = onehot(y) − softmax(z), times the incoming gradient of each position
            g = z.sub_(lse[start:stop].unsqueeze(1)).exp_().mul_(-go.unsqueeze(1))  # (C, V)
            g[torch.arange(len(y), device=g.device), y] += go
            g = g * factor if isinstance(factor, torch.Tensor) else (g.mul_(factor) if factor != 1.0 else g)
            if need_b:
                grad_b += g.sum(0)
            g = g.to(weight.dtype)
            if need_h:
                grad_h[start:stop] = g @ weight
            if need_w:
                grad_w.addmm_(g.T, h)
        if grad_b is not None:
            grad_b = grad_b.to(bias.dtype)
        return grad_h, grad_w, grad_b, None, None, None, None, None


def chunked_token_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    tokens: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    temperature: float = 1.0,
    scale: float = 1.0,
    softcap: float | None = None,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """log p(token) from hidden states: (B, R, H), (V, H), (B, R) -> (B, R), in fp32.

    The same values and gradients as ``token_logprobs(logits / temperature, tokens)`` with
    ``logits = softcap(scale · (hidden @ weight.T + bias))``, without holding (B, R, V). As there,
    ``hidden[:, t]`` must be the state whose logits score ``tokens[:, t]`` (already shifted).

    Args:
        hidden: (B, R, H) final hidden states (after the model's last norm).
        weight: (V, H) output-embedding (LM head) weight; ``bias``: (V,) or None.
        tokens: (B, R) token ids to score (any valid id at positions the caller masks out).
        temperature: Divides the logits (PPO's sampling temperature).
        scale, softcap: The model's own logit transforms (``LMHead`` reads them from the config).
        chunk_size: Positions per chunk (default: ``default_chunk_size(V)``).
    """
    shape = tokens.shape
    chunk = chunk_size or default_chunk_size(weight.size(0))
    out = _ChunkedLinearLogProbs.apply(
        hidden.reshape(-1, hidden.size(-1)),
        weight,
        bias,
        tokens.reshape(-1),
        float(scale),
        softcap,
        float(temperature),
        chunk,
    )
    return out.view(shape)


def chunked_lm_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    scale: float = 1.0,
    softcap: float | None = None,
    chunk_size: int | None = None,
    reduction: Literal["mean", "sum"] = "mean",
    shift: bool = True,
    liger: bool = False,
) -> torch.Tensor:
    """Next-token cross-entropy over positions whose label is not ``-100``, from hidden states.

    Args:
        hidden: (B, T, H) final hidden states; position t predicts ``labels[:, t + 1]`` (``labels[:, t]``
            when ``shift`` is false, as an encoder-decoder's decoder does).
        weight: (V, H) LM-head weight; ``bias``: (V,) or None.
        labels: (B, T) token ids, ``-100`` where no loss is taken (prompt, padding, sample starts).
        scale, softcap: The model's own logit transforms (see ``chunked_token_logprobs``).
        chunk_size: Positions per chunk (default: ``default_chunk_size(V)``).
        reduction: ``mean`` over the labelled positions (as ``masked_lm_loss``) or their ``sum``.
        liger: Use liger-kernel's fused linear cross-entropy when the tensors are on CUDA and it is
            installed (and ``scale`` is 1); otherwise this file's chunked computation.

    Returns a scalar (fp32). Only labelled positions reach the head: prompt and padding positions
    cost nothing, and (B·T, V) logits never exist.
    """
    if shift:
        hidden, labels = hidden[:, :-1], labels[:, 1:]  # (B, T-1, H), (B, T-1)
    keep = labels != IGNORE
    h, y = hidden[keep], labels[keep]  # (N, H), (N,)
    if liger and h.is_cuda and scale == 1.0 and (fused := _liger()) is not None:
        total = fused(
            input=h, weight=weight, target=y, bias=bias, ignore_index=IGNORE, reduction="sum", softcap=softcap
        )
        total = (total[0] if isinstance(total, tuple) else total).float()
    else:
        chunk = chunk_size or default_chunk_size(weight.size(0))
        total = _FusedLinearCrossEntropy.apply(h, weight, bias, y, float(scale), softcap, chunk)
    if reduction == "sum":
        return total
    return total / keep.sum().clamp_min(1)


def _liger():
    try:
        from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy
    except ImportError:
        return None
    return liger_fused_linear_cross_entropy
