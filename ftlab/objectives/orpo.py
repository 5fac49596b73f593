"""ORPO: supervised fine-tuning and preference alignment in one loss, with no reference model.

ORPO (Hong et al., 2024, arXiv:2403.07691); the loss is in ``ftlab.losses.orpo``. With ``ℓ(y)``
the length-averaged log-probability of a response and ``odds(y) = e^ℓ / (1 − e^ℓ)``:

    L = −ℓ(y_c) + λ · (−log σ(log odds(y_c) − log odds(y_r)))

The first term is SFT on the chosen responses; the second pushes the rejected ones down relative
to them. No reference policy: the method needs no switch (``Full`` works as well as LoRA) and a
step costs one forward of the pair. Batches come from ``PreferenceData`` (its ``labels`` mark the
response tokens). Logged: ``loss``, ``nll`` (the SFT term), ``log_odds_ratio``, and as for DPO
``reward_acc``, ``reward_margin``, ``rewards_chosen/rejected`` (here: the log-odds of each
response) and ``logps_chosen/rejected`` (length-averaged).
"""

from __future__ import annotations

from typing import Any

import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable

from ftlab.losses.orpo import log_odds, orpo_loss
from ftlab.models.backbone import Backbone
from ftlab.objectives._offline import OfflinePreference
from ftlab.peft.method import Method
from ftlab.preference_logps import response_labels


class ORPO(OfflinePreference):
    """Odds-ratio preference optimisation (SFT + odds-ratio term, no reference).

    Args:
        backbone: The model to align (causal LM).
        method: How to adapt it (any method: there is no reference to keep).
        optimizer: Optimizer class and arguments (trainable parameters only).
        scheduler: Learning-rate scheduler, e.g. ``ftlab.optim.WarmupLinear``.
        adapter: Start from a saved adapter.
        max_length: Sequence length (linked from the data).
        lam: λ, the weight of the odds-ratio term (the paper: 0.1-0.25).
    """

    def __init__(
        self,
        backbone: Backbone | None = None,
        method: Method | None = None,
        optimizer: OptimizerCallable = torch.optim.AdamW,
        scheduler: LRSchedulerCallable | None = None,
        adapter: str | None = None,
        max_length: int | None = None,
        lam: float = 0.1,
    ):
        super().__init__(backbone, method, optimizer, scheduler, adapter, max_length)
        if lam < 0:
            raise ValueError(f"lam must be >= 0, got {lam}")
        self.lam = lam

    def _step(self, batch: dict[str, Any], stage: str) -> torch.Tensor:
        labels = response_labels(batch)
        chosen, rejected = self.logps(
            batch["input_ids"], batch["attention_mask"], labels, average=True
        ).chunk(2)
        loss, nll, log_or = orpo_loss(chosen, rejected, self.lam)
        self.log_pairs(
            stage,
            loss,
            log_odds(chosen.detach()),
            log_odds(rejected.detach()),
            chosen,
            rejected,
            nll=nll,
            log_odds_ratio=log_or,
        )
        return loss
