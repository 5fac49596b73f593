"""``ftlab sweep`` end to end on a tiny grid with seeds (runs, results, skip-if-done), resuming that
runs unfinished runs only, paired comparisons (and refusing unpaired runs), the table's verdicts against
the best point, bad input before any training, W&B run naming, and the comparison notebook executed on
a results file with several seeds."""

from __future__ import annotations

import csv
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from ftlab.cli import main

ROOT = Path(__file__).parents[1]
RANK = "model.init_args.method.init_args.rank"
#: The embedded default cut to nothing: 2 steps of batch 4, no validation, no checkpoint.
TINY = {
    "trainer.max_steps": 2,
    "trainer.limit_val_batches": 0,
    "trainer.enable_checkpointing": False,
    "trainer.enable_progress_bar": False,
    "data.init_args.synthetic_train_size": 16,
    "data.init_args.synthetic_val_size": 4,
    "data.init_args.batch_size": 4,
}


def _sweep_file(tmp_path: Path, **spec) -> Path:
    spec = {
        "base": str(ROOT / "configs" / "lora.yaml"),
        "grid": {RANK: [1, 2]},
        "fixed": TINY,
        "metric": "train/loss",
        "out": str(tmp_path / "out"),
        **spec,
    }
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def _error(capsys, *argv) -> str:
    with pytest.raises(SystemExit) as exit_:
        main(["sweep", *map(str, argv)])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("ftlab: error:") and "Traceback" not in err
    return err


def _csv(path: Path) -> list[dict[str, str]]:
    with open(path) as fh:
        return list(csv.DictReader(fh))


@pytest.mark.slow
def test_tiny_sweep_with_seeds_runs_tabulates_and_resumes(tmp_path, capsys):
    path = _sweep_file(tmp_path, grid={RANK: [2]}, seeds=[0, 1], budget={"tokens": 300})
    main(["sweep", str(path), "--parallel", "2"])
    out = tmp_path / "out"
    rows = _csv(out / "results.csv")
    assert [(r["run"], r["point"], r["seed"], r["rank"], r["status"]) for r in rows] == [
        ("rank=2 seed=0", "rank=2", "0", "2", "done"),
        ("rank=2 seed=1", "rank=2", "1", "2", "done"),
    ]
    assert all(float(r["value"]) > 0 for r in rows) and rows[0]["value"] != rows[1]["value"]
    for r in rows:
        run_dir, seed = Path(r["run_dir"]), int(r["seed"])
        assert run_dir == out / "runs" / "rank=2" / f"seed={seed}"
        # The seed reached both the initialisation and the data order, and the config every logger got.
        hparams = yaml.safe_load(next(run_dir.rglob("hparams.yaml")).read_text())
        assert (hparams["seed_everything"], hparams["data"]["init_args"]["seed"]) == (seed, seed)
        # A budget of 300 tokens, resolved to steps from the data: what the run trained on is recorded.
        budget = json.loads(next(run_dir.rglob("budget.json")).read_text())
        assert budget["tokens"] >= 300 and budget["steps"] == budget["max_steps"] == int(r["steps"])
        assert budget["samples"] == 4 * budget["steps"] == int(r["samples"])
    md = (out / "results.md").read_text()
    assert "| rank | n | train/loss mean |" in md and "seeds [0, 1]" in md
    mean = np.mean([float(r["value"]) for r in rows])
    assert f"| 2 | 2 | {mean:.4g} |" in md
    assert (out / "plot.png").read_bytes()[:4] == b"\x89PNG"
    stamps = {p: p.stat().st_mtime for p in out.rglob("summary.json")}
    capsys.readouterr()

    main(["sweep", str(path)])  # everything is done: nothing runs again
    printed = capsys.readouterr().out
    assert printed.count("done, skipped") == 2 and "running" not in printed
    assert {p: p.stat().st_mtime for p in out.rglob("summary.json")} == stamps

    main(["sweep", str(path), "--dry-run", "--seeds", "3"])
    printed = capsys.readouterr().out
    assert (
        printed.count("(done)") == 2 and printed.count("(to run)") == 1 and "--seed_everything 2" in printed
    )


def _finish(run, value: float, scores=None, digest: str = "d0", code: int = 0) -> None:
    """What a finished run leaves in its folder (or a failed one, with ``code``)."""
    (run.run_dir / "version_0").mkdir(parents=True, exist_ok=True)
    (run.run_dir / "sweep_point.json").write_text(
        json.dumps({"returncode": code, "config_sha": run.config_sha})
    )
    if code:
        return
    (run.run_dir / "version_0" / "summary.json").write_text(
        json.dumps({"metrics": {"val/accuracy": value}, "steps": 2, "params/trainable_pct": 1.0})
    )
    (run.run_dir / "version_0" / "budget.json").write_text(
        json.dumps({"steps": 2, "samples": 8, "tokens": 99})
    )
    if scores is not None:
        np.savez(
            run.run_dir / "version_0" / "val_examples.npz",
            accuracy=np.asarray(scores, dtype=float),
            digest=np.array(digest),
            step=np.array(2),
        )


def test_resumed_sweep_with_seeds_runs_unfinished_runs_only(tmp_path, monkeypatch):
    from ftlab.sweep import execute, load, plan

    started = []

    def fake_fit(command, stdout, stderr, env):  # instead of an ftlab fit subprocess
        run_dir = Path(command[command.index("--trainer.default_root_dir") + 1])
        started.append(env["WANDB_NAME"])
        (run_dir / "version_0").mkdir(parents=True, exist_ok=True)
        (run_dir / "version_0" / "summary.json").write_text(json.dumps({"metrics": {"val/accuracy": 0.5}}))
        return 0

    monkeypatch.setattr(execute.subprocess, "call", fake_fit)
    path = _sweep_file(tmp_path, seeds=[0, 1], metric="val/accuracy")
    sweep = plan(load(path))
    runs = {r.label: r for r in sweep.runs}
    _finish(runs["rank=1 seed=0"], 0.6)
    _finish(runs["rank=2 seed=1"], 0.7)
    _finish(runs["rank=1 seed=1"], 0.0, code=1)  # failed: runs again
    execute.run(sweep)
    assert sorted(started) == ["rank=1 seed=1", "rank=2 seed=0"]
    assert [r["status"] for r in _csv(tmp_path / "out" / "results.csv")] == ["done"] * 4

    started.clear()
    execute.run(plan(load(path, seeds="3")))  # a third seed, then a new point: only they run
    assert started == ["rank=1 seed=2", "rank=2 seed=2"]
    started.clear()
    execute.run(
        plan(load(_sweep_file(tmp_path, seeds=[0, 1, 2], grid={RANK: [1, 2, 4]}, metric="val/accuracy")))
    )
    assert started == ["rank=4 seed=0", "rank=4 seed=1", "rank=4 seed=2"]

    # Without the run folders (a fresh checkout of committed results), results.csv says what finished.
    shutil.rmtree(tmp_path / "out" / "runs")
    started.clear()
    sweep = plan(load(path, seeds="3"))
    execute.run(sweep)
    assert started == [] and all(sweep.finished(r) for r in sweep.runs)
    assert [float(r["value"]) for r in _csv(tmp_path / "out" / "results.csv")][:2] == [0.6, 0.5]
    # Changed settings are not the same runs: they run again.
    execute.run(plan(load(path, seeds="1", sets=["trainer.max_steps=3"])))
    assert started == ["rank=1 seed=0", "rank=2 seed=0", "rank=4 seed=0"]


def test_paired_comparison_and_verdicts_against_the_best(tmp_path, capsys):
    from ftlab.sweep import load, plan
    from ftlab.sweep.report import report

    path = _sweep_file(tmp_path, seeds=[0, 1], metric="val/accuracy", grid={RANK: [1, 2, 4, 8]})
    sweep = plan(load(path))
    rng = np.random.default_rng(0)
    best = [(rng.random(300) < 0.9).astype(float) for _ in range(2)]
    close = []
    for b in best:  # two answers flipped each way: the same accuracy
        c = b.copy()
        right, wrong = np.flatnonzero(b == 1)[:2], np.flatnonzero(b == 0)[:2]
        c[right], c[wrong] = 0, 1
        close.append(c)
    poor = [b * (rng.random(300) < 0.7) for b in best]
    runs = {r.label: r for r in sweep.runs}
    for seed in (0, 1):
        _finish(runs[f"rank=1 seed={seed}"], best[seed].mean(), best[seed])
        _finish(runs[f"rank=2 seed={seed}"], close[seed].mean() - 1e-9, close[seed])
        _finish(runs[f"rank=4 seed={seed}"], poor[seed].mean(), poor[seed])
    _finish(runs["rank=8 seed=0"], 0.5, best[0], digest="other examples")
    _finish(runs["rank=8 seed=1"], 0.5, best[1], digest="other examples")
    report(sweep)
    md = {
        line.split(" | ")[0].strip("| "): line
        for line in (tmp_path / "out" / "results.md").read_text().splitlines()
    }
    assert "**best**" in md["1"] and "≈ best" in md["2"] and "worse" in md["4"]
    assert "not paired" in md["8"] and "validated on different examples" in md["8"]
    assert (tmp_path / "out" / "examples.npz").exists()

    main(["sweep", str(path), "--compare", "rank=4", "rank=1"])
    printed = capsys.readouterr().out
    assert "paired over 2 seed(s) [0, 1] x 300 examples" in printed and "McNemar exact p" in printed
    assert "verdict: rank=4 < rank=1" in printed
    # Unpaired runs are refused: no shared seed, or different validation examples.
    shutil.rmtree(runs["rank=2 seed=0"].run_dir)
    shutil.rmtree(runs["rank=1 seed=1"].run_dir)
    (tmp_path / "out" / "examples.npz").unlink()
    (tmp_path / "out" / "results.csv").unlink()
    assert "share no seed" in _error(capsys, path, "--compare", "rank=2", "rank=1")
    assert "validated on different examples" in _error(capsys, path, "--compare", "rank=8", "rank=4")
    assert "no grid point 'rank=3'" in _error(capsys, path, "--compare", "rank=3", "rank=1")


def test_pairing_uses_shared_seeds_and_names_the_rest():
    from ftlab.sweep.compare import Examples, pair

    ex = {s: Examples(np.array([1.0, 0.0, float(s)]), "d") for s in (0, 1, 2)}
    seeds, a, b, left_out = pair({0: ex[0], 1: ex[1]}, {1: ex[1], 2: ex[2]})
    assert seeds == [1] and a.shape == b.shape == (1, 3) and left_out == [0, 2]
    with pytest.raises(ValueError, match="share no seed"):
        pair({0: ex[0]}, {2: ex[2]})
    with pytest.raises(ValueError, match="different examples"):
        pair({0: ex[0]}, {0: Examples(np.array([1.0, 0.0]), "d")})


@pytest.mark.parametrize(
    "spec, message",
    [
        ({"base": "configs/nowhere.yaml"}, "base config configs/nowhere.yaml does not exist"),
        ({"grid": {}}, "the grid is empty"),
        ({"grid": {RANK: []}}, f"grid key '{RANK}' has an empty list of values"),
        (
            {"grid": {"model.init_args.method.init_args.rnak": [1, 2]}},
            (
                "key 'model.init_args.method.init_args.rnak' is not in the config (configs/lora.yaml) "
                f"(did you mean '{RANK}'?)"
            ),
        ),
        ({"fixed": {**TINY, "trainer.max_step": 3}}, "did you mean 'trainer.max_steps'?"),
        ({"grid": {RANK: [2, "two"]}}, "point 'rank=two' does not parse"),
        (
            {"fixed": {**TINY, "trainer.strategy": "fsdp", "trainer.accelerator": "cpu"}},
            "strategy fsdp cannot run on CPU",
        ),
        ({"fixed": {**TINY, "trainer.accelerator": "gpu"}}, "no CUDA GPU is visible"),
        ({"grdi": {RANK: [1]}}, "unknown key 'grdi' (did you mean 'grid'?)"),
        ({"fixed": [1, 2]}, "'fixed' maps dotted config keys to one value each"),
        ({"seeds": []}, "seeds must be a count (3) or a non-empty list"),
        ({"seeds": [0, 0]}, "seeds [0, 0] repeat a value"),
        ({"seeds": [0, 1], "fixed": {**TINY, "seed_everything": 3}}, "sets a seed key"),
        ({"seeds": [0], "seed_keys": ["data.init_args.sede"]}, "did you mean 'data.init_args.seed'?"),
        ({"budget": {"tokens": -5}}, "budget tokens must be a positive number"),
        ({"budget": {"minutes": 5}}, "'budget' is one of {steps: N}, {tokens: N}, {epochs: X}"),
        ({"grid": {"method": {"a": [1]}}}, "grid 'method', point 'a': a named point maps dotted config keys"),
        (
            {"grid": {"method": {"a": {"model.init_args.methd": None}}}},
            "key 'model.init_args.methd' is not in the config",
        ),
        ({"goal": "up"}, "'goal' is max or min"),
    ],
    ids=[
        "missing-base",
        "empty-grid",
        "empty-values",
        "unknown-key",
        "unknown-fixed-key",
        "bad-value",
        "fsdp-on-cpu",
        "gpu-without-gpu",
        "sweep-key-typo",
        "fixed-not-a-mapping",
        "no-seeds",
        "repeated-seed",
        "seed-in-fixed",
        "unknown-seed-key",
        "negative-budget",
        "unknown-budget",
        "named-point-not-a-mapping",
        "named-point-unknown-key",
        "bad-goal",
    ],
)
def test_bad_input_fails_before_training(spec, message, tmp_path, capsys, monkeypatch):
    if "gpu" in json.dumps(spec) and torch.cuda.is_available():
        pytest.skip("a GPU is visible")
    monkeypatch.chdir(ROOT)
    base = {"base": "configs/lora.yaml"}
    err = _error(capsys, _sweep_file(tmp_path, **{**base, **spec}))
    assert message in err
    assert not (tmp_path / "out").exists()  # nothing ran, nothing was written


def test_named_points_are_columns_and_labels(tmp_path):
    from ftlab.sweep import load, plan

    lr = "model.init_args.optimizer.init_args.lr"
    grid = {
        "method": {"small": {RANK: 2, lr: 0.01}, "base": None},
        "model.init_args.method.init_args.alpha": [8],
    }
    sweep = plan(load(_sweep_file(tmp_path, grid=grid, seeds=2)))
    assert [p.label for p in sweep.points] == ["method=small alpha=8", "method=base alpha=8"]
    assert sweep.points[0].columns == {"method": "small", "alpha": "8"}
    command = " ".join(sweep.points[0].runs[1].command)
    assert f"--{RANK} 2 --{lr} 0.01" in command and "--seed_everything 1 --data.init_args.seed 1" in command
    assert f"--{RANK}" not in " ".join(sweep.points[1].runs[0].command)


def test_wandb_run_named_from_method_and_seed(monkeypatch, tmp_path):
    from lightning.pytorch.loggers import WandbLogger

    from ftlab.cli import FtlabCLI
    from ftlab.objectives._base import Objective
    from ftlab.peft import LoRA
    from ftlab.runs import run_name
    from ftlab.sweep import load, plan
    from ftlab.sweep.execute import wandb_env

    assert run_name(LoRA(rank=16, alpha=32, targets=["q_proj", "v_proj"])) == "LoRA-r16-a32-q_proj,v_proj"
    monkeypatch.setenv("WANDB_MODE", "offline")  # ftlab's default loggers leave W&B out when it is disabled
    args = ["--config", str(ROOT / "configs" / "lora.yaml"), f"--{RANK}", "4", "--seed_everything", "3"]
    cli = FtlabCLI(Objective, subclass_mode_model=True, subclass_mode_data=True, run=False, args=args)
    (wandb,) = [lg for lg in cli.trainer.loggers if isinstance(lg, WandbLogger)]
    init = wandb._wandb_init  # wandb.init's arguments, before the run starts
    assert init["name"] == "LoRA-r4-a32-q_proj,k_proj,v_proj,o_proj-seed3"
    assert init["group"] == "CausalLM-tiny-llama-synthetic"
    assert init["tags"] == ["LoRA", "CausalLM", "tiny-llama", "seed=3"]
    # What the user (or ftlab sweep, through W&B's own variables) sets is left alone.
    monkeypatch.setenv("WANDB_RUN_GROUP", "my_sweep")
    monkeypatch.setenv("WANDB_TAGS", "sweep")
    mine = [{"class_path": "lightning.pytorch.loggers.WandbLogger", "init_args": {"name": "mine"}}]
    cli = FtlabCLI(
        Objective,
        subclass_mode_model=True,
        subclass_mode_data=True,
        run=False,
        args=[*args, "--trainer.logger", json.dumps(mine)],
    )
    init = cli.trainer.logger._wandb_init
    assert init["name"] == "mine" and init.get("group") is None
    assert init["tags"] == ["LoRA", "CausalLM", "tiny-llama", "seed=3", "sweep"]
    # A sweep: one group per grid point, the seed in the name and the tags.
    sweep = plan(load(_sweep_file(tmp_path, seeds=[0, 5], name="ranks")))
    env = wandb_env(sweep, sweep.points[1].runs[1], {"WANDB_TAGS": "mine"})
    assert (env["WANDB_NAME"], env["WANDB_RUN_GROUP"], env["WANDB_JOB_TYPE"]) == (
        "rank=2 seed=5",
        "ranks/rank=2",
        "ranks",
    )
    assert env["WANDB_TAGS"] == "mine,sweep,ranks,seed=5"


def test_compare_notebook_runs_on_results_with_seeds(tmp_path, monkeypatch):
    import nbclient
    import nbformat

    rng = np.random.default_rng(0)
    folder = tmp_path / "lora_rank"
    folder.mkdir()
    rows, arrays = [], {}
    best = [(rng.random(200) < 0.9).astype(np.float32) for _ in range(3)]
    for rank in (1, 8, 64):
        for seed in (0, 1, 2):
            run = f"rank={rank} seed={seed}"
            scores = best[seed].copy()
            if rank == 8:  # two more wrong answers per seed: a little below, indistinguishable
                scores[np.flatnonzero(scores == 1)[:2]] = 0
            if rank == 64:  # a third of the right answers lost
                scores *= rng.random(200) < 0.67
            status = "failed (exit 1)" if (rank, seed) == (64, 2) else "done"
            rows.append(
                {
                    "run": run,
                    "point": f"rank={rank}",
                    "seed": seed,
                    "rank": rank,
                    "status": status,
                    "metric": "val/accuracy",
                    "value": scores.mean() if status == "done" else "",
                    "params/trainable_pct": 0.1 * rank,
                    "steps": 10,
                }
            )
            if status == "done":
                arrays[run], arrays[run + "::digest"] = scores, np.array("same examples")
    with open(folder / "results.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    np.savez(folder / "examples.npz", **arrays)
    # The kernel must be this interpreter (the venv's), whatever kernelspecs the machine has.
    kernels = tmp_path / "jupyter" / "kernels" / "python3"
    kernels.mkdir(parents=True)
    (kernels / "kernel.json").write_text(
        json.dumps(
            {
                "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
                "display_name": "Python 3",
                "language": "python",
            }
        )
    )
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
    monkeypatch.setenv("IPYTHONDIR", str(tmp_path / "ipython"))
    monkeypatch.setenv("FTLAB_RESULTS", str(folder / "results.csv"))
    monkeypatch.delenv("MPLBACKEND", raising=False)

    nb = nbformat.read(ROOT / "notebooks" / "compare_methods.ipynb", as_version=4)
    nbclient.NotebookClient(
        nb, kernel_name="python3", timeout=120, resources={"metadata": {"path": str(ROOT / "notebooks")}}
    ).execute()
    outputs = [o for cell in nb.cells if cell.cell_type == "code" for o in cell.outputs]
    text = "".join(o.get("text", "") for o in outputs)
    assert "1 results file(s), 9 runs, 8 finished, 3 grid points" in text
    assert "lora_rank: rank=1 - rank=8 = " in text and "indistinguishable at 95%" in text
    assert any("image/png" in o.get("data", {}) for o in outputs)  # means with intervals
    html = "".join(str(o.get("data", {}).get("text/html", "")) for o in outputs)
    assert "≈ best" in html and "worse" in html and "rank=64" in html  # the per-point table with verdicts


def test_results_have_each_column_once(tmp_path):
    """perf/* are both logged metrics and summary fields: results.csv has them once."""
    from ftlab.sweep import load, plan
    from ftlab.sweep.report import rows

    sweep = plan(load(_sweep_file(tmp_path)))
    for run, loss in zip(sweep.runs, (0.5, 0.4)):
        run.run_dir.mkdir(parents=True)
        (run.run_dir / "summary.json").write_text(
            json.dumps(
                {
                    "metrics": {"train/loss": loss, "perf/tokens_per_s": 100.0, "val/f1": 0.7},
                    "perf/tokens_per_s": 100.0,
                    "steps": 2,
                    "method": "LoRA",
                }
            )
        )
    columns, table = rows(sweep)
    assert len(columns) == len(set(columns)) and {"perf/tokens_per_s", "val/f1", "seed", "tokens"} <= set(
        columns
    )
    assert [(r["value"], r["perf/tokens_per_s"], r["seed"]) for r in table] == [
        (0.5, 100.0, 0),
        (0.4, 100.0, 0),
    ]
    # The method's class has a column of its own: a grid axis is often called "method".
    assert [r["method_class"] for r in table] == ["LoRA", "LoRA"] and "method" not in columns
