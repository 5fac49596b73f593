"""KTO: alignment from unpaired desirable / undesirable examples (a thumbs up or down per response).

KTO (Ethayarajh et al., 2024, arXiv:2402.01306); the loss is in ``ftlab.losses.kto``. With the
implied reward ``r = log π(y|x) − log π_ref(y|x)`` and the reference point
``z0 = max(0, mean over mismatched pairs of (log π − log π_ref))`` (no gradient):

    desirable:    L = λ_D (1 − σ(β (r − z0)))        undesirable:  L = λ_U (1 − σ(β (z0 − r)))

Desirable responses are pushed above the reference point and undesirable ones below it; ``z0``
keeps the policy from raising every response's likelihood at once. Batches come from
``UnpairedPreferenceData`` (pairs convert to two examples each; its ``kl_*`` rows are the
mismatched prompt/response pairs). The reference ``π_ref`` is the frozen base with the method
switched off, or precomputed before training for methods that train the base (as in DPO).

Logged per stage: ``loss``, ``kl`` (z0), ``rewards_desirable``, ``rewards_undesirable`` (mean β r of
each kind) and ``reward_margin`` (their difference), ``logps_desirable``, ``logps_undesirable``.
"""

from __future__ import annotations

from typing import Any

import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable

from ftlab.losses.kto import kto_loss, kto_reference_point
from ftlab.models.backbone import Backbone
from ftlab.objectives._offline import OfflinePreference
from ftlab.peft.method import Method
from ftlab.preference_logps import Reference, ReferenceMode


class KTO(OfflinePreference):
    """Kahneman-Tversky optimisation on labelled single responses.

    Args:
        backbone: The policy's base model (causal LM); also the reference.
        method: How the policy adapts it (LoRA keeps the reference free: the adapter switched off).
        optimizer: Optimizer class and arguments (trainable parameters only).
        scheduler: Learning-rate scheduler, e.g. ``ftlab.optim.WarmupLinear``.
        adapter: Start from a saved adapter; the reference stays the base.
        max_length: Sequence length (linked from the data).
        beta: β, the sharpness of the value function (the paper's and TRL's default 0.1).
        desirable_weight: λ_D, the weight of desirable examples.
        undesirable_weight: λ_U, the weight of undesirable examples (raise the weight of the rarer kind
            so that λ_D n_D / (λ_U n_U) lies in [1, 4/3], as the paper recommends).
        reference: ``base`` (method switched off), ``precomputed`` (once, before training), or ``auto``.
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
        desirable_weight: float = 1.0,
        undesirable_weight: float = 1.0,
        reference: ReferenceMode = "auto",
    ):
        super().__init__(backbone, method, optimizer, scheduler, adapter, max_length)
        if beta <= 0:
            raise ValueError(f"beta must be > 0, got {beta}")
        if desirable_weight <= 0 or undesirable_weight <= 0:
            raise ValueError(
                f"desirable_weight and undesirable_weight must be > 0, got {desirable_weight}, "
                f"{undesirable_weight}"
            )
        self.beta, self.desirable_weight, self.undesirable_weight = beta, desirable_weight, undesirable_weight
        self.ref = Reference(reference, "KTO")

    def batch_size_of(self, batch: dict[str, Any]) -> int:
        return int(batch["input_ids"].size(0))

    def _check_batch(self, batch: dict[str, Any]) -> None:
        if "desirable" not in batch or "kl_input_ids" not in batch:
            raise ValueError(
                "KTO needs batches of labelled single responses (desirable, kl_input_ids...): "
                "use data: ftlab.data.UnpairedPreferenceData (it also converts preference pairs)"
            )

    def reference_batch(self, batch: dict[str, Any]) -> None:
        self._check_batch(batch)
        for p in ("", "kl_"):
            self.ref(self.model, batch[f"{p}input_ids"], batch[f"{p}attention_mask"], batch[f"{p}labels"])

    def reference_point(self, batch: dict[str, Any]) -> torch.Tensor:
        """z0 from the batch's mismatched pairs, averaged over processes: a scalar, no gradient."""
        with torch.no_grad():
            policy = self.logps(batch["kl_input_ids"], batch["kl_attention_mask"], batch["kl_labels"])
        ref = self.ref(self.model, batch["kl_input_ids"], batch["kl_attention_mask"], batch["kl_labels"])
        z0 = kto_reference_point(policy, ref)
        return self.trainer.strategy.reduce(z0, reduce_op="mean") if self._trainer is not None else z0

    def _step(self, batch: dict[str, Any], stage: str) -> torch.Tensor:
        self._check_batch(batch)
        ids, mask, labels, good = (
            batch["input_ids"],
            batch["attention_mask"],
            batch["labels"],
            batch["desirable"],
        )
        ref = self.ref(self.model, ids, mask, labels)
        policy = self.logps(ids, mask, labels)
        z0 = self.reference_point(batch)
        loss, rewards = kto_loss(
            policy, ref, good, z0, self.beta, self.desirable_weight, self.undesirable_weight
        )
        n, sync = ids.size(0), stage != "train"
        self.log(f"{stage}/loss", loss, prog_bar=True, batch_size=n, sync_dist=sync)
        stats = {"kl": z0}
        for name, rows in (("desirable", good), ("undesirable", ~good)):
            if rows.any():  # a batch may hold one kind only
                stats[f"rewards_{name}"] = rewards[rows].mean()
                stats[f"logps_{name}"] = policy.detach()[rows].mean()
        if good.any() and (~good).any():
            stats["reward_margin"] = stats["rewards_desirable"] - stats["rewards_undesirable"]
        self.log_dict({f"{stage}/{k}": v for k, v in stats.items()}, batch_size=n, sync_dist=sync)
        return loss
