"""The seed's RLHF pipeline end to end: SFT -> reward model -> PPO and GRPO against the learned reward.

Each step is one ``python -m ftlab.cli fit`` on a YAML of this folder, reading the adapter the step
before wrote under ``runs/``:

    1. fit sft.yaml                  LoRA SFT on the embedded instruction task -> runs/sft/seed0/adapter
    2. fit reward.yaml               RewardModel on rule-made pairs, its trunk the SFT model
                                     (base_adapter: the SFT adapter) -> runs/reward/seed0/adapter
    3. validate ppo.yaml             iteration 0: the SFT model's greedy answers, scored by both rewards
       fit ppo.yaml, fit grpo.yaml   policy = SFT model + a fresh LoRA, reward = the step-2 adapter;
                                     one run per seed -> runs/{ppo,grpo}/seed<N>/metrics.csv
       fit *_true_rule.yaml          controls: the same, optimising the true rule instead (an oracle)
    4. predict                       greedy answers of each seed-0 policy -> examples_<algorithm>.jsonl

Then it gathers, per algorithm, seed and validation (every 3 iterations, 64 held-out prompts,
greedy answers): the learned reward (``val/reward/reward_model``), the true rule's score
(``val/reward/true_rule``, exact match) and the KL to the SFT model, into ``results.csv``,
``results.md`` (medians over seeds, with the range) and ``plot.png``; ``summary.json`` holds the
SFT exact match, the reward model's held-out pair accuracy and the wall times. Steps already done
(their output exists) are skipped, so a stopped run resumes.

    OMP_NUM_THREADS=2 nice -n 10 python experiments/rlhf_pipeline/run.py --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
RUNS = HERE / "runs"
REL = HERE.relative_to(ROOT)


def cli(*args: str) -> float:
    """Run one ftlab command from the project root; returns its wall time in seconds."""
    start = time.time()
    print("+ python -m ftlab.cli " + " ".join(args), flush=True)
    subprocess.run(
        [sys.executable, "-m", "ftlab.cli", *args],
        check=True,
        cwd=ROOT,
        env={**os.environ, "WANDB_MODE": "disabled"},
    )
    return time.time() - start


def metrics(path: Path) -> list[dict[str, str]]:
    return list(csv.DictReader(path.open())) if path.exists() else []


def last(rows: list[dict[str, str]], key: str) -> float | None:
    values = [float(r[key]) for r in rows if r.get(key)]
    return values[-1] if values else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="*", default=[0, 1, 2], help="seeds of step 3")
    parser.add_argument("--algorithms", nargs="*", default=["ppo", "grpo", "ppo_true_rule", "grpo_true_rule"])
    parser.add_argument(
        "--dev-check", action="store_true", help="also run dev_check() (the controls, longer)"
    )
    args = parser.parse_args()
    walls: dict[str, float] = (
        json.loads((RUNS / "walls.json").read_text()) if (RUNS / "walls.json").exists() else {}
    )
    RUNS.mkdir(exist_ok=True)

    def step(name: str, done: Path, *command: str) -> None:
        if not done.exists():
            walls[name] = round(cli(*command), 1)
            (RUNS / "walls.json").write_text(json.dumps(walls, indent=2))

    step("sft", RUNS / "sft/seed0/adapter", "fit", "--config", f"{REL}/sft.yaml")
    step("reward", RUNS / "reward/seed0/adapter", "fit", "--config", f"{REL}/reward.yaml")
    step(
        "iteration0",
        RUNS / "iteration0/seed0/metrics.csv",
        "validate",
        "--config",
        f"{REL}/ppo.yaml",
        "--trainer.logger.init_args.name",
        "iteration0",
    )
    for seed in args.seeds:  # seed by seed: every algorithm of a seed before the next seed
        for algo in args.algorithms:
            step(
                f"{algo}_seed{seed}",
                RUNS / f"{algo}/seed{seed}/adapter",
                "fit",
                "--config",
                f"{REL}/{algo}.yaml",
                "--seed_everything",
                str(seed),
                "--trainer.logger.init_args.version",
                f"seed{seed}",
            )
    for algo in args.algorithms:  # what the seed-0 policies answer to held-out prompts (greedy)
        if (RUNS / f"{algo}/seed0/adapter").exists():
            step(
                f"predict_{algo}",
                RUNS / f"predict_{algo}/seed0/predictions.jsonl",
                "predict",
                "--config",
                f"{REL}/{algo}.yaml",
                "--model.init_args.adapter",
                f"{REL}/runs/{algo}/seed0/adapter",
                "--trainer.logger.init_args.name",
                f"predict_{algo}",
                "--trainer.limit_predict_batches",
                "2",
            )
            rows = (RUNS / f"predict_{algo}/seed0/predictions.jsonl").read_text().splitlines()
            (HERE / f"examples_{algo}.jsonl").write_text("\n".join(rows[:16]) + "\n")
    gather(args.algorithms, args.seeds, walls)
    if args.dev_check:
        dev_check()


def dev_check(lr: str = "0.003", iterations: int = 60) -> None:
    """Can step 3 improve the rule at all with more steps? The two controls (the true rule as the
    reward) at a 3x higher learning rate for twice the iterations, seed 0, no validation: only the
    *training* reward (sampled answers to training prompts) is read, so no held-out number is used
    to choose anything. Writes ``dev_check.csv`` (per iteration) and prints means over 10 iterations."""
    out = RUNS / "dev_check"
    rows = []
    for algo in ("ppo_true_rule", "grpo_true_rule"):
        done = out / algo / f"lr{lr}" / "metrics.csv"
        if not done.exists():
            cli(
                "fit",
                "--config",
                f"{REL}/{algo}.yaml",
                "--trainer.limit_train_batches",
                str(iterations),
                "--trainer.limit_val_batches",
                "0",
                "--model.init_args.optimizer.init_args.lr",
                lr,
                "--trainer.logger.init_args.save_dir",
                str(out),
                "--trainer.logger.init_args.version",
                f"lr{lr}",
                "--trainer.default_root_dir",
                str(out / algo),
            )
        for i, r in enumerate(r for r in metrics(done) if r.get("train/reward")):
            rows.append(
                {
                    "algorithm": algo,
                    "lr": lr,
                    "iteration": i + 1,
                    "train/reward": float(r["train/reward"]),
                    "train/kl": float(r["train/kl"]),
                }
            )
    with (HERE / "dev_check.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["algorithm", "lr", "iteration", "train/reward", "train/kl"])
        writer.writeheader()
        writer.writerows(rows)
    for algo in ("ppo_true_rule", "grpo_true_rule"):
        r = [x for x in rows if x["algorithm"] == algo]
        blocks = [r[i : i + 10] for i in range(0, len(r), 10)]
        print(
            algo,
            "true rule on training samples, mean per 10 iterations:",
            [round(statistics.mean(x["train/reward"] for x in b), 3) for b in blocks],
            "KL:",
            [round(statistics.mean(x["train/kl"] for x in b), 2) for b in blocks],
        )


def gather(algorithms: list[str], seeds: list[int], walls: dict[str, float]) -> None:
    sft, rm = metrics(RUNS / "sft/seed0/metrics.csv"), metrics(RUNS / "reward/seed0/metrics.csv")
    zero = metrics(RUNS / "iteration0/seed0/metrics.csv")
    start = {
        "val/reward/reward_model": last(zero, "val/reward/reward_model"),
        "val/reward/true_rule": last(zero, "val/reward/true_rule"),
        "val/kl": last(zero, "val/kl"),
    }
    rows = []
    for algo in algorithms:
        for seed in seeds:
            rows.append({"algorithm": algo, "seed": seed, "iteration": 0, **start})
            for r in metrics(RUNS / f"{algo}/seed{seed}/metrics.csv"):
                if r.get("val/reward/true_rule"):
                    rows.append(
                        {
                            "algorithm": algo,
                            "seed": seed,
                            "iteration": int(float(r["val/iteration"])),
                            **{k: float(r[k]) for k in start},
                        }
                    )
    with (HERE / "results.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["algorithm", "seed", "iteration", *start])
        writer.writeheader()
        writer.writerows(rows)
    summary = {
        "sft_val_exact_match": [float(r["val/exact_match"]) for r in sft if r.get("val/exact_match")],
        "reward_model_heldout_acc": [float(r["val/reward_acc"]) for r in rm if r.get("val/reward_acc")],
        "iteration0": start,
        "walls_s": walls,
    }
    (HERE / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    lines = [
        (
            "| algorithm | iteration | learned reward: median over seeds (range) | true rule: exact match "
            "| KL to SFT (nats) |"
        ),
        "|---|---|---|---|---|",
    ]
    for algo in algorithms:
        its = sorted({r["iteration"] for r in rows if r["algorithm"] == algo})
        for it in its:
            at = [r for r in rows if r["algorithm"] == algo and r["iteration"] == it]
            if len(at) < len(seeds) and it:
                continue
            med = {k: statistics.median(r[k] for r in at) for k in start}
            span = {k: (min(r[k] for r in at), max(r[k] for r in at)) for k in start}
            lines.append(
                f"| {algo} | {it} | {med['val/reward/reward_model']:.3f} "
                f"({span['val/reward/reward_model'][0]:.3f}-{span['val/reward/reward_model'][1]:.3f}) | "
                f"{med['val/reward/true_rule']:.3f} ({span['val/reward/true_rule'][0]:.3f}-"
                f"{span['val/reward/true_rule'][1]:.3f}) | {med['val/kl']:.2f} ({span['val/kl'][0]:.2f}-"
                f"{span['val/kl'][1]:.2f}) |"
            )
    (HERE / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    plot(rows, algorithms)


def plot(rows: list[dict], algorithms: list[str]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for ax, key, title in zip(
        axes,
        ("val/reward/reward_model", "val/reward/true_rule", "val/kl"),
        ("learned reward (RM score)", "true rule: exact match", "KL to the SFT model"),
    ):
        for algo, color in zip(algorithms, ("tab:blue", "tab:orange", "tab:cyan", "tab:red", "tab:green")):
            style = "--" if algo.endswith("_true_rule") else "-"  # controls: the true rule optimised
            for seed in sorted({r["seed"] for r in rows if r["algorithm"] == algo}):
                pts = sorted(
                    (r["iteration"], r[key]) for r in rows if r["algorithm"] == algo and r["seed"] == seed
                )
                ax.plot(*zip(*pts), style, color=color, alpha=0.8, label=algo if seed == 0 else None)
        ax.set_title(title)
        ax.set_xlabel("iteration")
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(HERE / "plot.png", dpi=110)


if __name__ == "__main__":
    main()
