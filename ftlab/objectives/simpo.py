"""SimPO: preference optimisation with a length-normalised implicit reward and no reference model.

SimPO (Meng et al., 2024, arXiv:2405.14734); the loss is in ``ftlab.losses.simpo``:

    r(x, y) = (β / |y|) log π(y|x)          L = −log σ(r(x, y_c) − r(x, y_r) − γ)

The reward is the policy's own average log-probability, so no reference model is held or run
(``Full`` works as well as LoRA); the margin ``γ`` asks the chosen response to win by that much.
Batches come from ``PreferenceData`` (its ``labels`` mark the response tokens). Logged as DPO:
``loss``, ``reward_acc``, ``reward_margin``, ``rewards_chosen/rejected`` (β ℓ),
``logps_chosen/rejected`` (length-averaged).
"""

from __future__ import annotations

from typing import Any

import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable

from ftlab.losses.simpo import simpo_loss
from ftlab.models.backbone import Backbone
from ftlab.objectives._offline import OfflinePreference
from ftlab.peft.method import Method
from ftlab.preference_logps import response_labels


class SimPO(OfflinePreference):
    """Simple preference optimisation (length-normalised reward, target margin, no reference).

    Args:
        backbone: The model to align (causal LM).
        method: How to adapt it (any method: there is no reference to keep).
        optimizer: Optimizer class and arguments (trainable parameters only).
        scheduler: Learning-rate scheduler, e.g. ``ftlab.optim.WarmupLinear``.
        adapter: Start from a saved adapter.
        max_length: Sequence length (linked from the data).
        beta: β, the reward scale (the paper: 2-10).
        gamma: γ, the target reward margin (the paper: 0.3-1.6; γ/β ≈ 0.5).
        label_smoothing: Assumed share of flipped preference labels.
    """

    def __init__(
        self,
        backbone: Backbone | None = None,
        method: Method | None = None,
        optimizer: OptimizerCallable = torch.optim.AdamW,
        scheduler: LRSchedulerCallable | None = None,
        adapter: str | None = None,
        max_length: int | None = None,
        beta: float = 2.0,
        gamma: float = 1.0,
        label_smoothing: float = 0.0,
    ):
        super().__init__(backbone, method, optimizer, scheduler, adapter, max_length)
        if beta <= 0:
            raise ValueError(f"beta must be > 0, got {beta}")
        if not 0.0 <= label_smoothing < 0.5:
            raise ValueError(f"label_smoothing must be in [0, 0.5), got {label_smoothing}")
        self.beta, self.gamma, self.label_smoothing = beta, gamma, label_smoothing

    def _step(self, batch: dict[str, Any], stage: str) -> torch.Tensor:
        labels = response_labels(batch)
        chosen, rejected = self.logps(
            batch["input_ids"], batch["attention_mask"], labels, average=True
        ).chunk(2)
        loss, r_chosen, r_rejected = simpo_loss(chosen, rejected, self.beta, self.gamma, self.label_smoothing)
        self.log_pairs(stage, loss, r_chosen, r_rejected, chosen, rejected)
        return loss
