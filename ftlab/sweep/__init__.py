"""``ftlab sweep``: run a grid of ``ftlab fit`` runs over several seeds, then tabulate, plot and compare them.

    ftlab sweep experiments/lora_rank/sweep.yaml                 # sequentially
    ftlab sweep experiments/lora_rank/sweep.yaml --parallel 2    # two runs at a time
    ftlab sweep experiments/lora_rank/sweep.yaml --seeds 3       # seeds 0, 1, 2 (or --seeds 0,5,7)
    ftlab sweep experiments/lora_rank/sweep.yaml --dry-run       # check every run, print the commands
    ftlab sweep experiments/lora_rank/sweep.yaml --compare "rank=1" "rank=64"   # paired test, no training
    ftlab sweep SWEEP.yaml --set trainer.max_steps=5 --out /tmp/smoke   # extra fixed overrides

A sweep file::

    base: configs/lora_sst2.yaml        # a config path, or a list stacked like --config a --config b
    grid:                               # dotted config keys -> values; every combination is a point
      model.init_args.method.init_args.rank: [1, 4, 16, 64]
    seeds: [0, 1, 2]                    # optional: every point runs once per seed (or a count: 3)
    fixed: {trainer.max_steps: 250}     # optional: overrides for every point
    budget: {tokens: 2000000}           # optional: {steps: N}, {tokens: N} or {epochs: X} per run
    metric: val/accuracy                # the number the tables and the plot report
    goal: max                           # optional: max or min (default: min for losses, else max)
    out: experiments/lora_rank          # optional (default: the sweep file's folder)
    name: lora_rank                     # optional (default: the out folder's name)
    seed_keys: [seed_everything, data.init_args.seed]   # optional: the keys a seed sets (this default
                                        # when the data has a seed, else seed_everything alone)

A grid value that is a mapping sets several keys below its key at once (``{targets: [query],
layers: top_half}`` under ``...method.init_args``); a mapping with a ``class_path`` replaces the class.
A grid key whose value is a mapping of *named points* is a column of its own; each point names the
dotted keys it sets, so adding a point is one line and leaves the other points' names alone::

    grid:
      method:
        lora: {model.init_args.method: {class_path: ftlab.peft.LoRA},
               model.init_args.optimizer.init_args.lr: 5.0e-4}
        full: {model.init_args.method: {class_path: ftlab.peft.Full},
               model.init_args.optimizer.init_args.lr: 3.0e-5}

Relative paths are relative to the current directory, like ``ftlab fit``'s.

Every point is parsed with the CLI's own parser before the first run starts: an unknown key (with the
nearest existing key), an empty grid, a value the config rejects, a missing base config or a strategy
the accelerator cannot run is an error, and nothing trains. Each run (point x seed) runs as ``ftlab fit
--config ... --key value ...`` in a subprocess, into ``out/runs/<point>/seed=<s>/`` (``out/runs/<point>/``
without seeds), its loggers redirected there. A seed sets ``seed_everything`` and the data's ``seed``
(weights, dropout and the training order), so runs of different points with the same seed are paired:
same data order, same validation examples. W&B gets one group per point (``<sweep>/<point>``), runs
named ``<point> seed=<s>`` and tagged with the seed.

A run is skipped when it has finished with the same settings: a ``summary.json`` in its folder, or a
``done`` row with the same ``config_sha`` in ``out/results.csv`` (so a sweep resumes from its committed
results even where the run folders are gone, and a point added to the grid runs alone). A run whose
sweep-file settings changed runs again. ``out/results.csv`` (one row per run), ``out/results.md``
(one row per point: mean, sd, 95% t-interval and n over seeds, the paired difference from the best
point with its bootstrap interval and p-value, the steps, samples and tokens each run had),
``out/plot.png`` (means with 95% error bars, seeds as dots) and ``out/examples.npz`` (per-example scores
of the metric, for paired tests) are rewritten after every finished run.

Paired tests need per-example validation results, which the objective returns from ``validation_step``
(``SequenceClassifier`` does; see ``ftlab/sweep/record.py``), and a metric ``val/<name>`` whose mean over
examples is the metric (accuracy, loss). ``--compare A B`` prints the paired bootstrap over the seeds
both points have and their validation examples, and McNemar's exact test per seed.
"""

from __future__ import annotations

import argparse
import shlex
import sys

from ftlab.sweep.planning import plan
from ftlab.sweep.spec import Point, Run, Sweep, SweepError, load

__all__ = ["Point", "Run", "Sweep", "SweepError", "load", "main", "plan"]


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(
        prog="ftlab sweep", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "sweep", help="the sweep file (YAML: base, grid, seeds, fixed, budget, metric, out, name)"
    )
    parser.add_argument("--parallel", type=int, default=1, metavar="N", help="runs at a time (default 1)")
    parser.add_argument(
        "--seeds",
        metavar="N|S,S,...",
        help="seeds for every point: a count (3 = seeds 0, 1, 2) or a list; overrides the file's",
    )
    parser.add_argument(
        "--dry-run", action="store_true", help="check every point and print the commands; run nothing"
    )
    parser.add_argument(
        "--compare",
        nargs=2,
        metavar=("A", "B"),
        help="paired test of point A against point B from finished runs; run nothing",
    )
    parser.add_argument("--out", help="results folder (overrides the file's 'out')")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="an extra fixed override for every point (repeatable), e.g. trainer.max_steps=5",
    )
    args = parser.parse_args(argv)
    if args.parallel < 1:
        raise SweepError(f"--parallel must be >= 1, got {args.parallel}")
    sweep = plan(load(args.sweep, args.out, args.set, args.seeds))
    if args.compare:
        from ftlab.sweep.compare import compare

        print(compare(sweep, *args.compare))
        return
    runs = sweep.runs
    seeds = f" x {len(sweep.seeds)} seeds" if sweep.seeds else ""
    print(
        f"ftlab sweep: {sweep.name}: {len(sweep.points)} points{seeds} = {len(runs)} runs, metric "
        f"{sweep.metric}, results in {sweep.out}",
        flush=True,
    )
    if args.dry_run:
        for i, r in enumerate(runs, 1):
            state = "done" if sweep.finished(r) else "to run"
            print(f"[{i}/{len(runs)}] {r.label} ({state}) -> {r.run_dir}\n    {shlex.join(r.command)}")
        return
    from ftlab.sweep.execute import run

    failed = run(sweep, args.parallel)
    print(f"ftlab sweep: results in {sweep.out}/: results.csv, results.md, plot.png")
    if failed:
        print(
            f"ftlab sweep: {len(failed)} of {len(runs)} runs failed: {', '.join(r.label for r in failed)}",
            file=sys.stderr,
        )
        sys.exit(1)
