"""Where the RL and preference tests' bounds come from: their settings on many seeds.

The statistical tests (``tests/objectives/test_ppo.py``, ``test_grpo_rloo.py``,
``test_kto_orpo_simpo.py``) run 3 seeds (on-policy) or one (offline) of the settings below. Here
each setting runs on seeds 0-15 (on-policy) or 0-7 (offline: the data's seed and the
initialisation change together), one run at a time, and the report gives the distribution the
tests' assertions are checked against, including over every triple of seeds (a stand-in for the
trajectories another CPU's rounding would give, since a different seed perturbs a run far more).

    OMP_NUM_THREADS=1 nice -n 10 python experiments/rl_test_calibration/run.py     # runs missing rows
    python experiments/rl_test_calibration/run.py --report-only
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
LORA = {"rank": 8, "alpha": 16, "targets": ["q_proj", "k_proj", "v_proj", "o_proj"]}
#: The tests' on-policy settings: (objective arguments, data arguments, iterations).
ONPOLICY = {
    "ppo": (
        {
            "num_rollouts": 32,
            "chunk_size": 32,
            "mini_batch_size": 16,
            "ppo_epochs": 4,
            "max_new_tokens": 16,
            "init_kl_coef": 0.2,
            "target": 4.0,
            "horizon": 64,
        },
        {"batch_size": 32, "synthetic_size": 512},
        8,
    ),
    "grpo": (
        {"num_generations": 4, "mini_batch_size": 16, "epochs": 2, "max_new_tokens": 12, "target_kl": 0.1},
        {"batch_size": 8, "synthetic_size": 8},
        8,
    ),
    "rloo": (
        {"num_generations": 4, "mini_batch_size": 16, "epochs": 2, "max_new_tokens": 12, "target_kl": 0.1},
        {"batch_size": 8, "synthetic_size": 8},
        8,
    ),
}


def onpolicy(algo: str, seed: int) -> dict:
    """One run of a test's on-policy setting (reward: the response holds a digit): reward and KL per
    iteration."""
    import lightning as L
    import torch

    from ftlab.data import PromptData
    from ftlab.models.backbone import Backbone
    from ftlab.objectives import GRPO, PPO, RLOO
    from ftlab.peft import LoRA

    args, data, iterations = ONPOLICY[algo]
    L.seed_everything(seed, verbose=False)
    cls = {"ppo": PPO, "grpo": GRPO, "rloo": RLOO}[algo]
    model = cls(
        Backbone(),
        LoRA(**LORA),
        reward_fn="ftlab.rewards.has_char",
        optimizer=lambda p: torch.optim.AdamW(p, lr=3e-3),
        **args,
    )
    # PPO: 512 prompts, seed 0 (experiments/ppo_stability's); GRPO/RLOO: the same 8 prompts every iteration
    dm = PromptData(max_length=48, seed=0 if algo == "ppo" else seed, **data)
    per_epoch = max(1, min(iterations, data["synthetic_size"] // data["batch_size"]))
    start = time.time()
    L.Trainer(
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        max_epochs=iterations // per_epoch,
        limit_train_batches=per_epoch,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        default_root_dir=tempfile.mkdtemp(),
    ).fit(model, dm)
    h = model.history
    return {
        "algorithm": algo,
        "seed": seed,
        "iterations": iterations,
        "reward": [round(s["reward"], 2) for s in h],
        "kl": [round(s["kl"], 1) for s in h],
        "updates_mean": round(statistics.mean(s["updates"] for s in h), 1),
        "wall_s": round(time.time() - start, 1),
    }


def offline(objective: str, seed: int, steps: int = 12) -> dict:
    """One run of the offline test's setting: the rise of log π(chosen) − log π(rejected) (per token) on
    held-out pairs."""
    import lightning as L
    import torch

    from ftlab.data import PreferenceData, UnpairedPreferenceData
    from ftlab.models.backbone import Backbone
    from ftlab.objectives import KTO, ORPO, SimPO
    from ftlab.peft import LoRA
    from ftlab.preference_logps import response_labels, sequence_logps

    def gap(model, batch):
        model.eval()
        with torch.no_grad():
            chosen, rejected = sequence_logps(
                model.model, batch["input_ids"], batch["attention_mask"], response_labels(batch), average=True
            ).chunk(2)
        return chosen - rejected

    L.seed_everything(seed, verbose=False)
    pairs = PreferenceData(synthetic_size=256, batch_size=16, max_length=64, seed=seed)
    pairs.setup()
    held = next(iter(pairs.val_dataloader()))
    cls = {"kto": KTO, "orpo": ORPO, "simpo": SimPO}[objective]
    dm = (
        UnpairedPreferenceData(synthetic_size=256, batch_size=16, max_length=64, seed=seed)
        if cls is KTO
        else pairs
    )
    model = cls(Backbone(), LoRA(**LORA), optimizer=lambda p: torch.optim.AdamW(p, lr=3e-3))
    model.configure_model()
    before = gap(model, held)
    start = time.time()
    L.Trainer(
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        max_steps=steps,
        default_root_dir=tempfile.mkdtemp(),
    ).fit(model, dm)
    gain = gap(model, held) - before
    return {
        "objective": objective,
        "steps": steps,
        "seed": seed,
        "gap_before_median": round(before.median().item(), 3),
        "gain_median": round(gain.median().item(), 3),
        "gain_mean": round(gain.mean().item(), 3),
        "wall_s": round(time.time() - start, 1),
    }


def report(on: list[dict], off: list[dict]) -> str:
    lines = [
        "| test setting | seeds | reward gain (later - earlier iterations): median | worst | "
        "triples with mean gain <= 0 | max KL of a run: median | worst | "
        "pooled median KL of a triple: worst |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for algo in ONPOLICY:
        runs = [r for r in on if r["algorithm"] == algo]
        if not runs:
            continue
        w = 4 if algo == "ppo" else 3  # the tests' windows: 4 vs 4 iterations (PPO), 3 vs 3 (GRPO, RLOO)
        gains = [statistics.mean(r["reward"][-w:]) - statistics.mean(r["reward"][:w]) for r in runs]
        triples = list(itertools.combinations(range(len(runs)), 3))
        bad = sum(statistics.mean(gains[i] for i in t) <= 0 for t in triples)
        pooled = max(statistics.median([k for i in t for k in runs[i]["kl"]]) for t in triples)
        maxkl = [max(r["kl"]) for r in runs]
        lines.append(
            f"| {algo}, {runs[0]['iterations']} iterations | {len(runs)} | {statistics.median(gains):.3f} | "
            f"{min(gains):.3f} | {bad} of {len(triples)} | {statistics.median(maxkl):.1f} | "
            f"{max(maxkl):.1f} | "
            f"{pooled:.2f} |"
        )
    lines += [
        "",
        "| test setting | seeds | held-out gap rise, mean over pairs: median | worst "
        "| median over pairs: worst |",
        "|---|---|---|---|---|",
    ]
    for obj in ("kto", "orpo", "simpo"):
        runs = [r for r in off if r["objective"] == obj]
        if runs:
            lines.append(
                f"| {obj}, {runs[0]['steps']} steps | {len(runs)} | "
                f"{statistics.median(r['gain_mean'] for r in runs):.3f} | "
                f"{min(r['gain_mean'] for r in runs):.3f} | "
                f"{min(r['gain_median'] for r in runs):.3f} |"
            )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--report-only", action="store_true")
    args = parser.parse_args()
    files = {"on": HERE / "onpolicy.jsonl", "off": HERE / "offline.jsonl"}
    rows = {
        k: [json.loads(x) for x in f.read_text().splitlines() if x.strip()] if f.exists() else []
        for k, f in files.items()
    }
    if not args.report_only:
        jobs = [("on", a, s) for a in ONPOLICY for s in range(16)] + [
            ("off", o, s) for o in ("kto", "orpo", "simpo") for s in range(8)
        ]
        for kind, name, seed in jobs:
            key = "algorithm" if kind == "on" else "objective"
            if any(r[key] == name and r["seed"] == seed for r in rows[kind]):
                continue
            rows[kind].append(onpolicy(name, seed) if kind == "on" else offline(name, seed))
            with files[kind].open("a") as f:
                f.write(json.dumps(rows[kind][-1]) + "\n")
    table = report(rows["on"], rows["off"])
    (HERE / "results.md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()
