"""Rewards for on-policy objectives (PPO, GRPO, RLOO): functions defined in code, trained reward
models, and ``Rewards``, which scores responses with one of them or a weighted sum of several.

A reward function takes the prompts and the policy's responses (decoded text, special tokens
removed) plus its keyword arguments, and returns one number per response:

    def my_reward(prompts: list[str], responses: list[str], **kwargs) -> list[float]

Objectives find it by import path (``reward_fn: ftlab.rewards.has_char``), so any importable
function works the same way. A reward model is the directory an ftlab ``RewardModel`` run saved
(adapter + head); it reads ``prompt ⊕ " " ⊕ response`` in ``PreferenceData``'s layout, with the
policy's tokenizer. Several sources combine as ``Σ weight · score``; a source of weight 0 is only
logged, e.g. the true rule beside a learned reward model, to see reward hacking when it happens.
"""

from __future__ import annotations

import importlib
import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch


# ---------------------------------------------------------------------------------- reward functions
def char_fraction(prompts: list[str], responses: list[str], chars: str = "e") -> list[float]:
    """Share of the response's characters that are in ``chars`` (0 for an empty response)."""
    wanted = set(chars)
    return [sum(c in wanted for c in r) / len(r) if r else 0.0 for r in responses]


def uppercase_fraction(prompts: list[str], responses: list[str]) -> list[float]:
    """Share of the response's letters that are capitals (0 when it has no letters)."""
    out = []
    for r in responses:
        letters = [c for c in r if c.isalpha()]
        out.append(sum(c.isupper() for c in letters) / len(letters) if letters else 0.0)
    return out


def target_length(prompts: list[str], responses: list[str], length: int = 10) -> list[float]:
    """``1 − |len − length| / length`` on the stripped response's characters, at least −1."""
    if length <= 0:
        raise ValueError(f"target_length needs length > 0, got {length}")
    return [max(-1.0, 1.0 - abs(len(r.strip()) - length) / length) for r in responses]


def contains(prompts: list[str], responses: list[str], text: str = "yes") -> list[float]:
    """1 when the response contains ``text``, else 0."""
    return [float(text in r) for r in responses]


def has_char(prompts: list[str], responses: list[str], chars: str = "0123456789") -> list[float]:
    """1 when the response holds any character of ``chars`` (default: a digit), else 0."""
    wanted = set(chars)
    return [float(any(c in wanted for c in r)) for r in responses]


_INSTRUCTION = re.compile(r"### Instruction:\n(.*?)\n\n### Input:\n(.*?)\n\n### Response:\n?$", re.DOTALL)


def instruction_answer(prompt: str) -> str | None:
    """The correct answer to an embedded-task prompt (``ftlab.data.synthetic``, Alpaca templates),
    or None when the prompt is not one of its four tasks."""
    from ftlab.data.synthetic import TASKS

    m = _INSTRUCTION.search(prompt)
    task = {v: k for k, v in TASKS.items()}.get(m.group(1).strip()) if m else None
    if task is None:
        return None
    x = m.group(2).strip()
    if task == "add":
        a, _, b = x.partition(" + ")
        return str(int(a) + int(b)) if a.strip().isdigit() and b.strip().isdigit() else None
    return {"reverse": x[::-1], "upper": x.upper(), "repeat": f"{x} {x}"}[task]


def instruction_following(prompts: list[str], responses: list[str]) -> list[float]:
    """1 when the stripped response is the correct answer to the embedded task's prompt, else 0
    (the task's exact match, as a rule a person would apply)."""
    out = []
    for p, r in zip(prompts, responses):
        answer = instruction_answer(p)
        if answer is None:
            raise ValueError(
                f"instruction_following: not a prompt of the embedded instruction task: {p[-80:]!r}"
            )
        out.append(float(r.strip() == answer))
    return out


# ---------------------------------------------------------------------------------- scoring
def import_function(path: str, what: str = "reward_fn") -> Callable:
    """``pkg.module.function`` or ``pkg.module:function`` -> the function, with a clear error."""
    module_name, _, name = path.partition(":") if ":" in path else path.rpartition(".")
    if not module_name or not name:
        raise ValueError(f"{what} {path!r} is not an import path like 'ftlab.rewards.has_char'")
    try:
        fn = getattr(importlib.import_module(module_name), name)
    except (ImportError, AttributeError) as err:
        raise ValueError(f"{what} {path!r} cannot be imported: {err}") from None
    if not callable(fn):
        raise ValueError(f"{what} {path!r} is not callable")  # noqa: TRY004 - the CLI shows ValueErrors in one line
    return fn


def same_tokenizer(a, b) -> bool:
    """Same vocabulary and the same BOS/EOS/pad ids: token ids mean the same text in both."""
    special = ("bos_token_id", "eos_token_id", "pad_token_id")
    return a.get_vocab() == b.get_vocab() and all(getattr(a, s) == getattr(b, s) for s in special)


class Rewards:
    """The reward of an on-policy objective: ``Σ weight · score`` over its sources.

    Args:
        sources: Each a mapping with ``fn`` (an import path) or ``model`` (a ``RewardModel`` adapter
            directory), and optionally ``name``, ``weight`` (default 1; 0: logged only), ``kwargs``
            (the function's keyword arguments, or ``RewardModel`` arguments such as ``pooling``),
            ``backbone`` (a reward model's base, default: the one its adapter names) and
            ``max_length`` (a reward model's input tokens, default: its positions).
        chunk_size: Responses a reward model scores at once.
    """

    KEYS = ("fn", "model", "name", "weight", "kwargs", "backbone", "max_length")

    def __init__(self, sources: list[dict[str, Any]], chunk_size: int = 16):
        if not sources:
            raise ValueError("no reward: give reward_fn, reward_model or rewards")
        self.sources: list[dict[str, Any]] = []
        for i, src in enumerate(sources):
            where = f"rewards[{i}]"
            if not isinstance(src, dict):
                raise ValueError(f"{where} must be a mapping with 'fn' or 'model', got {src!r}")  # noqa: TRY004
            unknown = set(src) - set(self.KEYS)
            if unknown:
                raise ValueError(f"{where}: unknown keys {sorted(unknown)}; use {list(self.KEYS)}")
            if ("fn" in src) == ("model" in src):
                raise ValueError(
                    f"{where} needs exactly one of 'fn' (an import path) or 'model' (a RewardModel adapter)"
                )
            name = src.get("name") or (src["fn"].rpartition(".")[2] if "fn" in src else "reward_model")
            entry = {
                "name": name,
                "weight": float(src.get("weight", 1.0)),
                "kwargs": dict(src.get("kwargs") or {}),
                "fn": import_function(src["fn"], f"{where}.fn") if "fn" in src else None,
                "path": src.get("fn") or src["model"],
                "model": None,
                "spec": src,
            }
            self.sources.append(entry)
        names = [s["name"] for s in self.sources]
        if len(set(names)) != len(names):
            raise ValueError(f"reward sources need distinct names, got {names}")
        if not any(s["weight"] for s in self.sources):
            raise ValueError("every reward source has weight 0: nothing to optimise")
        self.chunk_size = chunk_size

    def setup(self, tokenizer, policy_name: str) -> None:
        """Load the reward models; each must read the policy's tokens (``same_tokenizer``)."""
        for src in self.sources:
            if src["fn"] is None and src["model"] is None:
                src["model"] = load_reward_model(
                    src["path"], tokenizer, policy_name, src["spec"].get("backbone"), src["kwargs"]
                )
        self.tokenizer = tokenizer

    @torch.no_grad()
    def __call__(
        self,
        prompts: list[str],
        responses: list[str],
        device: torch.device | str = "cpu",
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(N,) fp32 weighted reward and each source's (N,) scores, by name, on ``device``."""
        parts = {}
        for src in self.sources:
            if src["fn"] is not None:
                raw = src["fn"](prompts, responses, **src["kwargs"])
                scores = torch.as_tensor(
                    raw if isinstance(raw, torch.Tensor) else list(raw), dtype=torch.float
                ).flatten()
                if scores.numel() != len(responses):
                    raise ValueError(
                        f"reward_fn {src['path']} returned {scores.numel()} scores for "
                        f"{len(responses)} responses"
                    )
            else:
                scores = self._model_scores(src, prompts, responses, device)
            if not torch.isfinite(scores).all():
                raise ValueError(f"reward {src['name']} gave non-finite scores: {scores.tolist()}")
            parts[src["name"]] = scores.float().to(device)
        total = sum(src["weight"] * parts[src["name"]] for src in self.sources if src["weight"])
        return total, parts

    def _model_scores(self, src, prompts, responses, device) -> torch.Tensor:
        from ftlab.data._base import pad
        from ftlab.data.preference import encode_response, response_frame

        rm = src["model"].to(device)
        tok = self.tokenizer
        frame = response_frame(tok)
        limit = (
            src["spec"].get("max_length") or getattr(rm.model.config, "max_position_embeddings", None) or 4096
        )
        out = []
        for s in range(0, len(prompts), self.chunk_size):
            seqs = [
                encode_response(tok, frame, p, r.strip(), limit)[0]
                for p, r in zip(prompts[s : s + self.chunk_size], responses[s : s + self.chunk_size])
            ]
            ids = pad(seqs, tok.pad_token_id).to(device)
            out.append(rm(ids, pad([[1] * len(q) for q in seqs], 0).to(device)))
        return torch.cat(out)


def load_reward_model(
    path: str, tokenizer, policy_name: str, backbone: Any = None, kwargs: dict | None = None
):
    """An ftlab ``RewardModel`` from its adapter directory, frozen, in eval mode.

    A reward model trained from an SFT model (``base_adapter``) gets the same SFT adapter folded in
    first, from the path its adapter file records. Refused with a clear error: a directory that is
    not an adapter, an adapter of another objective, a missing or different SFT adapter, and a
    reward model whose tokenizer differs from the policy's (``tokenizer``).
    """
    from ftlab.models.backbone import Backbone
    from ftlab.objectives.reward_model import RewardModel
    from ftlab.peft import io

    folder = Path(path)
    if not (folder / io.CONFIG).exists():
        raise ValueError(f"reward_model {folder} is not an ftlab adapter directory ({io.CONFIG} is missing)")
    meta = json.loads((folder / io.CONFIG).read_text())
    objective = meta.get("extra", {}).get("objective", "")
    if not objective.endswith(".RewardModel"):
        raise ValueError(
            f"reward_model {folder} was saved by {objective or 'an unknown objective'}, not a RewardModel"
        )
    base = meta.get("base", {}).get("name_or_path")
    if backbone is None and not base:
        raise ValueError(f"reward_model {folder}: {io.CONFIG} names no base model; set reward_backbone")
    if isinstance(backbone, dict):
        backbone = Backbone(**backbone)
    backbone = backbone or Backbone(name_or_path=base)
    theirs = backbone.tokenizer()
    if not same_tokenizer(tokenizer, theirs):
        raise ValueError(
            f"the reward model's tokenizer ({backbone.name_or_path}: {len(theirs)} tokens) differs from the "
            f"policy's ({policy_name}: {len(tokenizer)} tokens): it would score other tokens than the policy "
            "wrote; train the reward model on the policy's backbone"
        )
    kwargs = dict(kwargs or {})
    stacked = meta.get("extra", {}).get("base_adapter")
    if stacked and "base_adapter" not in kwargs:  # trained from an SFT model: fold the same SFT adapter first
        if not Path(stacked["path"]).exists():
            raise ValueError(
                f"reward_model {folder} was trained on top of base_adapter {stacked['path']}, which is "
                "not there (paths are relative to where the run started): give its place with "
                "kwargs: {base_adapter: PATH} (reward_kwargs for reward_model)"
            )
        kwargs["base_adapter"] = stacked["path"]
    rm = RewardModel(backbone, adapter=str(folder), **kwargs)
    rm.configure_model()
    return rm.eval().requires_grad_(False)
