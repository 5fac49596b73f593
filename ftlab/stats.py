"""Statistics for comparing runs: per-point summaries over seeds and paired tests over examples.

Pure functions on numbers and arrays; ``ftlab sweep`` and ``notebooks/compare_methods.ipynb`` use them.

- ``summarize(values)``: n, mean, sample standard deviation and the 95% Student-t interval of the mean
  over seeds, ``mean ± t(0.975, n-1) · sd / sqrt(n)`` (no interval from one value).
- ``paired_bootstrap(a, b)``: is A's metric different from B's, on the same evaluation examples and the
  same seeds? ``a`` and ``b`` are (S, N) per-example scores (S seeds, N examples; e.g. 1/0 for a
  correct/wrong prediction, so the mean is the accuracy). The statistic is the mean difference
  ``d = mean(a - b)``. Each bootstrap draw resamples seeds and examples with replacement, crossed: the
  same example indices for every drawn seed, since an example that is hard for one seed is hard for
  all; a draw's statistic is the mean of ``a - b`` over the drawn (seed, example) grid. The 95% interval
  is the draws' 2.5 and 97.5 percentiles; the two-sided p-value is the share of centred draws at least
  as far from zero as ``d`` (the null distribution shifted to zero, Efron & Tibshirani 1993, §16.4),
  ``(1 + #{|d* - d| >= |d|}) / (1 + B)``. With one seed it is the usual paired bootstrap over examples
  (Koehn 2004; Berg-Kirkpatrick et al. 2012).
- ``mcnemar(a, b)``: McNemar's exact test on one seed's correct/wrong predictions: under the null the
  b discordant pairs where only A is right and the c where only B is right split as Binomial(b + c, 1/2);
  ``p = min(1, 2 · P(X <= min(b, c)))``.

Nothing here corrects for comparing many pairs; a table that tests every point against the best one
says so.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

#: Two-sided 95% quantiles of Student's t, t(0.975, df), for df = 1..30.
_T975 = (
    12.7062,
    4.3027,
    3.1824,
    2.7764,
    2.5706,
    2.4469,
    2.3646,
    2.3060,
    2.2622,
    2.2281,
    2.2010,
    2.1788,
    2.1604,
    2.1448,
    2.1314,
    2.1199,
    2.1098,
    2.1009,
    2.0930,
    2.0860,
    2.0796,
    2.0739,
    2.0687,
    2.0639,
    2.0595,
    2.0555,
    2.0518,
    2.0484,
    2.0452,
    2.0423,
)
_Z975 = 1.959963984540054


def t975(df: int) -> float:
    """t(0.975, df): the table up to 30 degrees of freedom, then the Cornish-Fisher expansion
    around the normal quantile (error under 1e-4 from df = 30 on)."""
    if df < 1:
        raise ValueError(f"a t interval needs at least 1 degree of freedom, got {df}")
    if df <= len(_T975):
        return _T975[df - 1]
    z = _Z975
    return (
        z
        + (z**3 + z) / (4 * df)
        + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * df**2)
        + (3 * z**7 + 19 * z**5 + 17 * z**3 - 15 * z) / (384 * df**3)
    )


@dataclass(frozen=True)
class Summary:
    """A metric over seeds: n values, their mean, sample sd, and the 95% t-interval of the mean."""

    n: int
    mean: float
    std: float  # sample standard deviation (n - 1); nan for n = 1
    low: float  # 95% interval of the mean; nan for n = 1
    high: float

    @property
    def half_width(self) -> float:
        return (self.high - self.low) / 2


def summarize(values) -> Summary:
    """Mean, sample standard deviation and the 95% Student-t interval of ``values`` (floats)."""
    x = np.asarray([float(v) for v in values], dtype=np.float64)
    if x.size == 0:
        raise ValueError("no values to summarize")
    mean = float(x.mean())
    if x.size == 1:
        return Summary(1, mean, math.nan, math.nan, math.nan)
    std = float(x.std(ddof=1))
    half = t975(x.size - 1) * std / math.sqrt(x.size)
    return Summary(int(x.size), mean, std, mean - half, mean + half)


@dataclass(frozen=True)
class PairedResult:
    """A paired comparison of A against B on the same seeds and examples."""

    seeds: int
    examples: int
    mean_a: float
    mean_b: float
    diff: float  # mean(a - b)
    low: float  # 95% bootstrap interval of the difference
    high: float
    p: float  # two-sided bootstrap p-value

    @property
    def verdict(self) -> str:
        """``A > B`` or ``A < B`` when the 95% interval excludes zero, else ``indistinguishable``."""
        if self.low > 0:
            return "A > B"
        if self.high < 0:
            return "A < B"
        return "indistinguishable"


def _as_grid(x, name: str) -> np.ndarray:
    arr = np.asarray(x, dtype=np.float64)
    if arr.ndim == 1:
        arr = arr[None, :]
    if arr.ndim != 2 or arr.shape[1] == 0:
        raise ValueError(f"{name}: expected per-example scores of shape (seeds, examples), got {arr.shape}")
    return arr


def bootstrap_means(diff: np.ndarray, seed_counts: np.ndarray, example_counts: np.ndarray) -> np.ndarray:
    """The statistic of each bootstrap draw, given how often each seed and each example was drawn.

    ``diff`` is (S, N); ``seed_counts`` (B, S) and ``example_counts`` (B, N) hold draw counts summing to S
    and N per row. The mean of ``diff`` over the crossed resampled grid is
    ``sum_s sum_i cs[s] · ci[i] · diff[s, i] / (S · N)``. Returns (B,).
    """
    s, n = diff.shape
    return np.einsum("bs,sn,bn->b", seed_counts, diff, example_counts, optimize=True) / (s * n)


def bootstrap_distribution(diff, draws: int = 10_000, seed: int = 0, chunk: int = 1000) -> np.ndarray:
    """``draws`` bootstrap statistics of ``mean(diff)``, resampling seeds and examples crossed.

    Args:
        diff: (S, N) per-example differences ``a - b``, row s for seed s.
        draws: Bootstrap draws.
        seed: Seed of the resampling (the result is reproducible).
        chunk: Draws computed at once (bounds memory: chunk x N counts).
    """
    diff = _as_grid(diff, "diff")
    s, n = diff.shape
    rng = np.random.default_rng(seed)
    stats = []
    for start in range(0, draws, chunk):
        size = min(chunk, draws - start)
        cs = rng.multinomial(s, np.full(s, 1 / s), size=size).astype(np.float64)  # (b, S)
        ci = rng.multinomial(n, np.full(n, 1 / n), size=size).astype(np.float64)  # (b, N)
        stats.append(bootstrap_means(diff, cs, ci))
    return np.concatenate(stats)  # (draws,)


def paired_bootstrap(a, b, draws: int = 10_000, seed: int = 0) -> PairedResult:
    """Paired bootstrap over seeds and examples of ``mean(a) - mean(b)`` (see the module docstring).

    Args:
        a: (S, N) or (N,) per-example scores of A, row s for seed s.
        b: The same shape for B: the same seeds in the same order, the same examples in the same order.
        draws: Bootstrap draws.
        seed: Seed of the resampling (the result is reproducible).
    """
    a, b = _as_grid(a, "A"), _as_grid(b, "B")
    if a.shape != b.shape:
        raise ValueError(
            f"paired scores must have one shape: A {a.shape}, B {b.shape} (same seeds, same examples)"
        )
    diff = a - b  # (S, N)
    boot = bootstrap_distribution(diff, draws, seed)
    d = float(diff.mean())
    low, high = np.percentile(boot, [2.5, 97.5])
    return PairedResult(
        diff.shape[0],
        diff.shape[1],
        float(a.mean()),
        float(b.mean()),
        d,
        float(low),
        float(high),
        centred_p(boot, d),
    )


def centred_p(boot: np.ndarray, d: float) -> float:
    """Two-sided p-value of ``d`` from bootstrap statistics ``boot``: the share of centred draws at least
    as far from zero as ``d``, ``(1 + #{|boot - d| >= |d|}) / (1 + B)``; 1 when ``d`` is 0."""
    if d == 0:
        return 1.0
    # A tolerance, so that float noise in the sums does not decide ties.
    extreme = int(np.sum(np.abs(boot - d) >= abs(d) - 1e-12))
    return min(1.0, (1 + extreme) / (1 + len(boot)))


def mcnemar(a, b) -> tuple[int, int, float]:
    """McNemar's exact test on paired correct (1) / wrong (0) predictions of one seed.

    Returns ``(only_a, only_b, p)``: examples only A got right, only B got right, the two-sided p-value.
    """
    a, b = np.asarray(a), np.asarray(b)
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError(f"McNemar needs two 1-D arrays over the same examples, got {a.shape} and {b.shape}")
    if not np.isin(a, (0, 1)).all() or not np.isin(b, (0, 1)).all():
        raise ValueError("McNemar's test needs correct/wrong (1/0) scores per example")
    only_a = int(np.sum((a == 1) & (b == 0)))
    only_b = int(np.sum((a == 0) & (b == 1)))
    m = only_a + only_b
    if m == 0:
        return only_a, only_b, 1.0
    tail = sum(math.comb(m, k) for k in range(min(only_a, only_b) + 1)) / 2**m
    return only_a, only_b, min(1.0, 2 * tail)
