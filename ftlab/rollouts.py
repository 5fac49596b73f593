"""Rollouts for on-policy objectives (PPO, GRPO, RLOO): sample responses, then the per-token
log-probs of the policy and of the reference for exactly those tokens.

The reference policy is the frozen base: the *same* model with the method switched off, so one
base sits in memory. ``frozen_base`` is the only place that asks a method for that switch; every
reference log-prob in ftlab's preference and RL objectives goes through it. ``sft_model`` makes an
earlier run's adapter part of that base (RLHF's SFT step folded into the weights: the SFT model is
then both where the policy starts and the reference it is kept near, as in InstructGPT).

Rollouts run with dropout off (``eval_mode``), and so do the updates that reuse their
log-probs: the ratio ``π / π_old`` then starts at exactly 1 and moves only when the weights do.
Tensors are laid out as prompts left-padded to P tokens, then R response tokens:

    seq (N, P + R)   mask (N, P + R)   responses (N, R)
    response_mask (N, R): 1 up to and including the first EOS
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ftlab.losses.logprobs import entropy_from_logits, token_logprobs
from ftlab.models.lm_head import chunked_logprobs


# ---------------------------------------------------------------------------------- the reference
def frozen_base(model: nn.Module, method: Any) -> Callable[[], AbstractContextManager] | None:
    """A switch to the reference policy, or None when ``method`` cannot give the frozen base back.

    ``with frozen_base(model, method)(): ...`` runs ``model`` as the base, every module of the
    method off. None means a parameter of the base itself trains (``Full``; LongLoRA's norms):
    the base is not in memory.
    """
    from ftlab.peft.method import can_disable

    if not can_disable(method, model):
        return None
    return lambda: method.disabled(model)


# ---------------------------------------------------------------------------------- an SFT base
def sft_model(backbone: Any, adapter: str, owner: str = "objective") -> nn.Module:
    """``backbone`` as a causal LM with a ``CausalLM`` run's adapter (the SFT step's) folded into its
    weights, as ``ftlab export`` folds it, but in memory: a plain model whose frozen weights *are*
    the SFT model. A method applied afterwards trains beside it and switches off to give it back.
    """
    from ftlab.export import merge_into_base
    from ftlab.peft import io

    meta, _ = io.read_adapter(adapter)
    objective = meta.get("extra", {}).get("objective", "")
    if not objective.endswith(".CausalLM"):
        raise ValueError(
            f"{owner}: base_adapter {adapter} was saved by {objective or 'an unknown objective'}; "
            "it must be a CausalLM run's adapter (the SFT step), to be folded into the base"
        )
    model = backbone.load("causal_lm")
    method, extra = io.load_adapter(adapter, model, backbone.fingerprint(model))
    if extra:
        raise ValueError(
            f"{owner}: base_adapter {adapter} holds objective heads ({', '.join(sorted(extra))[:80]})"
        )
    merge_into_base(model, method)
    model.requires_grad_(False)  # the method applied next decides what trains
    return model


def adapter_digest(adapter: str) -> str:
    """A short hash of an adapter's weights: what a stacked adapter records of the one beneath it."""
    import hashlib

    from ftlab.peft import io

    path = Path(adapter) / io.WEIGHTS
    if not path.exists():
        raise ValueError(
            f"base_adapter {adapter} is not an ftlab adapter directory ({io.WEIGHTS} is missing)"
        )
    return hashlib.sha1(path.read_bytes()).hexdigest()[:16]


def base_adapter_record(base_adapter: str | None) -> dict[str, Any]:
    """What an adapter file trained on ``base_adapter`` records of it (``adapter_extra``); {} without one."""
    if not base_adapter:
        return {}
    return {"base_adapter": {"path": str(base_adapter), "digest": adapter_digest(base_adapter)}}


def check_base_adapter(adapter: str, base_adapter: str | None, owner: str = "objective") -> None:
    """Refuse to load ``adapter`` onto another base than the one it was trained on: the adapter file
    records the digest of the ``base_adapter`` folded beneath it (or none)."""
    from ftlab.peft import io

    config = Path(adapter) / io.CONFIG
    if not config.exists():  # a PEFT adapter or a missing folder: the loader says what is wrong
        return
    saved = json.loads(config.read_text()).get("extra", {}).get("base_adapter")
    if saved is None and base_adapter is None:
        return
    if saved is None:
        raise ValueError(
            f"{owner}: adapter {adapter} was trained on the plain backbone, not on base_adapter "
            f"{base_adapter}: drop base_adapter"
        )
    if base_adapter is None or adapter_digest(base_adapter) != saved["digest"]:
        raise ValueError(
            f"{owner}: adapter {adapter} was trained on top of base_adapter {saved['path']} "
            f"(digest {saved['digest']}), not {base_adapter}: set base_adapter: {saved['path']}"
        )


@contextmanager
def eval_mode(module: nn.Module) -> Iterator[None]:
    """No dropout inside the block (gradients still flow); the previous mode comes back after."""
    training = module.training
    module.eval()
    try:
        yield
    finally:
        module.train(training)


# ---------------------------------------------------------------------------------- forward passes
def forward(
    model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, hidden: bool = False
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(N, T) ids and mask (left padding allowed) -> logits (N, T, V) and, if asked, the last hidden
    states (N, T, H). Positions count real tokens only, as ``generate`` numbers left-padded rows."""
    positions = (attention_mask.long().cumsum(-1) - 1).clamp_min(0)  # (N, T)
    out = model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=positions,
        output_hidden_states=hidden,
        use_cache=False,
    )
    states = (
        out.hidden_states[-1][:, -input_ids.size(1) :] if hidden else None
    )  # virtual prompt tokens sit in front
    return out.logits, states


def response_logprobs(
    model: nn.Module,
    seq: torch.Tensor,
    mask: torch.Tensor,
    responses: torch.Tensor,
    prompt_len: int,
    temperature: float = 1.0,
    hidden: bool = False,
    entropy: bool = False,
    chunked: bool = True,
) -> dict[str, torch.Tensor]:
    """Log-probs of the response tokens under ``model``, read from the logits one position earlier.

    Returns ``logprobs`` (N, R) fp32, and ``hidden`` (N, R, H: the state *before* each response
    token, for a value head) and ``entropy`` (N, R) when asked. ``chunked`` (without entropy, which
    needs the logits): from the hidden states a chunk at a time where the model's head allows
    (``ftlab.models.lm_head.chunked_logprobs``); the same values and gradients.
    """
    if chunked and not entropy:
        positions = (mask.long().cumsum(-1) - 1).clamp_min(0)  # (N, T), as in forward()
        found = chunked_logprobs(
            model, seq, prompt_len, temperature, input_ids=seq, attention_mask=mask, position_ids=positions
        )
        if found is not None:
            return {"logprobs": found[0], **({"hidden": found[1]} if hidden else {})}
    logits, states = forward(model, seq, mask, hidden)
    logits = logits[:, prompt_len - 1 : -1]  # (N, R, V)
    out = {"logprobs": token_logprobs(logits, responses, temperature)}
    if hidden:
        out["hidden"] = states[:, prompt_len - 1 : -1]
    if entropy:
        with torch.no_grad():
            out["entropy"] = entropy_from_logits(logits.detach(), temperature)
    return out


# ---------------------------------------------------------------------------------- sampling
def check_budget(model: nn.Module, prompt_len: int, max_new_tokens: int, name: str) -> None:
    """Prompts of ``prompt_len`` tokens plus ``max_new_tokens`` must fit the model's positions."""
    limit = getattr(model.config, "max_position_embeddings", None)
    if limit and prompt_len + max_new_tokens > limit:
        raise ValueError(
            f"prompts of {prompt_len} tokens plus max_new_tokens={max_new_tokens} exceed {name}'s "
            f"{limit} positions; shorten the prompts (data.max_length) or lower max_new_tokens"
        )


@torch.no_grad()
def sample(
    model: nn.Module,
    tokenizer,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    max_new_tokens: int,
    generation_kwargs: dict[str, Any],
    chunk_size: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Responses to left-padded prompts (N, P), ``chunk_size`` rows at a time.

    Returns ``responses`` (N, R) padded with the pad token and ``response_mask`` (N, R), 1 on every
    generated token up to and including the first EOS.
    """
    P, n = input_ids.size(1), input_ids.size(0)
    parts = []
    for s in range(0, n, chunk_size):
        out = model.generate(
            input_ids=input_ids[s : s + chunk_size],
            attention_mask=attention_mask[s : s + chunk_size],
            max_new_tokens=max_new_tokens,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
            **generation_kwargs,
        )
        parts.append(out[:, P:])
    R = max(p.size(1) for p in parts)
    responses = torch.full((n, R), tokenizer.pad_token_id, dtype=torch.long, device=input_ids.device)
    generated = torch.zeros((n, R), dtype=torch.bool, device=input_ids.device)
    row = 0
    for p in parts:
        responses[row : row + p.size(0), : p.size(1)] = p
        generated[row : row + p.size(0), : p.size(1)] = True
        row += p.size(0)
    is_eos = responses == tokenizer.eos_token_id
    after_eos = (is_eos.long().cumsum(1) - is_eos.long()) > 0
    return responses, (generated & ~after_eos).long()


@dataclass
class Rollout:
    """Sampled responses and what the update needs about them; tensors are (N, ...) row-aligned."""

    seq: torch.Tensor  # (N, P + R)
    mask: torch.Tensor  # (N, P + R)
    responses: torch.Tensor  # (N, R)
    response_mask: torch.Tensor  # (N, R)
    prompt_len: int
    prompts: list[str]
    texts: list[str]
    logprobs: torch.Tensor  # (N, R) log π_old
    ref_logprobs: torch.Tensor  # (N, R) log π_ref
    entropy: torch.Tensor  # (N, R)
    values: torch.Tensor | None = None  # (N, R) PPO's value head at rollout time
    scores: torch.Tensor | None = None  # (N,) the optimised reward
    components: dict[str, torch.Tensor] = field(default_factory=dict)  # (N,) each reward source

    def __len__(self) -> int:
        return self.responses.size(0)

    def kl(self) -> torch.Tensor:
        """Per-token ``log π_old − log π_ref`` on response tokens (N, R); its row sum samples KL(π‖π_ref)."""
        return (self.logprobs - self.ref_logprobs) * self.response_mask


def rollout(
    model: nn.Module,
    reference: Callable[[], AbstractContextManager],
    tokenizer,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    prompts: list[str],
    *,
    max_new_tokens: int,
    generation_kwargs: dict[str, Any],
    chunk_size: int,
    temperature: float = 1.0,
    value_fn: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> Rollout:
    """Sample a response per prompt row, then score its tokens under the policy and the reference.

    Args:
        model: The policy (a causal LM with the method applied).
        reference: ``frozen_base(model, method)``: switches ``model`` to the reference inside a block.
        tokenizer: The policy's tokenizer (pad and EOS ids; decoding).
        input_ids: (N, P) left-padded prompts, one row per response wanted (repeat rows for groups).
        attention_mask: (N, P).
        prompts: N prompt texts (for rewards that read them).
        max_new_tokens: Response budget.
        generation_kwargs: ``generate`` arguments (sampling settings).
        chunk_size: Rows generated and scored at once.
        temperature: The sampling temperature, which the log-probs divide the logits by too.
        value_fn: Maps hidden states (n, R, H) to values (n, R) (PPO's value head), or None.
    """
    with eval_mode(model), torch.no_grad():
        responses, response_mask = sample(
            model, tokenizer, input_ids, attention_mask, max_new_tokens, generation_kwargs, chunk_size
        )
        P = input_ids.size(1)
        seq = torch.cat([input_ids, responses], 1)  # (N, P + R)
        mask = torch.cat([attention_mask, response_mask], 1)
        parts: dict[str, list[torch.Tensor]] = {"logprobs": [], "ref": [], "entropy": [], "values": []}
        for s in range(0, len(prompts), chunk_size):
            c = slice(s, s + chunk_size)
            out = response_logprobs(
                model,
                seq[c],
                mask[c],
                responses[c],
                P,
                temperature,
                hidden=value_fn is not None,
                entropy=True,
            )
            with reference():
                ref = response_logprobs(model, seq[c], mask[c], responses[c], P, temperature)
            parts["logprobs"].append(out["logprobs"])
            parts["ref"].append(ref["logprobs"])
            parts["entropy"].append(out["entropy"])
            if value_fn is not None:
                parts["values"].append(value_fn(out["hidden"]))
    texts = tokenizer.batch_decode(
        responses.masked_fill(response_mask == 0, tokenizer.pad_token_id), skip_special_tokens=True
    )
    return Rollout(
        seq=seq,
        mask=mask,
        responses=responses,
        response_mask=response_mask,
        prompt_len=P,
        prompts=list(prompts),
        texts=texts,
        logprobs=torch.cat(parts["logprobs"]),
        ref_logprobs=torch.cat(parts["ref"]),
        entropy=torch.cat(parts["entropy"]),
        values=torch.cat(parts["values"]) if value_fn is not None else None,
    )
