"""Log-probs of given responses for offline preference objectives (DPO, IPO, KTO, ORPO, SimPO).

``sequence_logps`` sums (or averages) the log-probs of a batch's labelled tokens under the policy.
``Reference`` gives the same quantity under the reference policy, either

- ``base``: the frozen base, the *same* model with the method switched off (``ftlab.rollouts.frozen_base``),
  computed on the fly; or
- ``precomputed``: computed once, before the first optimizer step changes the model, for every
  sequence of the training and validation data, and kept in checkpoints. Methods that train the
  base itself (``Full``) have no switch, so this is their only way to a reference.

Sequences are right-padded ``input_ids`` (N, T) with ``labels`` (N, T), ``-100`` where a token does
not count (prompt, padding); ``response_labels`` derives them for pair batches that lack them.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from typing import Any, Literal

import torch
from torch import nn

from ftlab.losses.logprobs import IGNORE, sequence_logprobs
from ftlab.models.lm_head import chunked_logprobs
from ftlab.rollouts import eval_mode, frozen_base

log = logging.getLogger("ftlab")

ReferenceMode = Literal["auto", "base", "precomputed"]


def sequence_logps(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    labels: torch.Tensor,
    average: bool = False,
    chunked: bool = True,
) -> torch.Tensor:
    """(N,) log π of each sequence's labelled tokens, summed (or averaged per token). ``chunked``:
    from the hidden states a chunk at a time (``ftlab.models.lm_head.chunked_logprobs``) where the
    model's head allows, never holding the (N, T, V) logits; the same values and gradients."""
    found = (
        chunked_logprobs(model, labels, 1, input_ids=input_ids, attention_mask=attention_mask)
        if chunked
        else None
    )
    if found is None:
        logits = model(
            input_ids=input_ids, attention_mask=attention_mask, use_cache=False
        ).logits  # (N, T, V)
        return sequence_logprobs(logits, labels, average)
    keep = (labels[:, 1:] != IGNORE).float()  # (N, T-1)
    total = (found[0] * keep).sum(-1)
    return total / keep.sum(-1).clamp_min(1) if average else total


def response_labels(batch: dict[str, Any]) -> torch.Tensor:
    """(2B, T) labels of a pair batch (chosen rows, then rejected): its ``labels`` if it has them,
    else the tokens from the first position where chosen and rejected differ.

    A pair shares its prompt, so chosen[:k] == rejected[:k] up to the first differing position k;
    those shared tokens add the same log-prob to both sides, which cancels in a *sum*-based loss
    (DPO). Length-averaged losses (IPO, ORPO, SimPO) need the real response labels.
    """
    if "labels" in batch:
        return batch["labels"]
    ids, mask = batch["input_ids"], batch["attention_mask"]
    (chosen, rejected), (cmask, rmask) = ids.chunk(2), mask.chunk(2)
    differ = (chosen != rejected) | (cmask != rmask)  # (B, T)
    first = torch.where(
        differ.any(1), differ.long().argmax(1), torch.full_like(differ[:, 0], ids.size(1), dtype=torch.long)
    )
    start = torch.cat([first, first])  # (2B,)
    positions = torch.arange(ids.size(1), device=ids.device)  # (T,)
    return ids.masked_fill((positions < start[:, None]) | (mask == 0), IGNORE)


class Reference:
    """log π_ref of labelled sequences, from the frozen base or precomputed (see the module docstring).

    Args:
        mode: ``base``, ``precomputed``, or ``auto`` (``base`` when the method can be switched off).
        owner: The objective's name, for error messages.
    """

    def __init__(self, mode: ReferenceMode = "auto", owner: str = "objective"):
        if mode not in ("auto", "base", "precomputed"):
            raise ValueError(f"unknown reference {mode!r}; use 'auto', 'base' or 'precomputed'")
        self.mode, self.owner = mode, owner
        self.switch: Callable | None = None
        self.cache: dict[bytes, float] = {}
        self.updated = False  # an optimizer step has changed the model: it is no longer the base

    def setup(self, model: nn.Module, method: Any) -> None:
        """Resolve ``auto`` and check that ``base`` is possible for this model and method."""
        self.switch = frozen_base(model, method)
        if self.mode == "base" and self.switch is None:
            raise ValueError(
                f"{self.owner}: reference: base needs a method that can be switched off to give the frozen "
                "base; "
                f"{type(method).__name__} trains the base itself: use reference: precomputed (or auto)"
            )
        if self.mode == "auto":
            self.mode = "base" if self.switch is not None else "precomputed"

    @torch.no_grad()
    def __call__(
        self,
        model: nn.Module,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        labels: torch.Tensor,
        average: bool = False,
    ) -> torch.Tensor:
        """(N,) log π_ref of the sequences, no gradient."""
        if self.mode == "base":
            with self.switch(), eval_mode(model):
                return sequence_logps(model, input_ids, attention_mask, labels, average)
        keys = _keys(input_ids, attention_mask, labels, average)
        missing = [i for i, k in enumerate(keys) if k not in self.cache]
        if missing:
            if self.updated:
                raise RuntimeError(
                    f"{self.owner}: a sequence has no precomputed reference log-prob and the model has "
                    "already been "
                    "updated; reference: precomputed covers the train and validation data seen at the "
                    "start of fit "
                    "(use a method that can be switched off, such as LoRA, for other data)"
                )
            with eval_mode(model):  # not updated yet: the model is still the base
                ref = sequence_logps(
                    model, input_ids[missing], attention_mask[missing], labels[missing], average
                )
            for i, value in zip(missing, ref.tolist()):
                self.cache[keys[i]] = value
        return torch.tensor([self.cache[k] for k in keys], device=input_ids.device)

    def precompute(
        self, batches: Iterable[dict[str, Any]], compute: Callable[[dict[str, Any]], None]
    ) -> None:
        """Run ``compute(batch)`` (which calls this reference) on every batch before training starts."""
        if self.mode != "precomputed" or self.updated:
            return
        for batch in batches:
            compute(batch)
        log.info("%s: reference log-probs precomputed for %d sequences", self.owner, len(self.cache))

    def state_dict(self) -> dict[str, Any]:
        return {"cache": dict(self.cache)} if self.cache else {}

    def load_state_dict(self, state: dict[str, Any], global_step: int) -> None:
        self.cache.update(state.get("cache", {}))
        self.updated = self.updated or global_step > 0


def fit_batches(objective) -> Iterable[dict[str, Any]]:
    """Every training and validation batch of the objective's fit, moved to its device (for "
    "``precompute``)."""
    trainer = objective.trainer
    loaders = [trainer.train_dataloader]
    val = trainer.val_dataloaders
    if val is None and trainer.datamodule is not None and trainer.limit_val_batches:
        try:
            val = trainer.datamodule.val_dataloader()
        except ValueError:  # no validation split
            val = None
    loaders += list(val) if isinstance(val, list | tuple) else [val] if val is not None else []
    for loader in loaders:
        for batch in loader:
            yield objective.transfer_batch_to_device(batch, objective.device, 0)


def _keys(
    input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor, average: bool
) -> list[bytes]:
    """A key per sequence: its real tokens, which of them are labelled, and the reduction."""
    out = []
    for ids, m, lab in zip(input_ids, attention_mask.bool(), labels):
        tokens = ids[m].cpu().numpy().tobytes()
        counted = (lab[m] != IGNORE).cpu().numpy().tobytes()
        out.append(bytes([average]) + len(tokens).to_bytes(8, "little") + tokens + counted)
    return out
