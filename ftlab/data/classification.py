"""Sequence classification data: a text column (or a pair of them) and a label column.

Labels may be integers or names. Names map to ids in the order of ``labels`` (or sorted order
of the training labels when ``labels`` is not given); ``num_labels`` is read by the objective.
"""

from __future__ import annotations

import random
from typing import Any

from ftlab.data._base import TokenizedData, pad
from ftlab.data._io import DataError, Record, require, text


class ClassificationData(TokenizedData):
    """Text classification rows from csv/tsv/json/jsonl/parquet, a folder of splits, or the hub.

    Args:
        source: A file, a folder with ``train.*`` and ``dev.*``/``validation.*``, an HF dataset
            name, or ``synthetic`` (a tiny keyword-sentiment task for tests).
        tokenizer: Backbone whose tokenizer to use (linked from ``model.backbone.name_or_path``).
        text_field: Column with the text.
        text_pair_field: Optional second text column (sentence-pair tasks).
        label_field: Column with the label.
        labels: Label names in id order; null infers them from the training rows.
        max_length: Tokens per sample; longer ones are truncated (and counted).
        batch_size: Samples per batch.
        num_workers: DataLoader worker processes.
        val_source: A separate validation file.
        val_fraction: Share of training rows held out when there is no validation file.
        max_samples: Cap on the rows per split.
        seed: Seed for shuffling and splitting.
    """

    def __init__(
        self,
        source: str = "synthetic",
        tokenizer: str = "tiny-llama",
        text_field: str = "sentence",
        text_pair_field: str | None = None,
        label_field: str = "label",
        labels: list[str] | None = None,
        max_length: int = 128,
        batch_size: int = 32,
        num_workers: int = 0,
        val_source: str | None = None,
        val_fraction: float = 0.05,
        max_samples: int | None = None,
        seed: int = 0,
    ):
        super().__init__(
            source,
            tokenizer,
            max_length,
            batch_size,
            num_workers,
            val_source,
            val_fraction,
            max_samples,
            seed,
        )
        self.text_field, self.text_pair_field, self.label_field = text_field, text_pair_field, label_field
        self.labels = [label_name(x) for x in labels] if labels else None

    @property
    def num_labels(self) -> int:
        if self.labels is None:
            self.setup()
        return len(self.labels)

    def synthetic_rows(self, split: str) -> list[Record]:
        rng = random.Random(f"cls-{self.seed}-{split}")
        good, bad = ["great", "lovely", "superb", "fine"], ["awful", "dull", "poor", "bad"]
        filler = ["the", "film", "was", "a", "plot", "very", "and", "story", "really"]
        rows = []
        for i in range(400 if split == "train" else 64):
            label = i % 2
            words = rng.sample(filler, 4) + [rng.choice(good if label else bad)]
            rng.shuffle(words)
            rows.append({"sentence": " ".join(words), "label": label, "_where": f"synthetic row {i}"})
        return rows

    def setup(self, stage: str | None = None) -> None:
        if self.labels is None:
            train = self.raw_rows("train")
            self.labels = sorted({label_name(require(r, self.label_field)) for r in train}, key=_label_order)
        super().setup(stage)

    def encode(self, row: Record) -> dict[str, Any]:
        first = text(row, self.text_field)
        pair = text(row, self.text_pair_field) if self.text_pair_field else None
        label = label_name(require(row, self.label_field))
        if label not in self.labels:
            raise DataError(f"{row.get('_where', '?')}: label {label!r} is not one of {self.labels}")
        enc = self.tokenizer(first, pair, truncation=False)
        ids = enc["input_ids"]
        return {
            "input_ids": ids[: self.max_length],
            "label": self.labels.index(label),
            "truncated": len(ids) > self.max_length,
        }

    def collate(self, items: list[dict[str, Any]], split: str) -> dict[str, Any]:
        import torch

        return {
            "input_ids": pad([it["input_ids"] for it in items], self.tokenizer.pad_token_id),
            "attention_mask": pad([[1] * len(it["input_ids"]) for it in items], 0),
            "labels": torch.tensor([it["label"] for it in items], dtype=torch.long),
        }


def label_name(value: Any) -> str:
    """A label as its class name: numbers that are whole (``1``, ``1.0``, ``"1.0"``) are one class, "1"."""
    if isinstance(value, bool):
        return str(int(value))
    try:
        number = float(value)
    except (TypeError, ValueError):
        return str(value).strip()
    return str(int(number)) if number.is_integer() else str(value).strip()


def _label_order(label: str) -> tuple[int, float | str]:
    try:
        return (0, float(label))
    except ValueError:
        return (1, label)
