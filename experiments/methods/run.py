"""SST-2 on MiniLM: every method at one budget (same steps, batch, length, schedule, pooling).

    python experiments/methods/run.py                       # the full table (hours on CPU)
    python experiments/methods/run.py --steps 5 --max-samples 64 --out /tmp/sst2_smoke

Writes ``results.csv`` and ``results.md`` to ``--out`` (default: beside this file), one row per
method and seed (accuracy, trainable share, median s/step and tokens/s, peak memory), rewritten
after every run so an interrupted grid keeps what finished. Each method runs in a fresh process
(so peak memory is its own) through ftlab's Python API: ``SequenceClassifier`` on the ``minilm`` backbone with mean pooling,
``ClassificationData`` on the GLUE files, AdamW with 6% warmup then linear decay; only the method
and its learning rate change from row to row.
"""

from __future__ import annotations

import argparse
import csv
import multiprocessing
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from functools import partial
from pathlib import Path

HERE = Path(__file__).resolve().parent
DEFAULT_DATA = HERE.parents[1].parent / "shared" / "data" / "sst2_glue"
PROMPT_TEXT = "Classify the sentiment of this movie review as positive or negative:"

#: name -> (method class path, init args, learning rate). The learning rates are each method's
#: usual range (soft prompts and prefixes need far larger steps than weights do); override with --lr.
METHODS: dict[str, tuple[str, dict, float]] = {
    "full": ("ftlab.peft.Full", {}, 3e-5),
    "lora": ("ftlab.peft.LoRA",
             {"rank": 8, "alpha": 16, "dropout": 0.1, "targets": ["query", "value"]}, 5e-4),
    "prompt": ("ftlab.peft.PromptTuning",
               {"num_virtual_tokens": 20, "init_text": PROMPT_TEXT, "tokenizer": "minilm"}, 3e-2),
    "prefix": ("ftlab.peft.PrefixTuning", {"num_virtual_tokens": 20}, 1e-2),
    "houlsby": ("ftlab.peft.Adapter", {"placement": "houlsby", "reduction_factor": 16}, 1e-3),
    "pfeiffer": ("ftlab.peft.Adapter", {"placement": "pfeiffer", "reduction_factor": 16}, 1e-3),
}
FIELDS = ["method", "seed", "accuracy", "f1", "val_loss", "trainable", "total", "trainable_pct", "lr",
          "steps", "batch", "max_length", "step_s", "tokens_per_s", "peak_mem_gib", "minutes", "device", "error"]


def build_method(name: str):
    import importlib

    path, kwargs, _ = METHODS[name]
    module, _, cls = path.rpartition(".")
    return getattr(importlib.import_module(module), cls)(**kwargs)


def run_one(name: str, lr: float, seed: int, args: argparse.Namespace) -> dict:
    import lightning as L
    import torch

    from statistics import median

    from ftlab.callbacks import ParameterTable, Throughput, peak_memory_gib
    from ftlab.data import ClassificationData
    from ftlab.models.backbone import Backbone
    from ftlab.objectives import SequenceClassifier
    from ftlab.optim import WarmupLinear

    L.seed_everything(seed, verbose=False)
    model = SequenceClassifier(
        Backbone("minilm"), build_method(name), pooling="mean",
        optimizer=partial(torch.optim.AdamW, lr=lr, weight_decay=0.01),
        scheduler=partial(WarmupLinear, warmup=0.06),
    )
    # Files, not the folder: the GLUE folder's test.tsv has no labels, and a folder source reads it too.
    data = ClassificationData(
        source=str(args.data / "train.tsv"), val_source=str(args.data / "dev.tsv"), tokenizer="minilm",
        text_field="sentence", label_field="label", max_length=args.max_length, batch_size=args.batch,
        max_samples=args.max_samples, seed=seed,
    )
    speed = Throughput(log_every_n_steps=10**9)
    common = dict(accelerator=args.accelerator, devices=1, precision=args.precision, logger=False,
                  enable_checkpointing=False, enable_model_summary=False, enable_progress_bar=args.progress,
                  default_root_dir=args.out / "lightning")
    trainer = L.Trainer(max_steps=args.steps, limit_val_batches=0, num_sanity_val_steps=0,
                        callbacks=[ParameterTable(), speed], **common)
    start = time.perf_counter()
    trainer.fit(model, data)
    metrics = L.Trainer(**common).validate(model, data, verbose=False)[0]
    params = trainer.ftlab_params
    return {
        "method": name, "seed": seed, "accuracy": round(metrics["val/accuracy"], 4),
        "f1": round(metrics["val/f1"], 4), "val_loss": round(metrics["val/loss"], 4),
        "trainable": int(params["params/trainable"]),
        "total": int(params["params/total"]), "trainable_pct": round(params["params/trainable_pct"], 4),
        "lr": lr, "steps": args.steps, "batch": args.batch, "max_length": args.max_length,
        "step_s": round(median(speed.step_times), 4) if speed.step_times else "",
        "tokens_per_s": round(median(speed.tokens_per_s)) if speed.tokens_per_s else "",
        "peak_mem_gib": round(peak_memory_gib(model.device), 3),
        "minutes": round((time.perf_counter() - start) / 60, 2), "device": str(model.device), "error": "",
    }


def write(rows: list[dict], out: Path, args: argparse.Namespace) -> None:
    with open(out / "results.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=FIELDS)
        writer.writeheader()
        writer.writerows(rows)
    dev = f"first {args.max_samples} rows" if args.max_samples else "872 rows"
    lines = [
        f"SST-2 dev ({dev}), MiniLM-L6 (all-MiniLM-L6-v2), mean pooling, max length {args.max_length}, "
        f"batch {args.batch}, {args.steps} steps, AdamW (weight decay 0.01), 6% warmup then linear decay.",
        "",
        "| method | accuracy | macro F1 | trainable params | trainable % | lr | s/step | tokens/s | peak GiB | seed |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if r["error"]:
            lines.append(f"| {r['method']} | failed: {r['error']} | | | | {r['lr']} | | | | {r['seed']} |")
            continue
        lines.append(f"| {r['method']} | {100 * r['accuracy']:.1f}% | {100 * r['f1']:.1f}% | "
                     f"{r['trainable']:,} | {r['trainable_pct']:.3f}% | {r['lr']:g} | {r['step_s']} | "
                     f"{r['tokens_per_s']} | {r['peak_mem_gib']} | {r['seed']} |")
    (out / "results.md").write_text("\n".join(lines) + "\n")


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", type=Path, default=DEFAULT_DATA, help="folder with SST-2 train.tsv, dev.tsv")
    p.add_argument("--steps", type=int, default=1500, help="optimizer steps per method")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--max-length", type=int, default=64)
    p.add_argument("--max-samples", type=int, default=None, help="cap on rows per split (smoke tests)")
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    p.add_argument("--seeds", nargs="+", type=int, default=[0])
    p.add_argument("--lr", nargs="*", default=[], metavar="METHOD=LR",
                   help="learning-rate overrides, e.g. prefix=3e-2")
    p.add_argument("--accelerator", default="auto")
    p.add_argument("--precision", default="32-true", help="Lightning precision, e.g. bf16-mixed on a GPU")
    p.add_argument("--out", type=Path, default=HERE, help="where results.csv and results.md go")
    p.add_argument("--progress", action="store_true", help="show progress bars")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    if not (args.data / "train.tsv").exists() or not (args.data / "dev.tsv").exists():
        print(f"SST-2 not found: {args.data} needs train.tsv and dev.tsv (GLUE format); pass --data",
              file=sys.stderr)
        return 2
    lrs = {name: lr for name, (_, _, lr) in METHODS.items()}
    for item in args.lr:
        name, _, value = item.partition("=")
        if name not in lrs or not value:
            print(f"--lr {item!r}: expected METHOD=LR with METHOD in {list(METHODS)}", file=sys.stderr)
            return 2
        lrs[name] = float(value)
    os.environ.setdefault("WANDB_MODE", "disabled")
    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    for seed in args.seeds:
        for name in args.methods:
            print(f"== {name} (seed {seed}, lr {lrs[name]:g})", flush=True)
            try:
                # A fresh process per method: its peak memory (max RSS on CPU) is that method's alone.
                with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
                    rows.append(pool.submit(run_one, name, lrs[name], seed, args).result())
            except Exception as err:  # one failed method must not lose the others' rows
                rows.append({**dict.fromkeys(FIELDS, ""), "method": name, "seed": seed, "lr": lrs[name],
                             "error": f"{type(err).__name__}: {err}"[:200]})
                print(f"   failed: {rows[-1]['error']}", file=sys.stderr, flush=True)
            write(rows, args.out, args)
    print((args.out / "results.md").read_text())
    return 1 if any(r["error"] for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
