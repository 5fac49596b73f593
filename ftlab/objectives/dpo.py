"""Direct preference optimisation of a causal LM on preference pairs (no reward model, no RL).

DPO (Rafailov et al., 2023) and IPO (Azar et al., 2023); the losses are in ``ftlab.losses.dpo``:

    h = (log π(y_c|x) − log π(y_r|x)) − (log π_ref(y_c|x) − log π_ref(y_r|x))
    L = −log σ(β h)   (sigmoid)     or     (h − 1/(2β))²   (ipo, on length-averaged log-probs)

The reference ``π_ref`` is the frozen base: the *same* model with the method switched off
(``reference: base``; LoRA, QLoRA, adapters, prefix and prompt tuning), so there is no second
copy of the model. A method that trains the base itself (``Full``) has no such switch: the
reference log-probs are then computed once, before the first optimizer step, for every training
and validation pair (``reference: precomputed``), and kept in the checkpoint.

Starting from an SFT adapter (``adapter``) trains that adapter further, and the reference is the
base without it; to keep the SFT model as the reference, merge it first (``ftlab export``) and use
the merged model as the backbone.

Batches come from ``PreferenceData``: ``input_ids`` (2B, T) with the chosen sequences first.
Log-probs are summed over the response tokens (``labels`` when the batch has them); otherwise over
the tokens from the first position where chosen and rejected differ, since the shared prompt
adds the same amount to both sides and cancels in ``h``.

Logged per stage: ``loss``, ``reward_acc`` (implicit reward of chosen > rejected),
``reward_margin``, ``rewards_chosen``, ``rewards_rejected``, ``logps_chosen``, ``logps_rejected``.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Literal

import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import nn

from ftlab.losses.dpo import LossType, dpo_loss, implicit_rewards
from ftlab.losses.lm import IGNORE
from ftlab.losses.preference import pairwise_accuracy
from ftlab.models.backbone import Backbone
from ftlab.objectives._base import Objective
from ftlab.peft.method import Method, can_disable, describe

log = logging.getLogger("ftlab")

Reference = Literal["auto", "base", "precomputed"]


class DPO(Objective):
    """Direct preference optimisation (sigmoid loss) or IPO.

    Args:
        backbone: The policy's base model (causal LM); also the reference.
        method: How the policy adapts it (LoRA keeps the reference free: the adapter switched off).
        optimizer: Optimizer class and arguments (trainable parameters only).
        scheduler: Learning-rate scheduler, e.g. ``ftlab.optim.WarmupLinear``.
        adapter: Start from a saved adapter (e.g. the SFT run's); the reference stays the base.
        max_length: Sequence length (linked from the data).
        beta: β: the strength of the implicit KL constraint (DPO's usual range 0.1-0.5).
        loss_type: ``sigmoid`` (DPO) or ``ipo``.
        label_smoothing: Assumed share of flipped preference labels (conservative DPO; sigmoid only).
        reference: ``base`` (method switched off), ``precomputed`` (once, before training), or
            ``auto``: ``base`` when the method can be switched off, else ``precomputed``.
    """

    def __init__(
        self,
        backbone: Backbone | None = None,
        method: Method | None = None,
        optimizer: OptimizerCallable = torch.optim.AdamW,
        scheduler: LRSchedulerCallable | None = None,
        adapter: str | None = None,
        max_length: int | None = None,
        beta: float = 0.1,
        loss_type: LossType = "sigmoid",
        label_smoothing: float = 0.0,
        reference: Reference = "auto",
    ):
        super().__init__(backbone, method, optimizer, scheduler, adapter, max_length)
        if beta <= 0:
            raise ValueError(f"beta must be > 0, got {beta}")
        if loss_type not in ("sigmoid", "ipo"):
            raise ValueError(f"unknown loss_type {loss_type!r}; use 'sigmoid' or 'ipo'")
        if not 0.0 <= label_smoothing < 0.5:
            raise ValueError(f"label_smoothing must be in [0, 0.5), got {label_smoothing}")
        if reference not in ("auto", "base", "precomputed"):
            raise ValueError(f"unknown reference {reference!r}; use 'auto', 'base' or 'precomputed'")
        self.beta, self.loss_type, self.label_smoothing = beta, loss_type, label_smoothing
        self.reference = reference
        self._cache: dict[bytes, tuple[float, float]] = {}  # pair -> reference (chosen, rejected), when precomputed
        self._updated = False  # an optimizer step has changed the model: it is no longer the base

    # ------------------------------------------------------------------ model
    def build(self):
        return self.backbone.load("causal_lm")

    def configure_model(self) -> None:
        if self.model is not None:
            return
        super().configure_model()
        switchable = can_disable(self.method, self.model)
        if self.reference == "base" and not switchable:
            raise ValueError(
                f"reference: base needs a method that can be switched off to give the frozen base; "
                f"{describe(self.method)['class']} trains the base itself: use reference: precomputed (or auto)"
            )
        if self.reference == "auto":
            self.reference = "base" if switchable else "precomputed"

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits  # (N, T, V)

    def logps(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Log-probability of each sequence's labelled tokens: (N,); averaged per token for IPO."""
        logits = self(input_ids, attention_mask)[:, :-1].float()  # (N, T-1, V)
        target = labels[:, 1:]  # (N, T-1)
        keep = target != IGNORE
        picked = torch.log_softmax(logits, -1).gather(-1, target.clamp_min(0).unsqueeze(-1)).squeeze(-1)
        total = (picked * keep).sum(-1)  # (N,)
        return total / keep.sum(-1).clamp_min(1) if self.loss_type == "ipo" else total

    # ------------------------------------------------------------------ reference
    @torch.no_grad()
    def reference_logps(self, batch: dict[str, Any], labels: torch.Tensor) -> torch.Tensor:
        """log π_ref of the batch's 2B sequences: (2B,), no gradient."""
        if self.reference == "base":
            with self.method.disabled(self.model), _eval_mode(self.model):
                return self.logps(batch["input_ids"], batch["attention_mask"], labels)
        keys = _pair_keys(batch)
        if any(k not in self._cache for k in keys):
            if self._updated:
                raise RuntimeError(
                    "DPO: a preference pair has no precomputed reference log-prob and the model has already "
                    "been updated; reference: precomputed covers the train and validation data seen at the start "
                    "of fit (use a method that can be switched off, such as LoRA, for other data)"
                )
            with _eval_mode(self.model):  # not updated yet: the model is still the base
                ref = self.logps(batch["input_ids"], batch["attention_mask"], labels)
            for k, c, r in zip(keys, *ref.chunk(2)):
                self._cache[k] = (float(c), float(r))
        pairs = torch.tensor([self._cache[k] for k in keys], device=self.device)  # (B, 2)
        return torch.cat([pairs[:, 0], pairs[:, 1]])

    def on_before_optimizer_step(self, optimizer) -> None:
        self._updated = True

    def on_train_start(self) -> None:
        super().on_train_start()
        if self.reference != "precomputed" or self._updated:
            return
        loaders = [self.trainer.train_dataloader]
        val = self.trainer.val_dataloaders
        if val is None and self.trainer.datamodule is not None and self.trainer.limit_val_batches:
            try:
                val = self.trainer.datamodule.val_dataloader()
            except ValueError:  # no validation split
                val = None
        loaders += list(val) if isinstance(val, list | tuple) else [val] if val is not None else []
        for loader in loaders:
            for batch in loader:
                batch = self.transfer_batch_to_device(batch, self.device, 0)
                self.reference_logps(batch, response_labels(batch))
        log.info("DPO: reference log-probs precomputed for %d pairs", len(self._cache))

    # ------------------------------------------------------------------ steps
    def _step(self, batch: dict[str, Any], stage: str) -> torch.Tensor:
        labels = response_labels(batch)
        ref_chosen, ref_rejected = self.reference_logps(batch, labels).chunk(2)
        chosen, rejected = self.logps(batch["input_ids"], batch["attention_mask"], labels).chunk(2)
        loss = dpo_loss(chosen, rejected, ref_chosen, ref_rejected, self.beta, self.loss_type, self.label_smoothing)
        r_chosen, r_rejected = implicit_rewards(chosen, rejected, ref_chosen, ref_rejected, self.beta)
        n, sync = chosen.numel(), stage != "train"
        self.log(f"{stage}/loss", loss, prog_bar=True, batch_size=n, sync_dist=sync)
        self.log(f"{stage}/reward_acc", pairwise_accuracy(r_chosen, r_rejected), prog_bar=stage != "train",
                 batch_size=n, sync_dist=sync)
        self.log_dict({
            f"{stage}/reward_margin": (r_chosen - r_rejected).mean(),
            f"{stage}/rewards_chosen": r_chosen.mean(), f"{stage}/rewards_rejected": r_rejected.mean(),
            f"{stage}/logps_chosen": chosen.detach().mean(), f"{stage}/logps_rejected": rejected.detach().mean(),
        }, batch_size=n, sync_dist=sync)
        return loss

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        return self._step(batch, "train")

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._step(batch, "val")

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._step(batch, "test")

    def batch_size_of(self, batch: dict[str, Any]) -> int:
        return int(batch["input_ids"].size(0)) // 2

    # ------------------------------------------------------------------ checkpoints
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        if self._cache:
            checkpoint["dpo_reference_logps"] = dict(self._cache)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self._cache.update(checkpoint.get("dpo_reference_logps", {}))
        self._updated = self._updated or checkpoint.get("global_step", 0) > 0


def response_labels(batch: dict[str, Any]) -> torch.Tensor:
    """(2B, T) labels: the batch's ``labels``, else the tokens from where chosen and rejected differ.

    A pair shares its prompt, so chosen[:k] == rejected[:k] up to the first differing position k;
    those shared tokens contribute equally to both log-probs and cancel in the DPO loss.
    """
    if "labels" in batch:
        return batch["labels"]
    ids, mask = batch["input_ids"], batch["attention_mask"]
    (chosen, rejected), (cmask, rmask) = ids.chunk(2), mask.chunk(2)
    differ = (chosen != rejected) | (cmask != rmask)  # (B, T)
    first = torch.where(differ.any(1), differ.long().argmax(1), torch.full_like(differ[:, 0], ids.size(1), dtype=torch.long))
    start = torch.cat([first, first])  # (2B,)
    positions = torch.arange(ids.size(1), device=ids.device)  # (T,)
    return ids.masked_fill((positions < start[:, None]) | (mask == 0), IGNORE)


def _pair_keys(batch: dict[str, Any]) -> list[bytes]:
    """A key per pair: the real tokens of its chosen and rejected sequences."""
    ids, mask = batch["input_ids"], batch["attention_mask"]
    B = ids.size(0) // 2
    seqs = [ids[i][mask[i].bool()].cpu().numpy().tobytes() for i in range(2 * B)]
    return [len(seqs[i]).to_bytes(8, "little") + seqs[i] + seqs[B + i] for i in range(B)]


@contextmanager
def _eval_mode(module: nn.Module) -> Iterator[None]:
    """No dropout inside the block: reference log-probs are deterministic."""
    training = module.training
    module.eval()
    try:
        yield
    finally:
        module.train(training)
