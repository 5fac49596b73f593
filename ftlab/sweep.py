"""``ftlab sweep``: run a grid of ``ftlab fit`` runs declared in one file, then tabulate and plot them.

    ftlab sweep experiments/lora_rank/sweep.yaml                 # sequentially
    ftlab sweep experiments/lora_rank/sweep.yaml --parallel 2    # two runs at a time
    ftlab sweep experiments/lora_rank/sweep.yaml --dry-run       # check every point, print the commands
    ftlab sweep SWEEP.yaml --set trainer.max_steps=5 --out /tmp/smoke   # extra fixed overrides

A sweep file::

    base: configs/lora_sst2.yaml        # a config path, or a list stacked like --config a --config b
    grid:                               # dotted config keys -> values; every combination is a point
      model.init_args.method.init_args.rank: [1, 2, 4, 8]
    fixed: {trainer.max_steps: 1500}    # optional: overrides for every point
    metric: val/accuracy                # the number the table and the plot report
    out: experiments/lora_rank          # optional (default: the sweep file's folder)
    name: lora_rank                     # optional W&B group (default: the out folder's name)

A grid value that is a mapping sets several keys below its key at once (``{targets: [query],
layers: top_half}`` under ``...method.init_args``); a mapping with a ``class_path`` replaces the
class (e.g. swaps the method). Relative paths are relative to the current directory, like
``ftlab fit``'s.

Every point is parsed with the CLI's own parser before the first run starts: an unknown key (with
the nearest existing key), an empty grid, a value the config rejects, a missing base config or a
strategy the accelerator cannot run is an error, and nothing trains. Each point then runs as
``ftlab fit --config ... --key value ...`` in a subprocess, into ``out/runs/<point>/`` (its loggers
redirected there), with W&B's ``WANDB_RUN_GROUP`` set to the sweep's name and ``WANDB_NAME`` to the
point. A point whose ``summary.json`` exists is skipped, so an interrupted sweep resumes where it
stopped. ``out/results.csv``, ``out/results.md`` and ``out/plot.png`` (metric vs the first swept key)
are rewritten after every finished point.
"""

from __future__ import annotations

import argparse
import csv
import difflib
import hashlib
import itertools
import json
import os
import re
import shlex
import subprocess
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SWEEP_KEYS = ("base", "grid", "fixed", "metric", "out", "name")
#: summary.json fields copied into results.csv after the metrics.
SUMMARY_FIELDS = ("params/trainable", "params/total", "params/trainable_pct", "perf/tokens_per_s",
                  "perf/step_s", "perf/peak_mem_gib", "steps", "method", "objective")


class SweepError(ValueError):
    """A sweep file or point that cannot run; raised before any training starts."""


@dataclass
class Point:
    overrides: list[tuple[str, Any]]  # (dotted key, value) as passed to ftlab fit, grid order
    columns: dict[str, str]  # short column name -> value as text
    label: str
    run_dir: Path
    command: list[str] = field(default_factory=list)

    def summary(self) -> Path | None:
        if not self.run_dir.exists():
            return None
        found = sorted(self.run_dir.rglob("summary.json"), key=lambda p: p.stat().st_mtime)
        return found[-1] if found else None


@dataclass
class Sweep:
    path: Path
    base: list[str]
    grid: dict[str, list[Any]]
    fixed: dict[str, Any]
    metric: str
    out: Path
    name: str
    points: list[Point] = field(default_factory=list)


# ---------------------------------------------------------------------------------- reading
def load(path: str | Path, out: str | None = None, sets: list[str] | None = None) -> Sweep:
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
            raise SweepError(f"{path}: unknown key {key!r}{_suggest(key, SWEEP_KEYS)}; "
                             f"sweep keys: {', '.join(SWEEP_KEYS)}")
    base = spec.get("base")
    base = [base] if isinstance(base, str) else list(base or [])
    if not base:
        raise SweepError(f"{path}: 'base' (a config path or a list of them) is missing")
    for b in base:
        if not Path(b).is_file():
            raise SweepError(f"{path}: base config {b} does not exist (relative to {Path.cwd()})")
    grid = spec.get("grid") or {}
    if not isinstance(grid, dict) or not grid:
        raise SweepError(f"{path}: the grid is empty; give 'grid:' a dotted config key and a list of values, "
                         "e.g. model.init_args.method.init_args.rank: [4, 8]")
    for key, values in grid.items():
        if not isinstance(values, list):
            raise SweepError(f"{path}: grid key {key!r} needs a list of values, got {values!r}")
        if not values:
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
    out_dir = Path(out or spec.get("out") or path.parent)
    return Sweep(path, base, grid, fixed, str(spec.get("metric") or "val/loss"), out_dir,
                 str(spec.get("name") or out_dir.resolve().name))


def _suggest(key: str, known) -> str:
    close = difflib.get_close_matches(key, list(known), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _flatten(key: str, value: Any):
    """(key, value) pairs for the command line: a mapping without class_path sets keys below ``key``."""
    if isinstance(value, dict) and value and "class_path" not in value:
        for sub, v in value.items():
            yield from _flatten(f"{key}.{sub}", v)
    else:
        yield key, value


def _arg(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value)


def _show(value: Any) -> str:
    """A value as a short text for labels, folder names and tables."""
    if isinstance(value, dict) and "class_path" in value:
        args = ",".join(f"{k}={_show(v)}" for k, v in (value.get("init_args") or {}).items())
        return str(value["class_path"]).rsplit(".", 1)[-1] + (f"({args})" if args else "")
    if isinstance(value, (list, tuple)):
        return ",".join(_show(v) for v in value)
    if value is None or isinstance(value, bool):
        return {None: "null", True: "true", False: "false"}[value]
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def _short_names(keys: list[str]) -> dict[str, str]:
    """Shortest unique dotted suffix of each key, ignoring ``init_args``/``class_path`` parts."""
    parts = {k: [p for p in k.split(".") if p not in ("init_args", "class_path")] or [k] for k in keys}
    names = {}
    for key, p in parts.items():
        for n in range(1, len(p) + 1):
            name = ".".join(p[-n:])
            if all(".".join(q[-n:]) != name for k2, q in parts.items() if k2 != key):
                break
        names[key] = name
    return names


def _dirname(label: str) -> str:
    slug = re.sub(r"[^A-Za-z0-9._,=+-]+", "-", label.replace(" ", "__")).strip("-") or "point"
    if len(slug) > 96:
        slug = slug[:80] + "-" + hashlib.sha1(label.encode()).hexdigest()[:10]
    return slug


# ---------------------------------------------------------------------------------- planning
def plan(sweep: Sweep) -> Sweep:
    """Expand the grid and parse every point with the CLI's parser: all errors before any run."""
    from ftlab.runs import check_strategy

    grid = [[kv for key, value in zip(sweep.grid, combo) for kv in _flatten(key, value)]
            for combo in itertools.product(*sweep.grid.values())]
    fixed = [kv for key, value in sweep.fixed.items() for kv in _flatten(key, value)]
    short = _short_names(list(dict.fromkeys(k for point in grid for k, _ in point)))
    parser = _parser(sweep)
    base_args = [a for b in sweep.base for a in ("--config", b)]
    base_keys = _keys(_parse(parser, base_args, sweep, "the base config"))
    nodes = {k.rpartition(".")[0] for k in base_keys}
    known_by_swaps: dict[str, set[str]] = {"[]": base_keys}
    for overrides in grid:
        # Keys are checked against the config as this point's class swaps (if any) shape it.
        swaps = [(k, v) for k, v in fixed + overrides
                 if isinstance(v, dict) or k.endswith("class_path") or (k in nodes and isinstance(v, str))]
        cache_key = json.dumps(swaps, default=str)
        if cache_key not in known_by_swaps:
            swapped = _parse(parser, base_args + _args(swaps), sweep, "the base config")
            known_by_swaps[cache_key] = _keys(swapped)
        known = known_by_swaps[cache_key]
        for key, _ in fixed + overrides:
            if key not in known:
                leaves = known - {k.rpartition(".")[0] for k in known}
                raise SweepError(f"{sweep.path}: key {key!r} is not in the config ({', '.join(sweep.base)})"
                                 f"{_suggest(key, leaves)}")
        label = " ".join(f"{short[k]}={_show(v)}" for k, v in overrides)
        config = _parse(parser, base_args + _args(fixed + overrides), sweep, f"point {label!r}")
        try:
            check_strategy(config.get("trainer"))
        except ValueError as err:
            raise SweepError(f"{sweep.path}: point {label!r}: {err}") from None
        run_dir = sweep.out / "runs" / _dirname(label)
        command = [sys.executable, "-m", "ftlab.cli", "fit", *base_args, *_args(fixed + overrides),
                   "--trainer.default_root_dir", str(run_dir), *_redirect_loggers(config, run_dir)]
        columns = {short[k]: _show(v) for k, v in overrides}
        sweep.points.append(Point(overrides, columns, label, run_dir, command))
    dirs = [p.run_dir for p in sweep.points]
    if len(set(dirs)) != len(dirs):
        raise SweepError(f"{sweep.path}: two grid points map to one run directory; make the values distinct")
    return sweep


def _args(overrides: list[tuple[str, Any]]) -> list[str]:
    return [a for k, v in overrides for a in (f"--{k}", _arg(v))]


def _parser(sweep: Sweep):
    """The ``ftlab fit`` parser (built once; parsing a point loads no model or data)."""
    import logging

    from ftlab.cli import FtlabCLI
    from ftlab.objectives._base import Objective

    class _ParseOnly(FtlabCLI):
        def before_instantiate_classes(self) -> None:
            pass

        def instantiate_classes(self) -> None:
            pass

    logging.getLogger("lightning.fabric.utilities.seed").setLevel(logging.WARNING)
    try:
        with warnings.catch_warnings():
            # LightningCLI warns when args= is given beside sys.argv: parsing args= is the point here.
            warnings.filterwarnings("ignore", message=".*args parameter is intended")
            cli = _ParseOnly(Objective, subclass_mode_model=True, subclass_mode_data=True, run=False,
                             parser_kwargs={"exit_on_error": False},
                             args=[a for b in sweep.base for a in ("--config", b)])
    except argparse.ArgumentError as err:
        raise SweepError(f"{sweep.path}: the base config does not parse: {err}") from None
    return cli.parser


def _parse(parser, args: list[str], sweep: Sweep, what: str):
    try:
        return parser.parse_args(args)
    except argparse.ArgumentError as err:
        raise SweepError(f"{sweep.path}: {what} does not parse:\n{err}") from None


def _keys(config) -> set[str]:
    """Every dotted key of a parsed config, leaves and the nodes above them."""
    keys = set()
    for leaf in config.keys():
        parts = leaf.split(".")
        keys.update(".".join(parts[:i]) for i in range(1, len(parts) + 1))
    return keys


def _redirect_loggers(config, run_dir: Path) -> list[str]:
    """``--trainer.logger`` with every configured logger writing into ``run_dir``."""
    loggers = config.get("trainer", {}).get("logger")
    if loggers is None or isinstance(loggers, bool):
        return []  # Lightning's default logger follows default_root_dir
    loggers = loggers if isinstance(loggers, list) else [loggers]
    out = []
    for logger in loggers:
        entry = logger.as_dict() if hasattr(logger, "as_dict") else dict(logger)
        # None is the default of every logger argument that has one: leave it out of the command.
        init = entry["init_args"] = {k: v for k, v in (entry.get("init_args") or {}).items() if v is not None}
        for key in ("save_dir", "root_dir"):
            if key in init:
                init[key] = str(run_dir)
        out.append(entry)
    return ["--trainer.logger", json.dumps(out, default=str)]


# ---------------------------------------------------------------------------------- running
def run(sweep: Sweep, parallel: int = 1) -> list[Point]:
    """Run every point without a summary; return those that failed."""
    todo = [p for p in sweep.points if p.summary() is None]
    n = len(sweep.points)
    for p in sweep.points:
        if p not in todo:
            print(f"ftlab sweep: {p.label}: done, skipped ({p.summary()})", flush=True)
    env = dict(os.environ, WANDB_RUN_GROUP=sweep.name)
    env["WANDB_TAGS"] = ",".join(t for t in [env.get("WANDB_TAGS", ""), "sweep"] if t)
    if parallel > 1 and "OMP_NUM_THREADS" not in env:
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // parallel))
    failed: list[Point] = []
    from concurrent.futures import ThreadPoolExecutor, as_completed

    with ThreadPoolExecutor(max_workers=max(1, parallel)) as pool:
        futures = {pool.submit(_run_point, p, env, sweep.points.index(p) + 1, n): p for p in todo}
        try:
            for future in as_completed(futures):
                point = futures[future]
                if not future.result():
                    failed.append(point)
                report(sweep)
        except KeyboardInterrupt:
            pool.shutdown(wait=False, cancel_futures=True)
            raise
    report(sweep)
    return failed


def _run_point(point: Point, env: dict[str, str], i: int, n: int) -> bool:
    point.run_dir.mkdir(parents=True, exist_ok=True)
    log = point.run_dir / "sweep.log"
    print(f"ftlab sweep: [{i}/{n}] {point.label}: running (log: {log})", flush=True)
    start = time.perf_counter()
    with open(log, "w") as fh:
        fh.write(shlex.join(point.command) + "\n\n")
        fh.flush()
        code = subprocess.call(point.command, stdout=fh, stderr=subprocess.STDOUT,
                               env=dict(env, WANDB_NAME=point.label))
    wall = time.perf_counter() - start
    (point.run_dir / "sweep_point.json").write_text(json.dumps(
        {"label": point.label, "overrides": point.overrides, "returncode": code, "wall_s": round(wall, 1),
         "command": point.command}, indent=2, default=str))
    if code == 0 and point.summary() is not None:
        print(f"ftlab sweep: [{i}/{n}] {point.label}: done in {wall:.0f} s", flush=True)
        return True
    tail = "".join(log.read_text().splitlines(keepends=True)[-15:])
    print(f"ftlab sweep: [{i}/{n}] {point.label}: FAILED (exit {code}, no summary.json); "
          f"end of {log}:\n{tail}",
          file=sys.stderr, flush=True)
    return False


# ---------------------------------------------------------------------------------- results
def rows(sweep: Sweep) -> tuple[list[str], list[dict[str, Any]]]:
    """(columns, rows) of results.csv: point, swept values, status, metric, then the summaries."""
    out, metrics = [], {}
    for p in sweep.points:
        row: dict[str, Any] = {"run": p.label, **p.columns}
        path = p.summary()
        info_path = p.run_dir / "sweep_point.json"
        info = json.loads(info_path.read_text()) if info_path.exists() else {}
        if path is None:
            code = info.get("returncode")
            row["status"] = ("not run" if code is None else f"failed (exit {code})" if code
                             else "no summary.json")
        else:
            summary = json.loads(path.read_text())
            row["status"] = "done"
            row["value"] = summary.get("metrics", {}).get(sweep.metric)
            for k, v in summary.get("metrics", {}).items():
                metrics[k] = None
                row[k] = v
            row.update({k: summary.get(k) for k in SUMMARY_FIELDS})
            row["wall_s"] = info.get("wall_s")
        row["metric"] = sweep.metric
        row["run_dir"] = str(p.run_dir)
        out.append(row)
    swept = _swept(sweep)
    logged = sorted(k for k in metrics if k != sweep.metric and k not in SUMMARY_FIELDS)  # perf/* are in both
    columns = ["run", *swept, "status", "metric", "value", *logged, *SUMMARY_FIELDS, "wall_s", "run_dir"]
    return columns, out


def _swept(sweep: Sweep) -> list[str]:
    """The swept columns, in grid order (points may set different keys: a point leaves the others at base)."""
    return list(dict.fromkeys(c for p in sweep.points for c in p.columns))


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:,.0f}" if abs(value) >= 1000 else f"{value:.4g}"
    return "" if value is None else str(value)


def report(sweep: Sweep) -> None:
    """Write ``results.csv``, ``results.md`` and ``plot.png`` into ``sweep.out``."""
    columns, table = rows(sweep)
    sweep.out.mkdir(parents=True, exist_ok=True)
    with open(sweep.out / "results.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(table)
    swept = _swept(sweep)
    names = {"value": sweep.metric, "params/trainable_pct": "trainable %", "perf/tokens_per_s": "tokens/s",
             "perf/peak_mem_gib": "peak GiB"}
    shown = [*swept, *names, "steps", "status"]
    heads = [names.get(c, c) for c in shown]
    fixed = ", ".join(f"`{k}={_show(v)}`" for k, v in sweep.fixed.items()) or "nothing"
    lines = [f"# Sweep `{sweep.name}`", "",
             f"Base: {', '.join(f'`{b}`' for b in sweep.base)}; fixed: "
             f"{fixed}; metric: `{sweep.metric}`.",
             "", "| " + " | ".join(heads) + " |", "|" + "---|" * len(heads)]
    lines += ["| " + " | ".join(_fmt(r.get(c)).replace("|", "\\|") for c in shown) + " |" for r in table]
    (sweep.out / "results.md").write_text("\n".join(lines) + "\n")
    plot(sweep, table, swept)


def _number(text: str) -> float | None:
    try:
        return float(text)
    except (TypeError, ValueError):
        return None


def plot(sweep: Sweep, table: list[dict[str, Any]], swept: list[str]) -> Path:
    """The metric against the first swept key (a line per value of the others), or a dot per point."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    done = [r for r in table if r.get("value") is not None]
    x_key = swept[0] if swept else "run"
    xs = [_number(r.get(x_key)) for r in done]
    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=120)
    if done and all(x is not None for x in xs):
        series: dict[str, list[tuple[float, float]]] = {}
        for r, x in zip(done, xs):
            others = " ".join(f"{k}={r[k]}" for k in swept[1:] if k in r)
            series.setdefault(others, []).append((x, r["value"]))
        for name, pts in series.items():
            pts.sort()
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=name or None)
        if min(xs) > 0 and max(xs) / min(xs) >= 8:
            ax.set_xscale("log", base=2)
        if len(set(xs)) <= 12:
            ax.set_xticks(sorted(set(xs)), [_fmt(x) for x in sorted(set(xs))])
        if len(series) > 1:
            ax.legend(fontsize=8)
        ax.set_xlabel(x_key)
        ax.set_ylabel(sweep.metric)
    else:  # categories: a dot per point (bars from zero would hide the differences that matter)
        values = [r["value"] for r in done]
        ax.plot(values, range(len(done)), "o", zorder=3)
        for i, v in enumerate(values):
            ax.annotate(_fmt(v), (v, i), xytext=(4, 4), textcoords="offset points", fontsize=7)
        ax.set_yticks(range(len(done)), [r["run"] for r in done], fontsize=8)
        if done:
            ax.set_ylim(len(done) - 0.5, -0.5)
        ax.set_xlabel(sweep.metric)
        ax.locator_params(axis="x", nbins=5)
    ax.set_title(f"{sweep.name}: {sweep.metric}" + ("" if done else " (no finished runs yet)"))
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path = sweep.out / "plot.png"
    fig.savefig(path)
    plt.close(fig)
    return path


# ---------------------------------------------------------------------------------- entry point
def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="ftlab sweep", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sweep", help="the sweep file (YAML: base, grid, fixed, metric, out, name)")
    parser.add_argument("--parallel", type=int, default=1, metavar="N", help="runs at a time (default 1)")
    parser.add_argument("--dry-run", action="store_true",
                        help="check every point and print the commands; run nothing")
    parser.add_argument("--out", help="results folder (overrides the file's 'out')")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="an extra fixed override for every point (repeatable), e.g. trainer.max_steps=5")
    args = parser.parse_args(argv)
    if args.parallel < 1:
        raise SweepError(f"--parallel must be >= 1, got {args.parallel}")
    sweep = plan(load(args.sweep, args.out, args.set))
    n = len(sweep.points)
    print(f"ftlab sweep: {sweep.name}: {n} points, metric {sweep.metric}, results in {sweep.out}", flush=True)
    if args.dry_run:
        for i, p in enumerate(sweep.points, 1):
            state = "done" if p.summary() is not None else "to run"
            print(f"[{i}/{n}] {p.label} ({state}) -> {p.run_dir}\n    {shlex.join(p.command)}")
        return
    failed = run(sweep, args.parallel)
    print(f"ftlab sweep: results in {sweep.out}/: results.csv, results.md, plot.png")
    if failed:
        print(f"ftlab sweep: {len(failed)} of {n} points failed: {', '.join(p.label for p in failed)}",
              file=sys.stderr)
        sys.exit(1)
