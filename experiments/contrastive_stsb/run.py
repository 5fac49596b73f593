"""STS-B test Spearman of MiniLM before and after contrastive fine-tuning on STS-B train.

Builds the run from ``experiments/contrastive/base.yaml`` (``configs/contrastive.yaml`` as it was
then: CoSENT on STS-B train) through ftlab's CLI (the same objects ``ftlab fit`` makes), then:
``trainer.test`` on the base model, ``trainer.fit`` on STS-B train, ``trainer.test`` again. Same
evaluation code both times (``Contrastive.test_step``: cosine of mean-pooled, L2-normalised
embeddings against the gold scores, torchmetrics' Spearman). Also times the ROUGE-L filter on the
Alpaca subset. Writes ``results.json`` beside this file.

    python experiments/contrastive_stsb/run.py                       # base + fine-tuning + filter
    python experiments/contrastive_stsb/run.py --base-only           # evaluation only (~1-2 min)
    python experiments/contrastive_stsb/run.py --data /path/to/stsbenchmark --epochs 1 --batch 16
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
CONFIG = "experiments/contrastive/base.yaml"  # the recipe of this run; configs/contrastive.yaml moved on


def rouge_numbers(alpaca: Path) -> dict:
    from ftlab.data.curation import rouge_filter

    rows = json.loads(alpaca.read_text(encoding="utf-8"))
    _, stats = rouge_filter([r["instruction"] for r in rows], 0.7)
    return {"file": str(alpaca), "threshold": 0.7, **stats}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--data", default="../shared/data/stsbenchmark", help="folder with sts-{train,dev,test}.csv"
    )
    parser.add_argument("--alpaca", default="../shared/data/alpaca_5000_subset/alpaca_5000.json")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--lr", type=float, default=2e-5)
    parser.add_argument("--base-only", action="store_true", help="evaluate the base model only")
    parser.add_argument("--out", default=str(HERE / "results.json"))
    args = parser.parse_args()

    os.chdir(ROOT)  # the config's relative paths (../shared/data) are from the project root
    if not Path(args.data).is_dir():
        raise SystemExit(
            f"STS-B folder {args.data} not found: the shared data is expected beside the "
            "repository (../shared/data/stsbenchmark); pass --data"
        )
    import torch

    from ftlab.cli import FtlabCLI
    from ftlab.objectives._base import Objective

    cli = FtlabCLI(
        Objective,
        subclass_mode_model=True,
        subclass_mode_data=True,
        run=False,
        save_config_kwargs={"overwrite": True},
        args=[
            "--config",
            CONFIG,
            "--data.init_args.source",
            args.data,
            "--data.init_args.batch_size",
            str(args.batch),
            "--data.init_args.max_length",
            str(args.max_length),
            "--model.init_args.optimizer.init_args.lr",
            str(args.lr),
            "--trainer.max_epochs",
            str(args.epochs),
            "--trainer.logger=false",
            "--trainer.enable_checkpointing=false",
            "--trainer.limit_val_batches=0",
            "--trainer.default_root_dir=runs/contrastive_stsb",
            "--trainer.enable_progress_bar=false",
        ],
    )
    model, dm, trainer = cli.model, cli.datamodule, cli.trainer
    results: dict = {
        "config": CONFIG,
        "data": args.data,
        "epochs": args.epochs,
        "batch_size": args.batch,
        "max_length": args.max_length,
        "lr": args.lr,
        "loss": model.loss_name,
        "pooling": model.pooling,
        "torch_threads": torch.get_num_threads(),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
    }
    t = time.perf_counter()
    base = trainer.test(model, dm, verbose=False)[0]
    results["base"] = {
        "test_spearman": base["test/spearman"],
        "test_loss": base["test/loss"],
        "eval_s": round(time.perf_counter() - t, 1),
    }
    print("base:", results["base"], flush=True)
    if not args.base_only:
        t = time.perf_counter()
        trainer.fit(model, dm)
        fit_s = time.perf_counter() - t
        t = time.perf_counter()
        tuned = trainer.test(model, dm, verbose=False)[0]
        results["fine_tuned"] = {
            "test_spearman": tuned["test/spearman"],
            "test_loss": tuned["test/loss"],
            "steps": int(trainer.global_step),
            "fit_s": round(fit_s, 1),
            "s_per_step": round(fit_s / max(1, trainer.global_step), 3),
            "eval_s": round(time.perf_counter() - t, 1),
        }
        print("fine-tuned:", results["fine_tuned"], flush=True)
    if Path(args.alpaca).exists():
        results["rouge_filter"] = rouge_numbers(Path(args.alpaca))
        print("rouge-filter:", results["rouge_filter"], flush=True)
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
