"""Why PPO's KL to the reference ran away on some machines, and what keeps it bounded.

The setting of ``tests/objectives/test_ppo.py`` as it was: LoRA r=8 on q, k, v, o of the pretrained
tiny-llama, reward 1 when the response holds a digit (``ftlab.rewards.has_char``), 32 rollouts of
16 tokens per iteration from 512 synthetic prompts, 4 PPO epochs x 2 mini-batches, AdamW at 3e-3,
adaptive KL controller (β 0.2, target 4, horizon 64), 14 iterations. Each variant runs seeds 0-15,
one run at a time; a line of JSON per run is appended to ``results.jsonl``: the KL to the reference
per iteration (``kl``, nats per response), ½ mean (log π − log π_old)² per iteration (``akl``),
optimizer steps per iteration (``upd``), reward over the first and last 4 iterations, final β.

    OMP_NUM_THREADS=1 nice -n 10 python experiments/ppo_stability/run.py             # every variant
    python experiments/ppo_stability/run.py --variants base tkl10 --seeds 0 1 2
    python experiments/ppo_stability/run.py --report-only                            # results.md
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent

#: name -> PPO arguments (``lr``: AdamW's; ``threads``: torch's intra-op threads, other float rounding)
VARIANTS = {
    "base": {"target_kl": None},
    "nowhiten": {"target_kl": None, "whiten_advantages": False},
    "tkl10": {"target_kl": 0.1},
    "lr1e3": {"target_kl": None, "lr": 0.001},
    "tkl03": {"target_kl": 0.03},
    "lr1e3tkl10": {"target_kl": 0.1, "lr": 0.001},
    "tkl10_2thr": {"target_kl": 0.1, "threads": 2},
}


def run(name: str, seed: int, iterations: int = 14) -> dict:
    import lightning as L
    import torch

    from ftlab.data import PromptData
    from ftlab.models.backbone import Backbone
    from ftlab.objectives import PPO
    from ftlab.peft import LoRA

    kw = dict(VARIANTS[name])
    lr, threads = kw.pop("lr", 3e-3), kw.pop("threads", 1)
    torch.set_num_threads(threads)
    args = {
        "reward_fn": "ftlab.rewards.has_char",
        "num_rollouts": 32,
        "chunk_size": 32,
        "mini_batch_size": 16,
        "ppo_epochs": 4,
        "max_new_tokens": 16,
        "init_kl_coef": 0.2,
        "target": 4.0,
        "horizon": 64,
    }
    L.seed_everything(seed, verbose=False)
    model = PPO(
        Backbone(),
        LoRA(rank=8, alpha=16, targets=["q_proj", "k_proj", "v_proj", "o_proj"]),
        optimizer=lambda p: torch.optim.AdamW(p, lr=lr),
        **args,
        **kw,
    )
    dm = PromptData(batch_size=32, synthetic_size=512, max_length=48)
    start = time.time()
    L.Trainer(
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        max_epochs=1,
        limit_train_batches=iterations,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        default_root_dir="/tmp/ftlab_ppo_stability",
    ).fit(model, dm)
    h = model.history
    r, k = [x["reward"] for x in h], [x["kl"] for x in h]
    return {
        "v": name,
        "seed": seed,
        "s": round(time.time() - start, 1),
        "maxkl": round(max(k), 1),
        "first4": round(sum(r[:4]) / 4, 2),
        "last4": round(sum(r[-4:]) / 4, 2),
        "kl": [round(x, 1) for x in k],
        "akl": [round(x["approx_kl"], 3) for x in h],
        "upd": [int(x["updates"]) for x in h],
        "coef": round(h[-1]["kl_coef"], 3),
    }


def report(rows: list[dict]) -> str:
    head = (
        "| variant | runs | max KL of a run: median | worst | runs over 15 nats | reward, first 4 iterations "
        "| last 4 | gain: median | worst | max ½(Δ log π)² of a run: median | optimizer steps per iteration |"
    )
    lines = [head, "|---|---|---|---|---|---|---|---|---|---|---|"]
    for name in VARIANTS:
        runs = [r for r in rows if r["v"] == name]
        if not runs:
            continue
        mk, gain = [r["maxkl"] for r in runs], [r["last4"] - r["first4"] for r in runs]
        lines.append(
            f"| {name} | {len(runs)} | {statistics.median(mk):.1f} | {max(mk):.1f} | "
            f"{sum(m > 15 for m in mk)} | {statistics.median(r['first4'] for r in runs):.2f} | "
            f"{statistics.median(r['last4'] for r in runs):.2f} | {statistics.median(gain):.2f} | "
            f"{min(gain):.2f} | "
            f"{statistics.median(max(r['akl']) for r in runs):.2f} | "
            f"{statistics.mean(statistics.mean(r['upd']) for r in runs):.1f} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", nargs="*", default=list(VARIANTS))
    parser.add_argument("--seeds", type=int, nargs="*", default=list(range(16)))
    parser.add_argument("--report-only", action="store_true")
    args = parser.parse_args()
    out = HERE / "results.jsonl"
    rows = [json.loads(line) for line in out.read_text().splitlines() if line.strip()] if out.exists() else []
    if not args.report_only:
        done = {(r["v"], r["seed"]) for r in rows}
        for name in args.variants:
            for seed in args.seeds:
                if (name, seed) not in done:
                    rows.append(run(name, seed))
                    with out.open("a") as f:
                        f.write(json.dumps(rows[-1]) + "\n")
    table = report(rows)
    (HERE / "results.md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()
