"""Unpaired preference data for KTO: a prompt, one response, and whether that response is desirable.

Formats (``format``):

- ``unpaired``: rows with ``prompt``, ``completion`` and ``label`` (true/false, 1/0, or the words
  desirable/undesirable, good/bad, yes/no, chosen/rejected);
- any pair format of ``PreferenceData`` (``records``, ``hh``, ``labelstudio``): each cleaned pair
  becomes two examples, its chosen response desirable and its rejected one undesirable
  (``pairs_to_unpaired``);
- ``auto`` tells them apart from the first row's fields.

A batch holds ``input_ids``, ``attention_mask`` and ``labels`` (response tokens) (B, T),
``desirable`` (B,) bool, and KTO's mismatched examples ``kl_input_ids``, ``kl_attention_mask``,
``kl_labels`` (B, T'): example i's prompt with the response of example i + 1 of its split (fixed
when the data is read, so a precomputed reference covers them), from which the objective
estimates how far the policy has moved on responses that were not written for the prompt.
Training data with only one label is an error: KTO learns from the contrast.
"""

from __future__ import annotations

import logging
import random
from typing import Any, Literal

import torch

from ftlab.data._base import TokenizedData, pad
from ftlab.data._io import DataError, Record, require
from ftlab.data.preference import PreferenceData, render_turns, response_frame
from ftlab.losses.logprobs import IGNORE

log = logging.getLogger("ftlab")

_TRUE = {"true", "1", "yes", "desirable", "good", "chosen", "thumbs_up", "positive"}
_FALSE = {"false", "0", "no", "undesirable", "bad", "rejected", "thumbs_down", "negative"}


def parse_label(value: Any, where: str, field: str = "label") -> bool:
    """A desirable/undesirable label from a bool, 0/1 or a word, with a clear error otherwise."""
    if isinstance(value, bool):
        return value
    if isinstance(value, int | float) and value in (0, 1):
        return bool(value)
    text = str(value).strip().lower()
    if text in _TRUE or text in _FALSE:
        return text in _TRUE
    raise DataError(
        f"{where}: field {field!r} = {value!r} is not a label; use true/false, 1/0, "
        "desirable/undesirable or good/bad"
    )


def pairs_to_unpaired(pairs: list[Record]) -> list[Record]:
    """Each ``{prompt, chosen, rejected}`` pair -> a desirable and an undesirable example."""
    out = []
    for row in pairs:
        where = row.get("_where", "?")
        out.append({"prompt": row["prompt"], "completion": row["chosen"], "label": True, "_where": where})
        out.append({"prompt": row["prompt"], "completion": row["rejected"], "label": False, "_where": where})
    return out


class UnpairedPreferenceData(PreferenceData):
    """Labelled single responses for KTO (or pairs converted to them).

    Args:
        source: A file or folder (json/jsonl/csv/tsv/parquet, ``.gz`` too), an HF dataset name, or
            ``synthetic`` (``PreferenceData``'s synthetic pairs, converted).
        tokenizer: Backbone whose tokenizer to use (linked from ``model.backbone.name_or_path``).
        format: ``auto``, ``unpaired``, or a pair format (``records``, ``hh``, ``labelstudio``).
        fields: Column names: ``prompt``, ``completion``, ``label`` for unpaired rows; ``chosen``,
            ``rejected`` (and Label Studio's ``left``/``right``) for pairs.
        min_words: Pairs only: drop pairs where either response has fewer words (0 keeps all).
        drop_identical: Pairs only: drop pairs whose chosen and rejected responses are equal.
        max_length: Tokens per prompt + response (the prompt is cut from the left first).
        batch_size: Examples per batch.
        num_workers: DataLoader worker processes.
        val_source: A separate validation file.
        val_fraction: Share of training examples held out when there is no validation file.
        max_samples: Cap on the rows per split.
        seed: Seed for shuffling, splitting and the synthetic task.
        synthetic_size: Pairs of the synthetic task (two examples each).
        synthetic_task: ``courtesy`` or ``instructions`` (see ``PreferenceData``).
        template: Prompt template of the ``instructions`` task.
    """

    def __init__(
        self,
        source: str = "synthetic",
        tokenizer: str = "tiny-llama",
        format: Literal["auto", "unpaired", "records", "hh", "labelstudio"] = "auto",
        fields: dict[str, str] | None = None,
        min_words: int = 5,
        drop_identical: bool = True,
        max_length: int = 256,
        batch_size: int = 16,
        num_workers: int = 0,
        val_source: str | None = None,
        val_fraction: float = 0.1,
        max_samples: int | None = None,
        seed: int = 0,
        synthetic_size: int = 1000,
        synthetic_task: Literal["courtesy", "instructions"] = "courtesy",
        template: str = "alpaca_short",
    ):
        fields = dict(fields or {})
        own = {"completion": fields.pop("completion", "completion"), "label": fields.pop("label", "label")}
        super().__init__(
            source=source,
            tokenizer=tokenizer,
            format="auto" if format == "unpaired" else format,
            fields=fields,
            min_words=min_words,
            drop_identical=drop_identical,
            max_length=max_length,
            batch_size=batch_size,
            num_workers=num_workers,
            val_source=val_source,
            val_fraction=val_fraction,
            max_samples=max_samples,
            seed=seed,
            synthetic_size=synthetic_size,
            synthetic_task=synthetic_task,
            template=template,
        )
        self.fields.update(own)
        self.unpaired_format = format
        self.counts: dict[str, dict[str, int]] = {}

    # ------------------------------------------------------------------ rows
    def raw_rows(self, split: str) -> list[Record] | None:
        rows = TokenizedData.raw_rows(self, split)
        if rows is None:
            return None
        f = self.fields
        unpaired = self.unpaired_format == "unpaired" or (
            self.unpaired_format == "auto"
            and bool(rows)
            and f["completion"] in rows[0]
            and f["label"] in rows[0]
        )
        examples = self._unpaired(rows) if unpaired else pairs_to_unpaired(self.pairs(rows, split))
        if split == "train":  # the two examples of a pair need not sit side by side
            random.Random(self.seed).shuffle(examples)
        for i, ex in enumerate(examples):  # fixed here, not per batch: a precomputed reference can cover it
            ex["mismatched"] = examples[(i + 1) % len(examples)]["completion"]
        good = sum(e["label"] for e in examples)
        self.counts[split] = {"desirable": good, "undesirable": len(examples) - good}
        log.info(
            "UnpairedPreferenceData: %s: %d desirable, %d undesirable examples",
            split,
            good,
            len(examples) - good,
        )
        if split == "train" and examples and good in (0, len(examples)):
            kind = "desirable" if good else "undesirable"
            raise DataError(
                f"data source {self.source}: all {len(examples)} training examples are {kind}; KTO "
                "learns from desirable and undesirable examples together: add the other label"
            )
        return examples

    def _unpaired(self, rows: list[Record]) -> list[Record]:
        f, out = self.fields, []
        for row in rows:
            where = row.get("_where", "?")
            prompt = require(row, f["prompt"])
            prompt = prompt if isinstance(prompt, str) else render_turns(prompt, where, f["prompt"])
            if not prompt.strip():
                raise DataError(
                    f"{where}: field {f['prompt']!r} is empty: an example needs the prompt it answers"
                )
            out.append(
                {
                    "prompt": prompt,
                    "completion": str(require(row, f["completion"])).strip(),
                    "label": parse_label(require(row, f["label"]), where, f["label"]),
                    "_where": where,
                }
            )
        return out

    # ------------------------------------------------------------------ tensors
    def encode(self, row: Record) -> dict[str, Any]:
        tok = self.tokenizer
        if self._frame is None:
            self._frame = response_frame(tok)
        prompt = tok(row["prompt"], add_special_tokens=False, verbose=False)["input_ids"]
        response = tok(" " + row["completion"], add_special_tokens=False, verbose=False)["input_ids"]
        other = tok(" " + row.get("mismatched", row["completion"]), add_special_tokens=False, verbose=False)[
            "input_ids"
        ]
        framed = len(prompt) + len(response) + len(self._frame[0]) + len(self._frame[1])
        return {
            "prompt": prompt,
            "response": response,
            "mismatched": other,
            "desirable": bool(row["label"]),
            "truncated": framed > self.max_length,
        }

    def _join(self, prompt: list[int], response: list[int]) -> tuple[list[int], list[int]]:
        """ids and labels of ``head + prompt + response + tail`` within ``max_length``: the response
        keeps at least half the room, the prompt is cut from its left."""
        head, tail = self._frame
        room = self.max_length - len(head) - len(tail)
        keep_r = min(len(response), max(room // 2, room - len(prompt)))
        keep_p = min(len(prompt), room - keep_r)
        p, r = (prompt[-keep_p:] if keep_p else []), response[:keep_r] + tail
        return head + p + r, [IGNORE] * (len(head) + len(p)) + r

    def collate(self, items: list[dict[str, Any]], split: str) -> dict[str, Any]:
        pad_id = self.tokenizer.pad_token_id
        joined = [self._join(it["prompt"], it["response"]) for it in items]
        mismatched = [self._join(it["prompt"], it["mismatched"]) for it in items]  # KTO's reference point
        batch = {"desirable": torch.tensor([it["desirable"] for it in items], dtype=torch.bool)}  # (B,)
        for prefix, seqs in (("", joined), ("kl_", mismatched)):
            batch[f"{prefix}input_ids"] = pad([ids for ids, _ in seqs], pad_id)  # (B, T)
            batch[f"{prefix}attention_mask"] = pad([[1] * len(ids) for ids, _ in seqs], 0)
            batch[f"{prefix}labels"] = pad([labels for _, labels in seqs], IGNORE)
        return batch
