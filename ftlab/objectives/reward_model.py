"""Pairwise reward model: a scalar head on the trunk, trained with the Bradley–Terry loss.

``r(x, y) = w · pool(trunk(prompt ⊕ response)) + b`` read at the last non-padding token for
decoders (the whole sequence has been seen there) or mean/CLS-pooled for encoders;
``L = −log σ(r(x, y_chosen) − r(x, y_rejected) − m)`` (Ouyang et al., 2022). The trunk is adapted
by the method; the head always trains and is saved and loaded with the adapter (``heads``), so an
adapter-only file is a complete reward model.

In RLHF the reward model starts from the SFT model (Ouyang et al., 2022): ``base_adapter`` folds the
SFT run's adapter into a decoder backbone first, and the reward model's adapter file records which
one, so that a policy loading it (``ftlab.rewards``) rebuilds the same trunk.
"""

from __future__ import annotations

from typing import Any

import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import nn

from ftlab.losses.preference import bradley_terry_loss, pairwise_accuracy
from ftlab.models.backbone import Backbone
from ftlab.models.pooling import Pooling, default_pooling, pool
from ftlab.objectives._base import Objective
from ftlab.peft.method import Method
from ftlab.rollouts import base_adapter_record, check_base_adapter, sft_model


class RewardModel(Objective):
    """Scores a prompt and a response with one number; learns from preference pairs.

    Args:
        backbone: What to load; its trunk (no LM head) is used.
        method: How to adapt the trunk. Default: Full.
        optimizer: Optimizer class and arguments (trainable parameters only).
        scheduler: Learning-rate scheduler, e.g. ``ftlab.optim.WarmupLinear``.
        adapter: Start from a saved adapter (and reward head).
        base_adapter: A ``CausalLM`` run's adapter (the SFT step's) folded into a decoder backbone's
            weights before ``method`` is applied: the reward model starts from the SFT model.
        max_length: Sequence length (linked from the data).
        pooling: ``auto`` (last non-padding token for decoders, mean for encoders), ``mean``,
            ``cls``, ``last``.
        margin: Bradley–Terry margin added to every pair (a per-pair ``margin`` in the data adds to it).
        head_dropout: Dropout before the scalar head.
    """

    heads = ("head",)

    def __init__(
        self,
        backbone: Backbone | None = None,
        method: Method | None = None,
        optimizer: OptimizerCallable = torch.optim.AdamW,
        scheduler: LRSchedulerCallable | None = None,
        adapter: str | None = None,
        base_adapter: str | None = None,
        max_length: int | None = None,
        pooling: Pooling = "auto",
        margin: float = 0.0,
        head_dropout: float = 0.0,
    ):
        super().__init__(backbone, method, optimizer, scheduler, adapter, max_length)
        self.pooling, self.margin, self.head_dropout = pooling, margin, head_dropout
        self.base_adapter = base_adapter
        self.head: nn.Module | None = None

    def build(self):
        if self.base_adapter:  # the SFT model's trunk: the causal LM without its LM head
            trunk = sft_model(self.backbone, self.base_adapter, "RewardModel").base_model
        else:
            trunk = self.backbone.load("encoder")
        if self.pooling == "auto":
            self.pooling = default_pooling(trunk)
        linear = nn.Linear(trunk.config.hidden_size, 1)
        # A small start keeps early rewards near 0, so the first losses are ≈ log 2 whatever the trunk.
        nn.init.normal_(linear.weight, std=1.0 / (trunk.config.hidden_size + 1) ** 0.5)
        nn.init.zeros_(linear.bias)
        self.head = nn.Sequential(nn.Dropout(self.head_dropout), linear)
        self.head.to(dtype=next(trunk.parameters()).dtype)
        return trunk

    def configure_model(self) -> None:
        if self.model is None and self.adapter_path:
            check_base_adapter(self.adapter_path, self.base_adapter, "RewardModel")
        super().configure_model()

    def adapter_extra(self) -> dict[str, Any]:
        return base_adapter_record(self.base_adapter)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """(N, T) token ids and mask -> (N,) rewards."""
        hidden = self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state  # (N, T, H)
        return self.head(pool(hidden, attention_mask, self.pooling)).squeeze(-1).float()  # (N,)

    def rewards(self, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        """Rewards of the chosen and rejected responses, (B,) each, from one forward of both."""
        chosen, rejected = self(batch["input_ids"], batch["attention_mask"]).chunk(2)
        return chosen, rejected

    def _loss(self, batch: dict[str, Any], chosen: torch.Tensor, rejected: torch.Tensor) -> torch.Tensor:
        margin = self.margin + batch["margin"] if "margin" in batch else self.margin
        return bradley_terry_loss(chosen, rejected, margin)

    def batch_size_of(self, batch: dict[str, Any]) -> int:
        return int(batch["input_ids"].size(0)) // 2

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        chosen, rejected = self.rewards(batch)
        loss = self._loss(batch, chosen, rejected)
        n = self.batch_size_of(batch)
        self.log("train/loss", loss, prog_bar=True, batch_size=n)
        self.log("train/reward_acc", pairwise_accuracy(chosen, rejected), batch_size=n)
        return loss

    def _eval(self, batch: dict[str, Any], stage: str) -> None:
        chosen, rejected = self.rewards(batch)
        n = self.batch_size_of(batch)
        self.log(f"{stage}/loss", self._loss(batch, chosen, rejected), batch_size=n, sync_dist=True)
        self.log(
            f"{stage}/reward_acc",
            pairwise_accuracy(chosen, rejected),
            prog_bar=True,
            batch_size=n,
            sync_dist=True,
        )
        self.log(f"{stage}/reward_margin", (chosen - rejected).mean(), batch_size=n, sync_dist=True)

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._eval(batch, "val")

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._eval(batch, "test")

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        return self(batch["input_ids"], batch["attention_mask"])
