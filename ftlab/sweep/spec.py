"""A sweep file, read and checked: ``Sweep`` (what the file says), ``Point`` (a grid point) and ``Run``
(a point with one seed: its command, folder and settings fingerprint), and when a run counts as finished.

``load`` checks the file's structure; ``ftlab.sweep.planning.plan`` expands it into points and runs, checking
every point with the CLI's parser.
"""

from __future__ import annotations

import csv
import difflib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SWEEP_KEYS = ("base", "grid", "fixed", "metric", "goal", "seeds", "seed_keys", "budget", "out", "name")
BUDGET_KEYS = ("steps", "tokens", "epochs")


class SweepError(ValueError):
    """A sweep file or point that cannot run; raised before any training starts."""


@dataclass
class Point:
    """A grid point: the overrides it applies, its columns in the tables, and its runs (one per seed)."""

    overrides: list[tuple[str, Any]]  # (dotted key, value) as passed to ftlab fit, grid order
    columns: dict[str, str]  # column name -> value as text
    label: str
    dir: Path
    runs: list[Run] = field(default_factory=list)


@dataclass
class Run:
    """One ``ftlab fit`` of a point with one seed."""

    point: Point
    seed: int | None
    label: str
    run_dir: Path
    command: list[str]
    config_sha: str  # fingerprint of what the sweep file sets for this run

    def summary(self) -> Path | None:
        """The run's newest ``summary.json`` (written when fit ends), or None."""
        if not self.run_dir.exists():
            return None
        found = sorted(self.run_dir.rglob("summary.json"), key=lambda p: p.stat().st_mtime)
        return found[-1] if found else None

    def result(self) -> Path | None:
        """``summary()`` if the last attempt succeeded with this run's settings, else None."""
        info = self.info()
        if info and (
            info.get("returncode") != 0 or info.get("config_sha", self.config_sha) != self.config_sha
        ):
            return None
        return self.summary()

    def info(self) -> dict[str, Any]:
        """What the sweep recorded about the last attempt (``sweep_point.json``), or ``{}``."""
        path = self.run_dir / "sweep_point.json"
        return json.loads(path.read_text()) if path.exists() else {}


@dataclass
class Sweep:
    """What a sweep file says (``load``) and, once planned (``plan``), its points and their runs."""

    path: Path
    base: list[str]
    grid: dict[str, Any]
    fixed: dict[str, Any]
    metric: str
    goal: str  # "max" or "min": which end of the metric is better
    seeds: list[int] | None
    seed_keys: list[str] | None
    budget: dict[str, float]
    out: Path
    name: str
    points: list[Point] = field(default_factory=list)
    #: Rows of an earlier results.csv by run label: finished runs whose folders may be gone.
    previous: dict[str, dict[str, str]] = field(default_factory=dict)

    @property
    def runs(self) -> list[Run]:
        return [r for p in self.points for r in p.runs]

    def finished(self, run: Run) -> str | None:
        """Why ``run`` need not run again (None if it must): a summary in its folder with the same
        settings, or a ``done`` row with the same fingerprint in ``results.csv``."""
        if run.result() is not None:
            return str(run.result())
        row = self.previous.get(run.label)
        if row and row.get("status") == "done" and row.get("config_sha") == run.config_sha:
            return f"recorded in {self.out / 'results.csv'}"
        return None


# ---------------------------------------------------------------------------------- reading
def parse_seeds(value: Any, where: str) -> list[int]:
    """``3`` -> [0, 1, 2]; ``[0, 5]`` or ``"0,5"`` -> [0, 5]."""
    if isinstance(value, str):
        try:
            value = int(value) if "," not in value else [int(v) for v in value.split(",") if v.strip()]
        except ValueError:
            raise SweepError(
                f"{where}: seeds must be a count (3) or a list of integers (0,1,2), got {value!r}"
            ) from None
    if isinstance(value, int) and not isinstance(value, bool):
        if value < 1:
            raise SweepError(f"{where}: a seed count must be >= 1, got {value}")
        return list(range(value))
    if (
        not isinstance(value, list)
        or not value
        or not all(isinstance(v, int) and not isinstance(v, bool) for v in value)
    ):
        raise SweepError(f"{where}: seeds must be a count (3) or a non-empty list of integers, got {value!r}")
    if len(set(value)) != len(value):
        raise SweepError(f"{where}: seeds {value} repeat a value")
    return list(value)


def load(
    path: str | Path, out: str | None = None, sets: list[str] | None = None, seeds: str | None = None
) -> Sweep:
    """Read and check a sweep file (structure only; ``plan`` checks it against the config)."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise SweepError(f"sweep file {path} does not exist")
    try:
        spec = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise SweepError(f"{path} is not valid YAML: {err}") from None
    if not isinstance(spec, dict):
        raise SweepError(f"{path}: a sweep file is a mapping with keys {', '.join(SWEEP_KEYS)}")
    for key in spec:
        if key not in SWEEP_KEYS:
            raise SweepError(
                f"{path}: unknown key {key!r}{suggest(key, SWEEP_KEYS)}; sweep keys: {', '.join(SWEEP_KEYS)}"
            )
    base = spec.get("base")
    base = [base] if isinstance(base, str) else list(base or [])
    if not base:
        raise SweepError(f"{path}: 'base' (a config path or a list of them) is missing")
    for b in base:
        if not Path(b).is_file():
            raise SweepError(f"{path}: base config {b} does not exist (relative to {Path.cwd()})")
    grid = spec.get("grid") or {}
    if not isinstance(grid, dict) or not grid:
        raise SweepError(
            f"{path}: the grid is empty; give 'grid:' a dotted config key and a list of values, "
            "e.g. model.init_args.method.init_args.rank: [4, 8]"
        )
    for key, values in grid.items():
        if isinstance(values, dict):  # named points: name -> {dotted key: value}
            if not values:
                raise SweepError(f"{path}: grid key {key!r} has no named points")
            for name, sets_ in values.items():
                if sets_ is not None and not isinstance(sets_, dict):
                    raise SweepError(
                        f"{path}: grid {key!r}, point {name!r}: a named point maps dotted config "
                        f"keys to values, got {sets_!r}"
                    )
        elif not isinstance(values, list):
            raise SweepError(
                f"{path}: grid key {key!r} needs a list of values (or named points), got {values!r}"
            )
        elif not values:
            raise SweepError(f"{path}: grid key {key!r} has an empty list of values")
    fixed = spec.get("fixed") or {}
    if not isinstance(fixed, dict):
        raise SweepError(f"{path}: 'fixed' maps dotted config keys to one value each, got {fixed!r}")
    fixed = dict(fixed)
    for item in sets or []:
        key, eq, value = item.partition("=")
        if not eq or not key:
            raise SweepError(f"--set {item!r}: expected KEY=VALUE")
        fixed[key] = yaml.safe_load(value)
    seed_list = None
    if seeds is not None:
        seed_list = parse_seeds(seeds, "--seeds")
    elif spec.get("seeds") is not None:
        seed_list = parse_seeds(spec["seeds"], f"{path}: 'seeds'")
    seed_keys = spec.get("seed_keys")
    if seed_keys is not None and (
        not isinstance(seed_keys, list) or not all(isinstance(k, str) for k in seed_keys)
    ):
        raise SweepError(f"{path}: 'seed_keys' is a list of dotted config keys, got {seed_keys!r}")
    budget = _budget(spec.get("budget"), path)
    metric = str(spec.get("metric") or "val/loss")
    goal = spec.get("goal") or ("min" if re.search(r"loss|perplexity|error", metric) else "max")
    if goal not in ("max", "min"):
        raise SweepError(f"{path}: 'goal' is max or min (which end of {metric} is better), got {goal!r}")
    out_dir = Path(out or spec.get("out") or path.parent)
    return Sweep(
        path,
        base,
        grid,
        fixed,
        metric,
        goal,
        seed_list,
        seed_keys,
        budget,
        out_dir,
        str(spec.get("name") or out_dir.resolve().name),
        previous=_previous(out_dir),
    )


def _budget(value: Any, path: Path) -> dict[str, float]:
    if value is None:
        return {}
    if not isinstance(value, dict) or len(value) != 1 or next(iter(value)) not in BUDGET_KEYS:
        raise SweepError(
            f"{path}: 'budget' is one of {{steps: N}}, {{tokens: N}}, {{epochs: X}}, got {value!r}"
        )
    ((kind, amount),) = value.items()
    if not isinstance(amount, (int, float)) or isinstance(amount, bool) or amount <= 0:
        raise SweepError(f"{path}: budget {kind} must be a positive number, got {amount!r}")
    if kind != "epochs" and float(amount) != int(amount):
        raise SweepError(f"{path}: budget {kind} must be a whole number, got {amount!r}")
    return {kind: amount}


def _previous(out: Path) -> dict[str, dict[str, str]]:
    path = out / "results.csv"
    if not path.exists():
        return {}
    with open(path, newline="") as fh:
        return {row["run"]: row for row in csv.DictReader(fh) if row.get("run")}


def suggest(key: str, known) -> str:
    close = difflib.get_close_matches(key, list(known), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""
