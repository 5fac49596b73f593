"""Padding-free packing: whole samples side by side in rows of up to ``max_length`` tokens.

A padded batch of instruction samples spends most of its compute on pad tokens when lengths vary
(Alpaca's do). Packing puts several whole samples in one row instead:

    row:          [ s1 s1 s1 s1 | s2 s2 s2 | s3 s3 s3 s3 s3 | pad ]
    position_ids: [ 0  1  2  3  | 0  1  2  | 0  1  2  3  4  | 0   ]
    labels:       [ -100 …      | -100 …   | -100 …         | -100 ]   (each sample's first label: -100)

``position_ids`` restart at 0 for every sample; with no attention mask and no cache, transformers
reads the restarts (``find_packed_sequence_indices``) and masks attention block-causally, so no
token attends to another sample (flash-attention's varlen kernels read the same boundaries). A
forward with a cache (``use_cache`` left on) skips that detection: ftlab's objectives pass
``use_cache=False``. A sample's first
label is ``-100`` because the previous sample's last token would otherwise learn to predict it.
Everything else — tokens, labels, positions within a sample — is what the sample has unpacked, so
the loss per token is the same (``DataCollatorWithFlattening`` builds the same format for one row).

Rows are filled best-fit decreasing: samples longest first (ties in a seeded random order), each
into the fullest row that still has room, else a new row. The rows are fixed for the run; the
training sampler shuffles rows, so one row is one sample of the sampler (resuming and DDP see rows
as they saw samples).
"""

from __future__ import annotations

import bisect
import random
from typing import Any

import torch

from ftlab.data._base import pad
from ftlab.losses.lm import IGNORE


def best_fit_decreasing(lengths: list[int], capacity: int, seed: int = 0) -> list[list[int]]:
    """Indices of ``lengths`` grouped into bins whose lengths sum to at most ``capacity``.

    Deterministic for a seed (it breaks ties between equal lengths). O(n log capacity): bins are
    looked up by their free space, which takes at most ``capacity`` distinct values.
    """
    if any(n > capacity or n <= 0 for n in lengths):
        raise ValueError(f"every length must be in 1..{capacity} to pack")
    tiebreak = list(range(len(lengths)))
    random.Random(seed).shuffle(tiebreak)
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], tiebreak[i]))
    bins: list[list[int]] = []
    by_space: dict[int, list[int]] = {}  # free space -> bins with exactly that much room (a stack)
    spaces: list[int] = []  # sorted free-space values that some bin has
    for i in order:
        n = lengths[i]
        k = bisect.bisect_left(spaces, n)  # the smallest free space that fits
        if k < len(spaces):
            space = spaces[k]
            b = by_space[space].pop()
            if not by_space[space]:
                del by_space[space], spaces[k]
        else:
            space, b = capacity, len(bins)
            bins.append([])
        bins[b].append(i)
        left = space - n
        if left > 0:
            if left not in by_space:
                by_space[left] = []
                bisect.insort(spaces, left)
            by_space[left].append(b)
    return bins


def pack(items: list[dict[str, Any]], capacity: int, seed: int = 0) -> list[list[dict[str, Any]]]:
    """Encoded samples (``input_ids``, ``labels``) packed into rows of at most ``capacity`` tokens."""
    rows = best_fit_decreasing([len(it["input_ids"]) for it in items], capacity, seed)
    return [[items[i] for i in sorted(row)] for row in rows]  # dataset order within a row


def efficiency(rows: list[list[dict[str, Any]]], width: int) -> float:
    """Real tokens / row tokens when every row is ``width`` long."""
    real = sum(len(it["input_ids"]) for row in rows for it in row)
    return real / max(1, len(rows) * width)


def collate_packed(rows: list[list[dict[str, Any]]], pad_id: int) -> dict[str, Any]:
    """A batch of packed rows: ``input_ids``, ``labels``, ``position_ids`` (R, L), padded at the end
    to the longest row, ``attention_mask`` marking real tokens (for token counts: the objective does
    not pass it to the model, whose mask comes from the positions) and ``packing_efficiency``."""
    ids, labels, positions = [], [], []
    for row in rows:
        ids.append([t for it in row for t in it["input_ids"]])
        # a sample's first label is predicted from the previous sample's last token: never learn it
        labels.append([t for it in row for t in [IGNORE, *it.get("labels", it["input_ids"])[1:]]])
        positions.append([p for it in row for p in range(len(it["input_ids"]))])
    width = max(len(r) for r in ids)
    # the tail's positions start again at 0, so it is a sequence of its own that no real token sees
    tails = [list(range(width - len(r))) for r in ids]
    batch = {
        "input_ids": pad(ids, pad_id),  # (R, L)
        "labels": pad(labels, IGNORE),
        "position_ids": torch.tensor([p + t for p, t in zip(positions, tails)], dtype=torch.long),
        "attention_mask": pad([[1] * len(r) for r in ids], 0),
    }
    batch["packing_efficiency"] = float(batch["attention_mask"].float().mean())
    return batch
