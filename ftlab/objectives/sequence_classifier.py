"""Sequence classification: a linear head on a pooled trunk, cross-entropy loss.

``logits = W · pool(trunk(x)) + b``: mean pooling for encoders, last token for decoders (or as
set). The trunk is adapted by the method; the head always trains and is saved with the adapter.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import nn
from torchmetrics.classification import MulticlassAccuracy, MulticlassF1Score

from ftlab.models.backbone import Backbone
from ftlab.models.pooling import Pooling, default_pooling, pool
from ftlab.objectives._base import Objective
from ftlab.peft.method import Method


class SequenceClassifier(Objective):
    """Text classification with any method.

    Args:
        backbone: What to load; its trunk (no LM head) is used.
        method: How to adapt the trunk. Default: Full.
        optimizer: Optimizer class and arguments (trainable parameters only).
        scheduler: Learning-rate scheduler, e.g. ``ftlab.optim.WarmupLinear``.
        adapter: Start from a saved adapter (and head) instead of a fresh method.
        max_length: Sequence length (linked from the data).
        num_labels: Classes; null reads ``num_labels`` from the datamodule.
        pooling: ``auto`` (last token for decoders, mean for encoders), ``mean``, ``cls``, ``last``.
        head_dropout: Dropout before the linear head.
    """

    heads = ("head",)

    def __init__(
        self,
        backbone: Backbone | None = None,
        method: Method | None = None,
        optimizer: OptimizerCallable = torch.optim.AdamW,
        scheduler: LRSchedulerCallable | None = None,
        adapter: str | None = None,
        max_length: int | None = None,
        num_labels: int | None = None,
        pooling: Pooling = "auto",
        head_dropout: float = 0.1,
    ):
        super().__init__(backbone, method, optimizer, scheduler, adapter, max_length)
        self.num_labels, self.pooling, self.head_dropout = num_labels, pooling, head_dropout
        self.head: nn.Module | None = None

    def build(self):
        dm = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        data_labels = int(dm.num_labels) if dm is not None and hasattr(dm, "num_labels") else None
        if self.num_labels is None:
            if data_labels is None:
                raise ValueError("SequenceClassifier needs num_labels (or a datamodule that has it)")
            self.num_labels = data_labels
        elif data_labels is not None and data_labels > self.num_labels:
            raise ValueError(
                f"model.init_args.num_labels={self.num_labels}, but the data has {data_labels} labels "
                f"({getattr(dm, 'labels', '?')}); raise num_labels or leave it unset to take the data's"
            )
        trunk = self.backbone.load("encoder")
        if self.pooling == "auto":
            self.pooling = default_pooling(trunk)
        hidden = trunk.config.hidden_size
        self.head = nn.Sequential(nn.Dropout(self.head_dropout), nn.Linear(hidden, self.num_labels))
        self.head.to(dtype=next(trunk.parameters()).dtype)
        n = self.num_labels
        # Accuracy is the share of examples right (torchmetrics' default would average per class).
        self.metrics = nn.ModuleDict(
            {"accuracy": MulticlassAccuracy(n, average="micro"), "f1": MulticlassF1Score(n, average="macro")}
        )
        return trunk

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state  # (B, T, H)
        return self.head(pool(hidden, attention_mask, self.pooling))  # (B, C)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        logits = self(batch["input_ids"], batch["attention_mask"])
        loss = F.cross_entropy(logits.float(), batch["labels"])
        self.log("train/loss", loss, prog_bar=True, batch_size=self.batch_size_of(batch))
        return loss

    def _eval(self, batch: dict[str, Any], stage: str) -> dict[str, torch.Tensor]:
        logits = self(batch["input_ids"], batch["attention_mask"])
        n = self.batch_size_of(batch)
        losses = F.cross_entropy(logits.float(), batch["labels"], reduction="none")  # (B,)
        self.log(f"{stage}/loss", losses.mean(), batch_size=n, sync_dist=True)
        for name, metric in self.metrics.items():
            metric(logits, batch["labels"])
            self.log(f"{stage}/{name}", metric, prog_bar=name == "accuracy", batch_size=n)
        pred = logits.argmax(-1)  # (B,)
        # Per-example results (their means are val/accuracy and val/loss), for paired comparisons of runs.
        return {
            "accuracy": (pred == batch["labels"]).float(),
            "loss": losses.detach(),
            "pred": pred,
            "label": batch["labels"],
        }

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, torch.Tensor]:
        return self._eval(batch, "val")

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, torch.Tensor]:
        return self._eval(batch, "test")

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        return self(batch["input_ids"], batch["attention_mask"]).argmax(-1)
