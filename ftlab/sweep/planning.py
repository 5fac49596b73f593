"""Planning a sweep's runs: grid points x seeds, each point checked with ``ftlab fit``'s own parser.

``plan`` expands the grid (lists, mappings that set several keys, named points), parses every point
with the CLI's parser (so an unknown key or a bad value fails before anything trains) and builds one
``Run`` per point and seed, with its command, run directory and settings fingerprint.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import itertools
import json
import re
import sys
import warnings
from pathlib import Path
from typing import Any

from ftlab.sweep.spec import Point, Run, Sweep, SweepError, suggest

#: Callbacks added to every run of a sweep: per-example validation results, and the budget it had.
RECORD_CALLBACKS = ("ftlab.sweep.record.ExampleResults", "ftlab.sweep.record.Budget")


def _flatten(key: str, value: Any):
    """(key, value) pairs for the command line: a mapping without class_path sets keys below ``key``."""
    if isinstance(value, dict) and value and "class_path" not in value:
        for sub, v in value.items():
            yield from _flatten(f"{key}.{sub}", v)
    else:
        yield key, value


def _arg(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value)


def show(value: Any) -> str:
    """A value as a short text for labels, folder names and tables."""
    if isinstance(value, dict) and "class_path" in value:
        args = ",".join(f"{k}={show(v)}" for k, v in (value.get("init_args") or {}).items())
        return str(value["class_path"]).rsplit(".", 1)[-1] + (f"({args})" if args else "")
    if isinstance(value, (list, tuple)):
        return ",".join(show(v) for v in value)
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


def _points(sweep: Sweep) -> list[tuple[list[tuple[str, Any]], dict[str, str], str]]:
    """(overrides, columns, label) of every grid combination, in grid order."""
    axes = []  # per grid key: [(overrides, column text, label part)]
    list_keys = [k for k, v in sweep.grid.items() if isinstance(v, list)]
    short = _short_names(
        list(
            dict.fromkeys(
                k for key in list_keys for value in sweep.grid[key] for k, _ in _flatten(key, value)
            )
        )
    )
    for key, values in sweep.grid.items():
        if isinstance(values, dict):
            axes.append(
                [
                    (
                        [kv for k, v in (sets or {}).items() for kv in _flatten(k, v)],
                        {key: str(name)},
                        f"{key}={name}",
                    )
                    for name, sets in values.items()
                ]
            )
        else:
            options = []
            for value in values:
                overrides = list(_flatten(key, value))
                columns = {short[k]: show(v) for k, v in overrides}
                options.append((overrides, columns, " ".join(f"{c}={t}" for c, t in columns.items())))
            axes.append(options)
    out = []
    for combo in itertools.product(*axes):
        overrides = [kv for o, _, _ in combo for kv in o]
        columns = {c: t for _, cols, _ in combo for c, t in cols.items()}
        out.append((overrides, columns, " ".join(part for _, _, part in combo)))
    return out


# ---------------------------------------------------------------------------------- planning
def plan(sweep: Sweep) -> Sweep:
    """Expand the grid and seeds and parse every point with the CLI's parser: all errors before any run."""
    from ftlab.runs import check_strategy

    fixed = [kv for key, value in sweep.fixed.items() for kv in _flatten(key, value)]
    if "steps" in sweep.budget:
        fixed.append(("trainer.max_steps", int(sweep.budget["steps"])))
    budget = {k: v for k, v in sweep.budget.items() if k != "steps"}
    records = [
        {"class_path": RECORD_CALLBACKS[0]},
        {"class_path": RECORD_CALLBACKS[1], "init_args": budget}
        if budget
        else {"class_path": RECORD_CALLBACKS[1]},
    ]
    record_args = [a for cb in records for a in ("--trainer.callbacks+", json.dumps(cb))]
    parser = _parser(sweep)
    base_args = [a for b in sweep.base for a in ("--config", b)]
    base_keys = _keys(_parse(parser, base_args, sweep, "the base config"))
    nodes = {k.rpartition(".")[0] for k in base_keys}
    seed_keys = sweep.seed_keys
    if seed_keys is None:
        seed_keys = ["seed_everything"] + (
            ["data.init_args.seed"] if "data.init_args.seed" in base_keys else []
        )
    known_by_swaps: dict[str, set[str]] = {"[]": base_keys}
    for overrides, columns, label in _points(sweep):
        # Keys are checked against the config as this point's class swaps (if any) shape it.
        swaps = [
            (k, v)
            for k, v in fixed + overrides
            if isinstance(v, dict) or k.endswith("class_path") or (k in nodes and isinstance(v, str))
        ]
        cache_key = json.dumps(swaps, default=str)
        if cache_key not in known_by_swaps:
            swapped = _parse(parser, base_args + _args(swaps), sweep, "the base config")
            known_by_swaps[cache_key] = _keys(swapped)
        known = known_by_swaps[cache_key]
        for key, _ in fixed + overrides + [(k, 0) for k in (seed_keys if sweep.seeds else [])]:
            if key not in known:
                leaves = known - {k.rpartition(".")[0] for k in known}
                raise SweepError(
                    f"{sweep.path}: key {key!r} is not in the config ({', '.join(sweep.base)})"
                    f"{suggest(key, leaves)}"
                )
        if sweep.seeds and any(k in seed_keys for k, _ in fixed + overrides):
            raise SweepError(
                f"{sweep.path}: point {label!r} sets a seed key ({', '.join(seed_keys)}) that "
                "'seeds' sets for every run; leave it out of grid and fixed"
            )
        config = _parse(parser, base_args + _args(fixed + overrides) + record_args, sweep, f"point {label!r}")
        try:
            check_strategy(config.get("trainer"))
        except ValueError as err:
            raise SweepError(f"{sweep.path}: point {label!r}: {err}") from None
        point = Point(overrides, columns, label, sweep.out / "runs" / _dirname(label))
        base_seed = config.get("seed_everything")
        seeds = sweep.seeds or [
            base_seed if isinstance(base_seed, int) and not isinstance(base_seed, bool) else None
        ]
        for seed in seeds:
            seeded = [(k, seed) for k in seed_keys] if sweep.seeds else []
            run_dir = point.dir / f"seed={seed}" if sweep.seeds else point.dir
            args = _args(fixed + overrides + seeded)
            command = [
                sys.executable,
                "-m",
                "ftlab.cli",
                "fit",
                *base_args,
                *args,
                *record_args,
                "--trainer.default_root_dir",
                str(run_dir),
                *_redirect_loggers(config, run_dir),
            ]
            sha = fingerprint(sweep.base, fixed + overrides + seeded, budget)
            point.runs.append(
                Run(point, seed, f"{label} seed={seed}" if sweep.seeds else label, run_dir, command, sha)
            )
        sweep.points.append(point)
    dirs = [r.run_dir for r in sweep.runs]
    if len(set(dirs)) != len(dirs):
        raise SweepError(f"{sweep.path}: two grid points map to one run directory; make the values distinct")
    return sweep


def fingerprint(base: list[str], overrides: list[tuple[str, Any]], budget: dict[str, float]) -> str:
    """A short hash of what the sweep file sets for a run (base paths, overrides, seed, budget).

    A finished run whose fingerprint changed runs again; edits inside the base config or the code do
    not change it (delete the run's folder and its results.csv row to re-run after those).
    """
    text = json.dumps({"base": base, "overrides": overrides, "budget": budget}, sort_keys=True, default=str)
    return hashlib.sha1(text.encode()).hexdigest()[:12]


def _args(overrides: list[tuple[str, Any]]) -> list[str]:
    return [a for k, v in overrides for a in (f"--{k}", _arg(v))]


def _parser(sweep: Sweep):
    """The ``ftlab fit`` parser for the sweep's base configs (parsing a point loads no model or data)."""
    try:
        return _parser_for(tuple(sweep.base))
    except argparse.ArgumentError as err:
        raise SweepError(f"{sweep.path}: the base config does not parse: {err}") from None


@functools.lru_cache(maxsize=4)
def _parser_for(base: tuple[str, ...]):
    """Built once per process and base (a few seconds: it imports every method, objective and data)."""
    import logging

    from ftlab.cli import FtlabCLI
    from ftlab.objectives._base import Objective

    class _ParseOnly(FtlabCLI):
        def before_instantiate_classes(self) -> None:
            pass

        def instantiate_classes(self) -> None:
            pass

    logging.getLogger("lightning.fabric.utilities.seed").setLevel(logging.WARNING)
    with warnings.catch_warnings():
        # LightningCLI warns when args= is given beside sys.argv: parsing args= is the point here.
        warnings.filterwarnings("ignore", message=".*args parameter is intended")
        cli = _ParseOnly(
            Objective,
            subclass_mode_model=True,
            subclass_mode_data=True,
            run=False,
            parser_kwargs={"exit_on_error": False},
            args=[a for b in base for a in ("--config", b)],
        )
    return cli.parser


def _parse(parser, args: list[str], sweep: Sweep, what: str):
    try:
        return _parse_cached(parser, tuple(args))
    except argparse.ArgumentError as err:
        raise SweepError(f"{sweep.path}: {what} does not parse:\n{err}") from None


@functools.lru_cache(maxsize=256)
def _parse_cached(parser, args: tuple[str, ...]):
    """Parsing a point takes about a second (every value is type-checked): re-planning reuses it."""
    return parser.parse_args(list(args))


def _keys(config) -> set[str]:
    """Every dotted key of a parsed config, leaves and the nodes above them."""
    keys = set()
    for leaf in config.keys():  # noqa: SIM118 - a jsonargparse Namespace: keys() gives the dotted leaves
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
