"""What the offline preference objectives (DPO/IPO, KTO, ORPO, SimPO) share.

They train a causal LM on given responses (no sampling): a loss on the log-probs of labelled
response tokens (``ftlab.preference_logps``). Those with a reference policy (DPO, KTO) hold a
``Reference``: the frozen base through the method's switch, or log-probs precomputed before the
first optimizer step and kept in checkpoints. Subclasses implement ``_step(batch, stage)``.
"""

from __future__ import annotations

from typing import Any

import torch

from ftlab.losses.preference import pairwise_accuracy
from ftlab.objectives._base import Objective
from ftlab.preference_logps import Reference, fit_batches, sequence_logps


class OfflinePreference(Objective):
    """Base of DPO, KTO, ORPO and SimPO (see those for the arguments)."""

    #: The reference policy, for objectives that have one (set in ``__init__``).
    ref: Reference | None = None

    def build(self):
        return self.backbone.load("causal_lm")

    def configure_model(self) -> None:
        if self.model is not None:
            return
        super().configure_model()
        if self.ref is not None:
            self.ref.setup(self.model, self.method)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.model(
            input_ids=input_ids, attention_mask=attention_mask, use_cache=False
        ).logits  # (N, T, V)

    def logps(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        labels: torch.Tensor,
        average: bool = False,
    ) -> torch.Tensor:
        """(N,) log π of each sequence's labelled tokens (with gradient), summed or averaged per token."""
        return sequence_logps(self.model, input_ids, attention_mask, labels, average)

    # ------------------------------------------------------------------ steps
    def _step(self, batch: dict[str, Any], stage: str) -> torch.Tensor:
        raise NotImplementedError

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        return self._step(batch, "train")

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._step(batch, "val")

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._step(batch, "test")

    def batch_size_of(self, batch: dict[str, Any]) -> int:
        return int(batch["input_ids"].size(0)) // 2  # pairs: chosen rows, then rejected rows

    def log_pairs(
        self,
        stage: str,
        loss: torch.Tensor,
        r_chosen: torch.Tensor,
        r_rejected: torch.Tensor,
        chosen: torch.Tensor,
        rejected: torch.Tensor,
        **extra: torch.Tensor,
    ) -> None:
        """The metrics every pairwise objective logs: ``loss``, ``reward_acc`` (implicit reward of
        chosen > rejected), ``reward_margin``, ``rewards_chosen/rejected``, ``logps_chosen/rejected``."""
        n, sync = chosen.numel(), stage != "train"
        self.log(f"{stage}/loss", loss, prog_bar=True, batch_size=n, sync_dist=sync)
        self.log(
            f"{stage}/reward_acc",
            pairwise_accuracy(r_chosen, r_rejected),
            prog_bar=stage != "train",
            batch_size=n,
            sync_dist=sync,
        )
        self.log_dict(
            {
                f"{stage}/reward_margin": (r_chosen - r_rejected).mean(),
                f"{stage}/rewards_chosen": r_chosen.mean(),
                f"{stage}/rewards_rejected": r_rejected.mean(),
                f"{stage}/logps_chosen": chosen.detach().mean(),
                f"{stage}/logps_rejected": rejected.detach().mean(),
                **{f"{stage}/{k}": v.detach().float().mean() for k, v in extra.items()},
            },
            batch_size=n,
            sync_dist=sync,
        )

    # ------------------------------------------------------------------ precomputed reference
    def reference_batch(self, batch: dict[str, Any]) -> None:
        """Compute (and so cache) the reference log-probs a training step on ``batch`` will ask for."""
        raise NotImplementedError

    def on_before_optimizer_step(self, optimizer) -> None:
        if self.ref is not None:
            self.ref.updated = True

    def on_train_start(self) -> None:
        super().on_train_start()
        if self.ref is not None and self.ref.mode == "precomputed" and not self.ref.updated:
            self.ref.precompute(fit_batches(self), self.reference_batch)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        if self.ref is not None and self.ref.cache:
            checkpoint["reference_logps"] = self.ref.state_dict()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if self.ref is not None:
            self.ref.load_state_dict(checkpoint.get("reference_logps", {}), checkpoint.get("global_step", 0))
