"""A real reward model: MiniLM on Anthropic hh-rlhf harmless-base, held-out pairwise accuracy.

Every run is ``python -m ftlab.cli fit --config configs/reward.yaml`` plus overrides, one at a time.

1. **Dev selection.** The training part of the fixed split (1,850 pairs) is split again, 80/20 with
   the same rule (``random.Random(0)``), into 1,480 pairs to train on and 370 *dev* pairs; each
   candidate in ``CANDIDATES`` trains one epoch on the first and is scored on the second (seed 0).
   The held-out pairs play no part in the choice.
2. **Held-out runs.** The candidate with the best dev accuracy trains one epoch on all 1,850
   training pairs, once per seed, and is scored once, at the end, on the 462 held-out pairs.

The held-out split is fixed by the config and independent of the seed: every pair of the file is
kept (``min_words: 0``), shuffled with ``random.Random(0)`` (the data's ``seed: 0``) and the first
20 % held out (``val_fraction: 0.2``); ``heldout.txt`` lists them (``file:line``). Two baselines
need no model: the shorter response wins, the longer one wins. Runs go to ``runs/`` (not
committed); ``results.json`` and ``results.md`` are rewritten after each run, so a stopped
script resumes where it was.

    OMP_NUM_THREADS=2 nice -n 10 python experiments/hh_reward/run.py
    python experiments/hh_reward/run.py --report-only        # tables from the runs that exist
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from ftlab.stats import bootstrap_distribution

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
CONFIG = "configs/reward.yaml"
RUNS = HERE / "runs"

#: Dev candidates: name -> CLI overrides of configs/reward.yaml (the first is the config as it is).
CANDIDATES: dict[str, list[str]] = {
    "lora_lr5e-4": [],
    "lora_lr2e-3": ["--model.init_args.optimizer.init_args.lr", "0.002"],
    "full_lr3e-5": [
        "--model.init_args.method",
        "ftlab.peft.Full",
        "--model.init_args.optimizer.init_args.lr",
        "3e-5",
    ],
}


def splits(data: str) -> tuple[list[dict], list[dict]]:
    """(train, validation) pairs exactly as the config's ``PreferenceData`` splits ``data``."""
    from ftlab.cli import FtlabCLI
    from ftlab.objectives._base import Objective

    cli = FtlabCLI(
        Objective,
        subclass_mode_model=True,
        subclass_mode_data=True,
        run=False,
        args=["--config", CONFIG, "--data.init_args.source", data, "--trainer.logger", "false"],
    )
    parts = cli.datamodule.split_rows()
    return parts["train"], parts["validation"]


def length_baselines(pairs: list[dict]) -> dict[str, float]:
    """Accuracy of 'the shorter response wins' and 'the longer one wins' (ties count half)."""

    def acc(sign: int) -> float:
        score = [
            0.5
            if len(p["chosen"]) == len(p["rejected"])
            else float(sign * (len(p["chosen"]) - len(p["rejected"])) > 0)
            for p in pairs
        ]
        return sum(score) / len(score)

    return {"shorter_wins": acc(-1), "longer_wins": acc(1)}


def interval(acc: float, n: int) -> tuple[float, float]:
    """95 % bootstrap interval of an accuracy ``acc`` measured on ``n`` pairs (pairs resampled)."""
    hits = np.zeros((1, n))
    hits[0, : round(acc * n)] = 1.0
    low, high = np.percentile(bootstrap_distribution(hits), [2.5, 97.5])
    return float(low), float(high)


def machine() -> str:
    cpuinfo = Path("/proc/cpuinfo")
    names = (
        [line for line in cpuinfo.read_text().splitlines() if line.startswith("model name")]
        if cpuinfo.exists()
        else []
    )
    model = names[0].split(":", 1)[1].strip() if names else platform.processor()
    return f"{model}, {os.cpu_count()} CPUs, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}"


def fit(name: str, source: str, seed: int, overrides: list[str]) -> dict:
    """One training run into ``runs/<name>/``; returns (and keeps) its result."""
    out = RUNS / name
    if (out / "result.json").exists():
        return json.loads((out / "result.json").read_text())
    cmd = [
        sys.executable,
        "-m",
        "ftlab.cli",
        "fit",
        "--config",
        CONFIG,
        "--seed_everything",
        str(seed),
        "--data.init_args.source",
        source,
        "--trainer.default_root_dir",
        str(out),
        "--trainer.enable_checkpointing",
        "false",
        "--trainer.logger",
        "lightning.pytorch.loggers.CSVLogger",
        "--trainer.logger.init_args.save_dir",
        str(RUNS),
        "--trainer.logger.init_args.name",
        "",
        "--trainer.logger.init_args.version",
        name,
        *overrides,
    ]
    print("+", " ".join(cmd[1:]), flush=True)
    start = time.time()
    subprocess.run(cmd, check=True, cwd=ROOT, env={**os.environ, "WANDB_MODE": "disabled"})
    wall = time.time() - start
    rows = list(csv.DictReader((out / "metrics.csv").open()))
    val = [r for r in rows if r.get("val/reward_acc")]
    steps = [int(r["step"]) for r in rows if r.get("step")]
    result = {
        "name": name,
        "seed": seed,
        "overrides": overrides,
        "wall_s": round(wall, 1),
        "steps": max(steps) + 1 if steps else None,
        "val/reward_acc": float(val[-1]["val/reward_acc"]),
        "val/loss": float(val[-1]["val/loss"]),
    }
    (out / "result.json").write_text(json.dumps(result, indent=2))
    return result


def step_time(name: str) -> str:
    """Median seconds per optimizer step of a run (Lightning's ``perf/step_s``; the wall time of a run on
    this shared machine says more about the other jobs)."""
    path = RUNS / name / "metrics.csv"
    steps = (
        [float(r["perf/step_s"]) for r in csv.DictReader(path.open()) if r.get("perf/step_s")]
        if path.exists()
        else []
    )
    return f"{statistics.median(steps):.1f}" if steps else ""


def table(title: str, first: str, summary: dict, split: str, runs: list[dict], n: int) -> list[str]:
    """A markdown table of ``runs`` scored on ``n`` pairs, under the two length baselines of ``split``."""
    lines = [
        title,
        "",
        f"| {first} | {split} pairwise accuracy (95 % interval) | {split} loss | steps | median step (s) |",
        "|---|---|---|---|---|",
    ]
    baselines = summary["dev_baselines" if split == "dev" else "baselines"]
    lines += [
        f"| baseline: {name.replace('_', ' ')} | {value:.3f} | | | |" for name, value in baselines.items()
    ]
    for r in runs:
        lo, hi = interval(r["val/reward_acc"], n)
        label = f"seed {r['seed']}" if split == "held-out" else r["name"].removeprefix("dev_")
        lines.append(
            f"| {label} | {r['val/reward_acc']:.3f} ({lo:.3f}-{hi:.3f}) | {r['val/loss']:.3f} | "
            f"{r['steps']} | {step_time(r['name'])} |"
        )
    return lines


def report(summary: dict) -> None:
    (HERE / "results.json").write_text(json.dumps(summary, indent=2) + "\n")
    lines = []
    if summary["dev"]:
        title = (
            f"Dev selection (train on {summary['dev_train_pairs']} pairs, score on {summary['dev_pairs']} "
            "dev pairs, seed 0, one epoch):"
        )
        lines += [*table(title, "candidate", summary, "dev", summary["dev"], summary["dev_pairs"]), ""]
    # no dev runs but a choice: --no-dev, the config as it is
    chosen = summary.get("chosen") if summary["dev"] else f"{CONFIG} as it is, no dev selection run"
    title = (
        f"Held-out ({summary['train_pairs']} training pairs, {summary['heldout_pairs']} held-out pairs, "
        f"one epoch, chosen: {chosen}):"
    )
    lines += table(title, "run", summary, "held-out", summary["heldout"], summary["heldout_pairs"])
    accs = [r["val/reward_acc"] for r in summary["heldout"]]
    if accs:
        lines.append(
            f"| **mean over {len(accs)} seeds** | **{statistics.mean(accs):.3f}** "
            f"(range {min(accs):.3f}-{max(accs):.3f}) | | | |"
        )
    lines += ["", f"Machine: {summary['machine']}."]
    (HERE / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="../shared/data/hh_rlhf_harmless_base_test/test.jsonl.gz")
    parser.add_argument("--seeds", type=int, nargs="*", default=[0, 1, 2])
    parser.add_argument("--report-only", action="store_true")
    parser.add_argument("--no-dev", action="store_true", help="skip the dev selection: the config as it is")
    args = parser.parse_args()
    os.chdir(ROOT)
    data = str(Path(args.data).resolve())
    if not Path(data).exists():
        raise SystemExit(
            f"{args.data} not found: the shared data is expected beside the repository "
            "(../shared/data/hh_rlhf_harmless_base_test); pass --data"
        )
    train, held = splits(data)
    (HERE / "heldout.txt").write_text(
        "".join(f"{args.data}:{p['_where'].rpartition(':')[2]}\n" for p in held)
    )
    # the dev split: the training part written out as records, split again by the config's own rule
    dev_source = Path(tempfile.gettempdir()) / "ftlab-hh-reward-dev-train.jsonl"
    dev_source.write_text(
        "".join(json.dumps({k: p[k] for k in ("prompt", "chosen", "rejected")}) + "\n" for p in train)
    )
    dev_train, dev = splits(str(dev_source))
    summary = {
        "config": CONFIG,
        "data": args.data,
        "machine": machine(),
        "train_pairs": len(train),
        "heldout_pairs": len(held),
        "dev_train_pairs": len(dev_train),
        "dev_pairs": len(dev),
        "baselines": length_baselines(held),
        "dev_baselines": length_baselines(dev),
        "dev": [],
        "heldout": [],
    }
    have = (lambda name: (RUNS / name / "result.json").exists()) if args.report_only else (lambda name: True)
    for name, overrides in CANDIDATES.items():
        if not args.no_dev and have(f"dev_{name}"):
            summary["dev"].append(fit(f"dev_{name}", str(dev_source), 0, overrides))
            report(summary)
    if args.no_dev:
        summary["chosen"] = next(iter(CANDIDATES))  # the config as it is, nothing selected
    elif len(summary["dev"]) == len(CANDIDATES):
        best = max(summary["dev"], key=lambda r: r["val/reward_acc"])  # ties: the earlier candidate
        summary["chosen"] = best["name"].removeprefix("dev_")
    if "chosen" in summary:
        for seed in args.seeds:
            if have(f"seed{seed}"):
                summary["heldout"].append(fit(f"seed{seed}", data, seed, CANDIDATES[summary["chosen"]]))
                report(summary)
    report(summary)


if __name__ == "__main__":
    main()
