"""Text pairs for embedding models: anchor/positive[/negative] or sentence1/sentence2/score.

Formats (``format``):

- ``records``: csv/tsv/json/jsonl/parquet rows with ``anchor``, ``positive`` and optionally
  ``negative`` (retrieval pairs or triplets), or ``sentence1``, ``sentence2``, ``score`` (graded
  pairs, e.g. STS 0-5); column names through ``fields``.
- ``stsb``: the original STS Benchmark files (``sts-{train,dev,test}.csv``): tab-separated, no
  header, no quoting, columns ``genre, file, year, id, score, sentence1, sentence2`` and, on some
  rows, licence columns after them (ignored).
- ``nli``: premise/hypothesis/label rows (SNLI, MultiNLI): for each premise, every entailed
  hypothesis is a positive and a contradicted one its hard negative (triplets).
- ``auto`` picks one of those from the file names and columns.

Two sources trained together (``mix_source``, e.g. STS-B graded pairs and NLI triplets): every
training step takes one batch of each (Lightning's ``CombinedLoader``, ``max_size_cycle``: an
epoch is the longer source's batches, the shorter one starts over when it runs out), as a dict
``{"main": batch, "mix": batch}``; ``Contrastive`` sums the two losses. Validation and test use
``source`` only.

A batch stacks every text of the batch in one tensor, role by role: ``input_ids`` (R·B, T) holds
the B anchors, then the B positives (then the B negatives); ``text_ids`` (R·B,) are hashes of the
texts, so duplicates are not used as each other's negatives; ``score`` (B,) is the gold score
scaled to [0, 1] by ``score_range``.
"""

from __future__ import annotations

import csv
import hashlib
import logging
import random
import sys
from functools import partial
from pathlib import Path
from typing import Any, Literal

import torch

from ftlab.data._base import ResumableLoader, ResumableSampler, TokenizedData, pad
from ftlab.data._io import SPLIT_NAMES, DataError, Record, require
from ftlab.data.synthetic import make_word

log = logging.getLogger("ftlab")

STS_COLUMNS = ("genre", "file", "year", "id", "score", "sentence1", "sentence2")
ROLES = ("anchor", "positive", "negative")
NLI_LABEL_IDS = {"0": "entailment", "1": "neutral", "2": "contradiction"}  # HF snli / multi_nli


def text_id(text: str) -> int:
    """A stable 56-bit id of a text (same in every process, unlike ``hash``)."""
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=7).digest(), "big")


def special_frame(tokenizer) -> tuple[list[int], list[int]]:
    """The special tokens a tokenizer puts before and after a text: ([CLS], [SEP]) for BERT."""
    bare = tokenizer("x", add_special_tokens=False)["input_ids"]
    full = tokenizer("x")["input_ids"]
    for i in range(len(full) - len(bare) + 1):
        if full[i : i + len(bare)] == bare:
            return full[:i], full[i + len(bare) :]
    return [], []


def read_sts(path: str | Path) -> list[Record]:
    """Rows of an STS Benchmark file: the first 7 tab-separated fields, quotes taken literally."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"data file {path} does not exist")
    csv.field_size_limit(sys.maxsize)
    rows = []
    with open(path, encoding="utf-8", newline="") as f:
        for lineno, fields in enumerate(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE), 1):
            if not fields:
                continue
            if len(fields) < len(STS_COLUMNS):
                raise DataError(
                    f"{path}:{lineno}: {len(fields)} tab-separated fields, an STS row has at least "
                    f"{len(STS_COLUMNS)} ({', '.join(STS_COLUMNS)})"
                )
            rows.append({**dict(zip(STS_COLUMNS, fields)), "_where": f"{path}:{lineno}"})
    return rows


def _sts_file(source: Path, split: str) -> Path | None:
    if source.is_file():
        return source if split == "train" else None
    for name in SPLIT_NAMES[split]:
        for candidate in (source / f"sts-{name}.csv", source / f"{name}.csv"):
            if candidate.exists():
                return candidate
    return None


class PairData(TokenizedData):
    """Sentence pairs, triplets or graded pairs for ``Contrastive``.

    Args:
        source: A file, a folder of split files (STS-B's ``sts-train.csv``/``sts-dev.csv``/
            ``sts-test.csv`` included), an HF dataset name, or ``synthetic`` (made-up words, for
            tests and offline runs).
        tokenizer: Backbone whose tokenizer to use (linked from ``model.backbone.name_or_path``).
        format: ``auto``, ``records``, ``stsb`` or ``nli`` (see the module docstring).
        fields: Column names in your file for ``anchor``, ``positive``, ``negative``,
            ``sentence1``, ``sentence2``, ``score``, ``premise``, ``hypothesis``, ``label``.
        score_range: Declared [low, high] of the gold scores; a score outside is an error.
        max_length: Tokens per text; longer texts are truncated (and counted).
        batch_size: Pairs per batch (each anchor's in-batch negatives are the other B - 1).
        num_workers: DataLoader worker processes.
        val_source: A separate validation file.
        val_fraction: Share of training rows held out when there is no validation file.
        max_samples: Cap on the rows per split.
        seed: Seed for shuffling, splitting and the synthetic task.
        synthetic_task: ``scored`` (graded pairs, 0-5), ``pairs`` or ``triplets``.
        synthetic_size: Training rows of the synthetic task (validation: a tenth, at least 64).
        mix_source: A second training file or folder (its train split), trained together with
            ``source``: each step takes a batch of each (see the module docstring).
        mix_format: ``format`` of ``mix_source``.
        mix_batch_size: Batch size of ``mix_source`` (default: ``batch_size``).
    """

    def __init__(
        self,
        source: str = "synthetic",
        tokenizer: str = "tiny-llama",
        format: Literal["auto", "records", "stsb", "nli"] = "auto",
        fields: dict[str, str] | None = None,
        score_range: tuple[float, float] = (0.0, 5.0),
        max_length: int = 128,
        batch_size: int = 32,
        num_workers: int = 0,
        val_source: str | None = None,
        val_fraction: float = 0.05,
        max_samples: int | None = None,
        seed: int = 0,
        synthetic_task: Literal["scored", "pairs", "triplets"] = "scored",
        synthetic_size: int = 2000,
        mix_source: str | None = None,
        mix_format: Literal["auto", "records", "stsb", "nli"] = "auto",
        mix_batch_size: int | None = None,
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
        names = (*ROLES, "sentence1", "sentence2", "score", "premise", "hypothesis", "label")
        unknown = set(fields or {}) - set(names)
        if unknown:
            raise ValueError(f"unknown keys {sorted(unknown)} in fields; use {list(names)}")
        self.fields = {k: k for k in names} | dict(fields or {})
        self.format = format
        self.score_range = (float(score_range[0]), float(score_range[1]))
        if not self.score_range[0] < self.score_range[1]:
            raise ValueError(f"score_range must be [low, high] with low < high, got {list(score_range)}")
        self.synthetic_task, self.synthetic_size = synthetic_task, synthetic_size
        if mix_batch_size is not None and mix_batch_size <= 0:
            raise ValueError(f"mix_batch_size must be > 0, got {mix_batch_size}")
        self.mix_source, self.mix_format, self.mix_batch_size = mix_source, mix_format, mix_batch_size
        self._frame: tuple[list[int], list[int]] | None = None

    # ------------------------------------------------------------------ rows
    def synthetic_rows(self, split: str) -> list[Record]:
        """Made-up 5-word sentences; a pair shares ``score`` of its words (0-5), a positive 4 of 5."""
        vocab = sorted({make_word(random.Random(f"pair-vocab-{i}")) for i in range(80)})
        n = self.synthetic_size if split == "train" else max(64, self.synthetic_size // 10)
        rng = random.Random(f"pairs-{self.seed}-{split}")
        rows = []
        for i in range(n):
            words = rng.sample(vocab, 10)
            first, fresh = words[:5], words[5:]
            if self.synthetic_task == "scored":
                k = rng.randint(0, 5)
                second = rng.sample(first, k) + fresh[: 5 - k]
                rng.shuffle(second)
                row = {"sentence1": " ".join(first), "sentence2": " ".join(second), "score": float(k)}
            else:
                second = rng.sample(first, 4) + fresh[:1]
                rng.shuffle(second)
                row = {"anchor": " ".join(first), "positive": " ".join(second)}
                if self.synthetic_task == "triplets":
                    row["negative"] = " ".join(rng.sample([w for w in vocab if w not in first], 5))
            rows.append({**row, "_where": f"synthetic row {i}"})
        return rows

    def resolved_format(self) -> str:
        if self.format != "auto" or self.source == "synthetic":
            return "records" if self.format == "auto" else self.format
        path = Path(self.source).expanduser()
        if (path.is_dir() and any(path.glob("sts-*.csv"))) or (
            path.is_file() and path.name.startswith("sts-")
        ):
            return "stsb"
        return "auto"  # decided from the columns of the first row

    def raw_rows(self, split: str) -> list[Record] | None:
        fmt = self.resolved_format()
        if fmt == "stsb" and self.source != "synthetic":
            if split == "validation" and self.val_source:
                rows = read_sts(self.val_source)
            else:
                path = _sts_file(Path(self.source).expanduser(), split)
                if path is None and split == "train":
                    raise DataError(f"{self.source} holds no STS-B train file (sts-train.csv)")
                rows = read_sts(path) if path else None
        else:
            rows = super().raw_rows(split)
        if rows is None:
            return None
        if fmt == "auto" and rows:
            first, f = rows[0], self.fields
            fmt = (
                "nli"
                if f["premise"] in first and f["hypothesis"] in first and f["label"] in first
                else "records"
            )
        return self._triplets(rows, split) if fmt == "nli" else [self._pair(r) for r in rows]

    def _pair(self, row: Record) -> Record:
        """One normalised row: ``texts`` (2 or 3 strings) and ``score`` (or None)."""
        f, where = self.fields, row.get("_where", "?")
        if f["score"] in row or f["sentence1"] in row:
            texts = [str(require(row, f["sentence1"])), str(require(row, f["sentence2"]))]
            return {"texts": texts, "score": self._score(require(row, f["score"]), where), "_where": where}
        texts = [str(require(row, f["anchor"])), str(require(row, f["positive"]))]
        if row.get(f["negative"]) is not None:
            texts.append(str(row[f["negative"]]))
        return {"texts": texts, "score": None, "_where": where}

    def _score(self, value: Any, where: str) -> float:
        name = self.fields["score"]
        try:
            score = float(value)
        except (TypeError, ValueError):
            raise DataError(f"{where}: field {name!r} = {value!r} is not a number") from None
        lo, hi = self.score_range
        if not lo <= score <= hi:
            raise DataError(f"{where}: field {name!r} = {score:g} is outside score_range [{lo:g}, {hi:g}]")
        return score

    def _triplets(self, rows: list[Record], split: str) -> list[Record]:
        """(premise, entailed, contradicted) per entailed hypothesis; negatives cycle if fewer."""
        f = self.fields
        groups: dict[str, dict[str, list[str]]] = {}
        where: dict[str, str] = {}
        for row in rows:
            premise, hyp = str(require(row, f["premise"])).strip(), str(require(row, f["hypothesis"])).strip()
            label = str(require(row, f["label"])).strip()
            label = NLI_LABEL_IDS.get(label, label)
            if label not in ("entailment", "neutral", "contradiction"):
                raise DataError(
                    f"{row.get('_where', '?')}: field {f['label']!r} = {label!r} is not "
                    "entailment, neutral or contradiction (or 0, 1, 2)"
                )
            groups.setdefault(premise, {"entailment": [], "contradiction": [], "neutral": []})[label].append(
                hyp
            )
            where.setdefault(premise, row.get("_where", "?"))
        out, skipped = [], 0
        for premise, g in groups.items():
            if not g["entailment"] or not g["contradiction"]:
                skipped += 1
                continue
            for i, pos in enumerate(g["entailment"]):
                neg = g["contradiction"][i % len(g["contradiction"])]
                out.append({"texts": [premise, pos, neg], "score": None, "_where": where[premise]})
        if skipped:
            log.info(
                "PairData: %s: %d of %d premises lack an entailed or a contradicted hypothesis: skipped",
                split,
                skipped,
                len(groups),
            )
        return out

    # ------------------------------------------------------------------ tensors
    def encode_text(self, text: str) -> tuple[list[int], bool]:
        """Token ids with the tokenizer's special tokens, cut to ``max_length``; and whether it was cut."""
        if self._frame is None:
            self._frame = special_frame(self.tokenizer)
        head, tail = self._frame
        ids = self.tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
        room = self.max_length - len(head) - len(tail)
        return head + ids[:room] + tail, len(ids) > room

    def encode(self, row: Record) -> dict[str, Any]:
        encoded = [self.encode_text(t) for t in row["texts"]]
        return {
            "ids": [ids for ids, _ in encoded],
            "text_ids": [text_id(t) for t in row["texts"]],
            "score": row["score"],
            "truncated": any(cut for _, cut in encoded),
            "_where": row["_where"],
        }

    def setup(self, stage: str | None = None) -> None:
        super().setup(stage)
        if self.mix_source and "mix" not in self.splits:
            other = PairData(
                self.mix_source,
                self.tokenizer_name,
                self.mix_format,
                self.fields,
                self.score_range,
                self.max_length,
                max_samples=self.max_samples,
                seed=self.seed,
            )
            self.splits["mix"] = self._encode_all(other.raw_rows("train"), "mix")
        for split, items in self.splits.items():
            shape = _shape(items[0]) if items else None
            odd = next((it for it in items if _shape(it) != shape), None)
            if odd is not None:
                raise DataError(
                    f"{odd['_where']}: the {split} split mixes pairs, triplets and scored pairs "
                    f"(this row has {_shape(odd)[1]}, the first has {shape[1]})"
                )

    def train_dataloader(self):
        main = super().train_dataloader()
        if not self.mix_source:
            return main
        from lightning.pytorch.utilities import CombinedLoader

        items, batch_size = self.splits["mix"], self.mix_batch_size or self.batch_size
        if not items:
            raise DataError(f"PairData: mix_source {self.mix_source} has no training rows")
        # Its own seeded order (seed + 1), split across ranks like the main source's.
        sampler = ResumableSampler(items, self.seed + 1, self.trainer, batch_size)
        mix = ResumableLoader(
            items,
            sampler=sampler,
            batch_size=batch_size,
            num_workers=self.num_workers,
            collate_fn=partial(self.collate, split="mix"),
        )
        return CombinedLoader({"main": main, "mix": mix}, mode="max_size_cycle")

    def collate(self, items: list[dict[str, Any]], split: str) -> dict[str, Any]:
        n_roles = len(items[0]["ids"])
        seqs = [it["ids"][r] for r in range(n_roles) for it in items]  # role-major: anchors, positives, ...
        batch = {
            "input_ids": pad(seqs, self.tokenizer.pad_token_id),  # (R·B, T)
            "attention_mask": pad([[1] * len(s) for s in seqs], 0),  # (R·B, T)
            "text_ids": torch.tensor([it["text_ids"][r] for r in range(n_roles) for it in items]),  # (R·B,)
            "roles": list(ROLES[:n_roles]),
        }
        if items[0]["score"] is not None:
            lo, hi = self.score_range
            batch["score"] = torch.tensor([(it["score"] - lo) / (hi - lo) for it in items])  # (B,) in [0, 1]
        return batch


def _shape(item: dict[str, Any]) -> tuple[int, str]:
    kind = {2: "a pair", 3: "a triplet"}[len(item["ids"])]
    return len(item["ids"]), kind if item["score"] is None else "a scored pair"
