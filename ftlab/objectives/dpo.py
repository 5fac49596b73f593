"""Direct preference optimisation of a causal LM on preference pairs (no reward model, no RL).

DPO (Rafailov et al., 2023) and IPO (Azar et al., 2023); the losses are in ``ftlab.losses.dpo``:

    h = (log π(y_c|x) − log π(y_r|x)) − (log π_ref(y_c|x) − log π_ref(y_r|x))
    L = −log σ(β h)   (sigmoid)     or     (h − 1/(2β))²   (ipo, on length-averaged log-probs)

The reference ``π_ref`` is the frozen base: the *same* model with the method switched off
(``reference: base``; LoRA, QLoRA, adapters, prefix and prompt tuning), so there is no second
copy of the model. A method that trains the base itself (``Full``) has no such switch: the
reference log-probs are then computed once, before the first optimizer step, for every training
and validation pair (``reference: precomputed``), and kept in the checkpoint
(``ftlab.preference_logps.Reference``).

Starting from an SFT adapter (``adapter``) trains that adapter further, and the reference is the
base without it; to keep the SFT model as the reference, merge it first (``ftlab export``) and use
the merged model as the backbone.

Batches come from ``PreferenceData``: ``input_ids`` (2B, T) with the chosen sequences first and
``labels`` on the response tokens (without ``labels``, the tokens from the first position where
chosen and rejected differ count: the shared prompt cancels in ``h``).

Logged per stage: ``loss``, ``reward_acc`` (implicit reward of chosen > rejected),
``reward_margin``, ``rewards_chosen``, ``rewards_rejected``, ``logps_chosen``, ``logps_rejected``.
"""

from __future__ import annotations

from typing import Any

import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable

from ftlab.losses.dpo import LossType, dpo_loss, implicit_rewards
from ftlab.models.backbone import Backbone
from ftlab.objectives._offline import OfflinePreference
from ftlab.peft.method import Method
from ftlab.preference_logps import Reference, ReferenceMode, response_labels


class DPO(OfflinePreference):
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
        reference: ReferenceMode = "auto",
    ):
        super().__init__(backbone, method, optimizer, scheduler, adapter, max_length)
        if beta <= 0:
            raise ValueError(f"beta must be > 0, got {beta}")
        if loss_type not in ("sigmoid", "ipo"):
            raise ValueError(f"unknown loss_type {loss_type!r}; use 'sigmoid' or 'ipo'")
        if not 0.0 <= label_smoothing < 0.5:
            raise ValueError(f"label_smoothing must be in [0, 0.5), got {label_smoothing}")
        self.beta, self.loss_type, self.label_smoothing = beta, loss_type, label_smoothing
        self.ref = Reference(reference, "DPO")

    @property
    def reference(self) -> str:
        """``base`` or ``precomputed`` once the model is configured (``auto`` before)."""
        return self.ref.mode

    def reference_logps(self, batch: dict[str, Any], labels: torch.Tensor) -> torch.Tensor:
        """log π_ref of the batch's 2B sequences: (2B,), no gradient; averaged per token for IPO."""
        return self.ref(
            self.model, batch["input_ids"], batch["attention_mask"], labels, self.loss_type == "ipo"
        )

    def reference_batch(self, batch: dict[str, Any]) -> None:
        self.reference_logps(batch, response_labels(batch))

    def _step(self, batch: dict[str, Any], stage: str) -> torch.Tensor:
        labels = response_labels(batch)
        ref_chosen, ref_rejected = self.reference_logps(batch, labels).chunk(2)
        chosen, rejected = self.logps(
            batch["input_ids"], batch["attention_mask"], labels, self.loss_type == "ipo"
        ).chunk(2)
        loss = dpo_loss(
            chosen, rejected, ref_chosen, ref_rejected, self.beta, self.loss_type, self.label_smoothing
        )
        r_chosen, r_rejected = implicit_rewards(chosen, rejected, ref_chosen, ref_rejected, self.beta)
        self.log_pairs(stage, loss, r_chosen, r_rejected, chosen, rejected)
        return loss
