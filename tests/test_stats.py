"""ftlab.stats: intervals against hand-computed values, the paired bootstrap against a brute-force
enumeration of every resample of a tiny fixture, McNemar's exact test by hand."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from ftlab.stats import (
    bootstrap_distribution,
    bootstrap_means,
    centred_p,
    mcnemar,
    paired_bootstrap,
    summarize,
    t975,
)


def test_summary_matches_hand_computed_t_intervals():
    s = summarize([0.80, 0.82, 0.81])
    # mean 0.81, sd 0.01, half-width t(0.975, 2) * 0.01 / sqrt(3) = 4.3027 * 0.0057735 = 0.024842
    assert (s.n, s.mean, s.std) == (3, pytest.approx(0.81), pytest.approx(0.01))
    assert (s.low, s.high) == (
        pytest.approx(0.81 - 0.024842, abs=1e-6),
        pytest.approx(0.81 + 0.024842, abs=1e-6),
    )
    s = summarize([1, 2, 3, 4])  # sd sqrt(5/3) = 1.290994; half-width 3.1824 * 1.290994 / 2 = 2.054230
    assert (s.mean, s.std, s.half_width) == (
        2.5,
        pytest.approx(1.290994, abs=1e-6),
        pytest.approx(2.054230, abs=1e-5),
    )
    one = summarize([0.7])
    assert one.n == 1 and one.mean == 0.7 and math.isnan(one.std) and math.isnan(one.low)
    with pytest.raises(ValueError, match="no values"):
        summarize([])


def test_t_quantiles_match_scipy():
    stats = pytest.importorskip("scipy.stats")
    for df in [*range(1, 40), 50, 80, 120, 500]:
        assert t975(df) == pytest.approx(stats.t.ppf(0.975, df), abs=2e-4), df
    with pytest.raises(ValueError):
        t975(0)


# A tiny fixture: 2 seeds x 4 examples of correct (1) / wrong (0). The differences are correlated
# across seeds by example (examples 0 and 3 favour A under both seeds), which is what makes the
# crossed resampling (one set of example indices for every seed) differ from resampling per seed.
A = np.array([[1, 1, 0, 1], [1, 0, 1, 1]], dtype=float)
B = np.array([[0, 1, 0, 0], [0, 0, 1, 0]], dtype=float)


def _exact_distribution(diff: np.ndarray) -> np.ndarray:
    """Every equally likely bootstrap resample, enumerated: seeds S^S x examples N^N, the statistic
    computed the direct way, as the mean of diff over the drawn (seed, example) grid."""
    s, n = diff.shape
    out = []
    for seeds in itertools.product(range(s), repeat=s):
        for examples in itertools.product(range(n), repeat=n):
            out.append(diff[np.ix_(seeds, examples)].mean())
    return np.array(out)


def test_bootstrap_statistic_equals_direct_mean_on_every_resample():
    diff = A - B
    s, n = diff.shape
    seeds = list(itertools.product(range(s), repeat=s))
    examples = list(itertools.product(range(n), repeat=n))
    cs = np.array([np.bincount(t, minlength=s) for t, _ in itertools.product(seeds, examples)], dtype=float)
    ci = np.array([np.bincount(e, minlength=n) for _, e in itertools.product(seeds, examples)], dtype=float)
    np.testing.assert_allclose(bootstrap_means(diff, cs, ci), _exact_distribution(diff), atol=1e-12)


def test_paired_bootstrap_agrees_with_brute_force_reference():
    diff = A - B
    exact = _exact_distribution(diff)  # 4 x 256 equally likely resamples
    d = diff.mean()
    boot = bootstrap_distribution(diff, draws=40_000, seed=1)
    # The Monte Carlo distribution is the exact one up to sampling error (largest CDF gap).
    atoms = np.unique(exact)
    gap = max(abs(np.mean(boot <= v + 1e-9) - np.mean(exact <= v + 1e-9)) for v in atoms)
    assert gap < 0.01
    assert boot.mean() == pytest.approx(exact.mean(), abs=0.005) and exact.mean() == pytest.approx(d)
    p_exact = np.mean(np.abs(exact - d) >= abs(d) - 1e-12)
    result = paired_bootstrap(A, B, draws=40_000, seed=1)
    assert result.p == pytest.approx(p_exact, abs=0.01)
    assert result.p == pytest.approx(centred_p(boot, d))
    assert (result.seeds, result.examples, result.diff) == (2, 4, pytest.approx(d))
    assert (result.mean_a, result.mean_b) == (pytest.approx(0.75), pytest.approx(0.25))
    # The interval's ends are the exact distribution's 2.5% and 97.5% points (atoms 1/8 apart).
    lo, hi = np.percentile(exact, [2.5, 97.5])
    assert abs(result.low - lo) <= 0.125 and abs(result.high - hi) <= 0.125
    # Resampling examples per seed (not crossed) would give a narrower distribution than the reference.
    assert boot.std() == pytest.approx(exact.std(), rel=0.03)


def test_paired_bootstrap_verdicts_and_shapes():
    rng = np.random.default_rng(0)
    a = (rng.random((3, 400)) < 0.85).astype(float)
    b = np.where(rng.random((3, 400)) < 0.9, a, 1 - a)  # B: A with 10% of answers flipped
    worse = (a * (rng.random((3, 400)) < 0.8)).astype(float)  # A with 20% of its right answers lost
    assert paired_bootstrap(a, worse, draws=2000).verdict == "A > B"
    assert paired_bootstrap(worse, a, draws=2000).verdict == "A < B"
    same = paired_bootstrap(a, a, draws=500)
    assert same.verdict == "indistinguishable" and same.p == 1.0 and same.diff == 0.0
    assert paired_bootstrap(a[0], b[0], draws=500).seeds == 1  # one seed: a (N,) array is one row
    with pytest.raises(ValueError, match="same seeds, same examples"):
        paired_bootstrap(a, b[:2])


def test_mcnemar_exact_by_hand():
    # 10 examples only A gets right, 2 only B: p = 2 * (C(12,0) + C(12,1) + C(12,2)) / 2^12 = 158 / 4096
    a = np.array([1] * 10 + [0] * 2 + [1] * 5 + [0] * 3)
    b = np.array([0] * 10 + [1] * 2 + [1] * 5 + [0] * 3)
    assert mcnemar(a, b) == (10, 2, pytest.approx(158 / 4096))
    assert mcnemar(b, a) == (2, 10, pytest.approx(158 / 4096))
    assert mcnemar(a, a) == (0, 0, 1.0)
    assert mcnemar([1, 0], [0, 1])[2] == 1.0  # balanced discordance
    with pytest.raises(ValueError, match="correct/wrong"):
        mcnemar([0.5, 1], [1, 1])
