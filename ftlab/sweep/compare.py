"""Paired comparisons between grid points from their runs' per-example validation results.

Two runs are paired when they have the same seed (so the same initialisation stream and training data
order when the seed axis sets the data seed) and were validated on the same examples (the same
``digest`` in ``val_examples.npz``). A comparison of points A and B uses the seeds both have; a seed
one of them lacks is left out and named, and points that share no seed, or whose runs saw different
examples, are refused: a paired test on unpaired runs would be wrong, not just weak.

Per-example scores of the sweep's metric come from each finished run's ``val_examples.npz`` (metric
``val/<key>`` -> array ``<key>``), or, for runs whose folders are gone, from ``examples.npz`` in the
results folder, which ``ftlab sweep`` writes beside ``results.csv`` (and which is small enough to commit).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ftlab.stats import PairedResult, mcnemar, paired_bootstrap
from ftlab.sweep.spec import Sweep, SweepError

EXAMPLES_FILE = "examples.npz"


@dataclass
class Examples:
    """One run's per-example scores of the sweep's metric, and the digest of its validation inputs."""

    values: np.ndarray  # (N,)
    digest: str


def example_key(metric: str) -> str | None:
    """The array in ``val_examples.npz`` whose mean is ``metric`` (``val/accuracy`` -> ``accuracy``)."""
    return metric.split("/", 1)[1] if metric.startswith("val/") else None


def read_run(run_dir: Path, key: str) -> Examples | None:
    """The newest ``val_examples.npz`` under ``run_dir``, if it holds ``key``."""
    found = (
        sorted(Path(run_dir).rglob("val_examples.npz"), key=lambda p: p.stat().st_mtime)
        if run_dir.exists()
        else []
    )
    if not found:
        return None
    with np.load(found[-1], allow_pickle=False) as data:
        if key not in data.files:
            return None
        return Examples(np.asarray(data[key], dtype=np.float64), str(data["digest"]))


def collect(sweep: Sweep) -> dict[str, dict[int | None, Examples]]:
    """Point label -> seed -> per-example scores, for every finished run that has them."""
    key = example_key(sweep.metric)
    if key is None:
        return {}
    saved = read_saved(sweep.out / EXAMPLES_FILE)
    out: dict[str, dict[int | None, Examples]] = {}
    for point in sweep.points:
        for run in point.runs:
            ex = read_run(run.run_dir, key) if run.result() is not None else None
            if ex is None and sweep.finished(run):
                ex = saved.get(run.label)
            if ex is not None:
                out.setdefault(point.label, {})[run.seed] = ex
    return out


def read_saved(path: Path) -> dict[str, Examples]:
    """Run label -> scores from an ``examples.npz`` written by ``save``."""
    if not path.exists():
        return {}
    with np.load(path, allow_pickle=False) as data:
        return {
            k: Examples(np.asarray(data[k], dtype=np.float64), str(data[k + "::digest"]))
            for k in data.files
            if not k.endswith("::digest")
        }


def save(sweep: Sweep, examples: dict[str, dict[int | None, Examples]]) -> None:
    """Write ``examples.npz``: per run label, its scores (float32) and ``<label>::digest``."""
    arrays = {}
    for point in sweep.points:
        for run in point.runs:
            ex = examples.get(point.label, {}).get(run.seed)
            if ex is not None:
                arrays[run.label] = ex.values.astype(np.float32)
                arrays[run.label + "::digest"] = np.array(ex.digest)
    if arrays:
        np.savez_compressed(sweep.out / EXAMPLES_FILE, **arrays)


def pair(
    a: dict[int | None, Examples], b: dict[int | None, Examples], names: tuple[str, str] = ("A", "B")
) -> tuple[list[int | None], np.ndarray, np.ndarray, list[int | None]]:
    """(shared seeds, A's (S, N) scores, B's (S, N) scores, seeds left out) for a paired test.

    Raises ``ValueError`` when A and B share no seed, or when a shared seed's runs were validated on
    different examples.
    """
    shared = [s for s in a if s in b]
    if not shared:
        raise ValueError(
            f"{names[0]} and {names[1]} share no seed with per-example results "
            f"({names[0]}: seeds {sorted(a, key=str)}, {names[1]}: seeds {sorted(b, key=str)}); "
            "a paired test needs runs of the same seeds"
        )
    shared.sort(key=lambda s: (s is None, s))
    for s in shared:
        ea, eb = a[s], b[s]
        if ea.values.shape != eb.values.shape or ea.digest != eb.digest:
            raise ValueError(
                f"seed {s}: {names[0]} and {names[1]} were validated on different examples "
                f"({len(ea.values)} vs {len(eb.values)} examples, digests {ea.digest[:8]} vs "
                f"{eb.digest[:8]}); their runs are not paired"
            )
    left_out = sorted(set(a) ^ set(b), key=str)
    return shared, np.stack([a[s].values for s in shared]), np.stack([b[s].values for s in shared]), left_out


def compare(sweep: Sweep, first: str, second: str, draws: int = 10_000) -> str:
    """A report of point ``first`` against point ``second``: means, difference, interval, p, verdict."""
    examples = collect(sweep)
    labels = [p.label for p in sweep.points]
    for name in (first, second):
        if name not in labels:
            raise SweepError(f"--compare: no grid point {name!r}; points: {', '.join(labels)}")
        if name not in examples:
            raise SweepError(
                f"--compare: point {name!r} has no finished run with per-example results for "
                f"{sweep.metric} (the objective must return them from validation_step; "
                "see ftlab/sweep/record.py)"
            )
    seeds, a, b, left_out = pair(examples[first], examples[second], (first, second))
    result = paired_bootstrap(a, b, draws=draws)
    verdict = {"A > B": f"{first} > {second}", "A < B": f"{first} < {second}"}.get(
        result.verdict, "indistinguishable at 95%"
    )
    lines = [
        f"{sweep.name}: {first} (A) vs {second} (B) on {sweep.metric}",
        f"paired over {result.seeds} seed(s) {seeds} x {result.examples} examples"
        + (f"; seeds left out (only one side has them): {left_out}" if left_out else ""),
        (
            f"A {result.mean_a:.4f}   B {result.mean_b:.4f}   A - B {result.diff:+.4f} "
            f"[95% CI {result.low:+.4f}, {result.high:+.4f}]   p = {result.p:.3g} (paired bootstrap, "
            f"{draws} draws over seeds and examples)"
        ),
    ]
    if np.isin(a, (0, 1)).all() and np.isin(b, (0, 1)).all():
        for s, ra, rb in zip(seeds, a, b):
            only_a, only_b, p = mcnemar(ra, rb)
            lines.append(
                f"seed {s}: McNemar exact p = {p:.3g} (only A right: {only_a}, only B right: {only_b})"
            )
    lines.append(f"verdict: {verdict}")
    return "\n".join(lines)


def versus_best(
    means: dict[str, float],
    examples: dict[str, dict[int | None, Examples]],
    goal: str = "max",
    draws: int = 10_000,
) -> tuple[str | None, dict[str, PairedResult | str]]:
    """The best point by mean (the highest for ``goal="max"``) and, for every other, its paired result
    against it (``point - best``), or a text saying why there is none.

    Args:
        means: Point label -> the metric's mean over its seeds.
        examples: Point label -> seed -> per-example scores (``collect`` or ``read_saved``).
        goal: ``max`` or ``min``: which end of the metric is better.
        draws: Bootstrap draws per comparison.
    """
    if not means:
        return None, {}
    pick = max if goal == "max" else min
    best = pick(means, key=means.get)
    out: dict[str, PairedResult | str] = {}
    for label in means:
        if label == best:
            continue
        if label not in examples or best not in examples:
            out[label] = "no per-example results"
            continue
        try:
            _, a, b, _ = pair(examples[label], examples[best], (label, best))
        except ValueError as err:
            out[label] = f"not paired: {err}"
            continue
        out[label] = paired_bootstrap(a, b, draws=draws)
    return best, out
