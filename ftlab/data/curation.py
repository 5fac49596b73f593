"""ROUGE-L diversity filter for instruction data, as in Self-Instruct (Wang et al., 2022).

An instruction is kept only if its ROUGE-L F-measure against every instruction kept before it
(and every instruction of an optional ``pool``, e.g. the seed tasks) is below ``threshold``.
With ``LCS`` the longest common subsequence of the token lists ``a`` and ``b``:
``F = 2·LCS / (|a| + |b|)`` (the F1 of ``P = LCS/|a|``, ``R = LCS/|b|``). Tokens are those of the
``rouge_score`` package without stemming (what Self-Instruct uses): lower-cased runs of ``a-z0-9``.

Comparing every pair naively is O(n²) LCS computations in Python. Here, since ``LCS ≤ |a ∩ b|``
(the multiset overlap), ``2·|a ∩ b| / (|a| + |b|)`` bounds F from above: an inverted index over the
kept instructions gives that bound against all of them in a few vectorised numpy operations, and
the exact LCS (bit-parallel, Hyyrö 2004) runs only where the bound reaches the threshold. The kept
set is exactly the naive one.
"""

from __future__ import annotations

import re
import time
from collections import Counter
from collections.abc import Iterable, Sequence

_NON_ALNUM = re.compile(r"[^a-z0-9]+")


def rouge_tokens(text: str) -> list[str]:
    """``rouge_score``'s default tokenisation (no stemmer): lower-case, split on non-``[a-z0-9]``."""
    return _NON_ALNUM.sub(" ", text.lower()).split()


def lcs_length(a: Sequence, b: Sequence) -> int:
    """Length of the longest common subsequence, bit-parallel: O(|b|) big-integer operations."""
    if len(a) < len(b):
        a, b = b, a
    if not b:
        return 0
    match: dict = {}
    for i, tok in enumerate(a):
        match[tok] = match.get(tok, 0) | (1 << i)
    full = (1 << len(a)) - 1
    v = full  # zero bits of v mark LCS positions found so far
    for tok in b:
        u = v & match.get(tok, 0)
        v = ((v + u) | (v - u)) & full
    return len(a) - v.bit_count()


def rouge_l(a: Sequence, b: Sequence) -> float:
    """ROUGE-L F-measure of two token lists (0 when either is empty, as ``rouge_score``)."""
    if not a or not b:
        return 0.0
    return 2 * lcs_length(a, b) / (len(a) + len(b))


class _Index:
    """Inverted index over kept token lists: token -> (kept positions, counts), grown by doubling."""

    def __init__(self):
        import numpy as np

        self.np = np
        self.postings: dict[str, list] = {}
        self.lengths = np.zeros(64, dtype=np.int64)
        self.tokens: list[list[str]] = []

    def add(self, tokens: list[str]) -> None:
        np, k = self.np, len(self.tokens)
        if k == len(self.lengths):
            self.lengths = np.concatenate([self.lengths, np.zeros_like(self.lengths)])
        self.lengths[k] = len(tokens)
        self.tokens.append(tokens)
        for tok, count in Counter(tokens).items():
            entry = self.postings.setdefault(
                tok, [np.zeros(8, dtype=np.int64), np.zeros(8, dtype=np.int64), 0]
            )
            ids, counts, n = entry
            if n == len(ids):
                entry[0], entry[1] = np.concatenate([ids, ids]), np.concatenate([counts, counts])
            entry[0][n], entry[1][n] = k, count
            entry[2] = n + 1

    def upper_bounds(self, tokens: list[str]):
        """``2·|tokens ∩ kept_j| / (|tokens| + |kept_j|)`` for every kept j: (K,) float64."""
        np, k = self.np, len(self.tokens)
        overlap = np.zeros(k, dtype=np.int64)
        for tok, count in Counter(tokens).items():
            entry = self.postings.get(tok)
            if entry is not None:
                ids, counts, n = entry
                overlap[ids[:n]] += np.minimum(counts[:n], count)  # ids are distinct within a posting
        return 2 * overlap / (len(tokens) + self.lengths[:k])


def rouge_filter(
    texts: Sequence[str], threshold: float = 0.7, pool: Iterable[str] = ()
) -> tuple[list[int], dict[str, float]]:
    """Indices of ``texts`` kept by the ROUGE-L filter, in order, and statistics.

    ``texts[i]`` is kept iff ``rouge_l(texts[i], t) < threshold`` for every ``t`` in ``pool`` and
    every kept ``texts[j]``, ``j < i``. Statistics: ``rows``, ``kept``, ``exact`` (LCS computations
    run), ``pairs`` (comparisons a naive filter would need at most), ``seconds``.
    """
    start = time.perf_counter()
    index = _Index()
    for text in pool:
        tokens = rouge_tokens(text)
        if tokens:
            index.add(tokens)
    np = index.np
    kept: list[int] = []
    exact = pairs = 0
    for i, text in enumerate(texts):
        tokens = rouge_tokens(text)
        if tokens and index.tokens:
            pairs += len(index.tokens)
            bounds = index.upper_bounds(tokens)
            near = np.nonzero(bounds >= threshold)[0]
            near = near[np.argsort(-bounds[near], kind="stable")]  # likeliest duplicates first
            duplicate = False
            for j in near.tolist():
                exact += 1
                if rouge_l(tokens, index.tokens[j]) >= threshold:
                    duplicate = True
                    break
            if duplicate:
                continue
        kept.append(i)
        if tokens:
            index.add(tokens)
    stats = {
        "rows": len(texts),
        "kept": len(kept),
        "exact": exact,
        "pairs": pairs,
        "seconds": time.perf_counter() - start,
    }
    return kept, stats
