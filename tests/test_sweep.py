"""``ftlab sweep`` end to end on a tiny grid (runs, results, skip-if-done), bad input before any
training, W&B run naming, and the comparison notebook executed on a small results file."""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import pytest
import torch
import yaml

from ftlab.cli import main

ROOT = Path(__file__).parents[1]
RANK = "model.init_args.method.init_args.rank"
#: The embedded default cut to nothing: 2 steps of batch 4, no validation, no checkpoint.
TINY = {"trainer.max_steps": 2, "trainer.limit_val_batches": 0, "trainer.enable_checkpointing": False,
        "trainer.enable_progress_bar": False, "data.init_args.synthetic_train_size": 16,
        "data.init_args.synthetic_val_size": 4, "data.init_args.batch_size": 4}


def _sweep_file(tmp_path: Path, **spec) -> Path:
    spec = {"base": str(ROOT / "configs" / "lora.yaml"), "grid": {RANK: [1, 2]}, "fixed": TINY,
            "metric": "train/loss", "out": str(tmp_path / "out"), **spec}
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def _error(capsys, *argv) -> str:
    with pytest.raises(SystemExit) as exit_:
        main(["sweep", *map(str, argv)])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("ftlab: error:") and "Traceback" not in err
    return err


@pytest.mark.slow
def test_tiny_grid_runs_tabulates_and_resumes(tmp_path, capsys):
    path = _sweep_file(tmp_path)
    main(["sweep", str(path), "--parallel", "2"])
    out = tmp_path / "out"
    with open(out / "results.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert [(r["run"], r["rank"], r["status"], r["metric"]) for r in rows] == [
        ("rank=1", "1", "done", "train/loss"), ("rank=2", "2", "done", "train/loss")]
    assert all(float(r["value"]) > 0 for r in rows)
    assert int(rows[1]["params/trainable"]) == 2 * int(rows[0]["params/trainable"])  # LoRA: linear in r
    assert "| rank | train/loss |" in (out / "results.md").read_text()
    assert (out / "plot.png").read_bytes()[:4] == b"\x89PNG"
    summaries = {}
    for r, rank in zip(rows, (1, 2)):
        run_dir = Path(r["run_dir"])
        assert run_dir == out / "runs" / f"rank={rank}"
        summaries[rank] = next(run_dir.rglob("summary.json"))
        # The full config went to every logger (CSV's hparams.yaml here; W&B's config the same way).
        hparams = yaml.safe_load(next(run_dir.rglob("hparams.yaml")).read_text())
        assert hparams["model"]["init_args"]["method"]["init_args"]["rank"] == rank
        assert hparams["trainer"]["max_steps"] == 2
    stamps = {r: p.stat().st_mtime for r, p in summaries.items()}
    capsys.readouterr()

    main(["sweep", str(path)])  # everything is done: nothing runs again
    printed = capsys.readouterr().out
    assert printed.count("done, skipped") == 2 and "running" not in printed
    assert {r: p.stat().st_mtime for r, p in summaries.items()} == stamps

    main(["sweep", str(path), "--dry-run", "--set", "trainer.max_steps=3"])
    printed = capsys.readouterr().out
    assert printed.count("(done)") == 2 and "--trainer.max_steps 3" in printed


@pytest.mark.parametrize("spec, message", [
    ({"base": "configs/nowhere.yaml"}, "base config configs/nowhere.yaml does not exist"),
    ({"grid": {}}, "the grid is empty"),
    ({"grid": {RANK: []}}, f"grid key '{RANK}' has an empty list of values"),
    ({"grid": {"model.init_args.method.init_args.rnak": [1, 2]}},
     "key 'model.init_args.method.init_args.rnak' is not in the config (configs/lora.yaml) "
     f"(did you mean '{RANK}'?)"),
    ({"fixed": {**TINY, "trainer.max_step": 3}}, "did you mean 'trainer.max_steps'?"),
    ({"grid": {RANK: [2, "two"]}}, "point 'rank=two' does not parse"),
    ({"fixed": {**TINY, "trainer.strategy": "fsdp", "trainer.accelerator": "cpu"}},
     "strategy fsdp cannot run on CPU"),
    ({"fixed": {**TINY, "trainer.accelerator": "gpu"}}, "no CUDA GPU is visible"),
    ({"grdi": {RANK: [1]}}, "unknown key 'grdi' (did you mean 'grid'?)"),
    ({"fixed": [1, 2]}, "'fixed' maps dotted config keys to one value each"),
], ids=["missing-base", "empty-grid", "empty-values", "unknown-key", "unknown-fixed-key", "bad-value",
        "fsdp-on-cpu", "gpu-without-gpu", "sweep-key-typo", "fixed-not-a-mapping"])
def test_bad_input_fails_before_training(spec, message, tmp_path, capsys, monkeypatch):
    if "gpu" in json.dumps(spec) and torch.cuda.is_available():
        pytest.skip("a GPU is visible")
    monkeypatch.chdir(ROOT)
    base = {"base": "configs/lora.yaml"}
    err = _error(capsys, _sweep_file(tmp_path, **{**base, **spec}))
    assert message in err
    assert not (tmp_path / "out").exists()  # nothing ran, nothing was written


def test_wandb_run_named_from_method(monkeypatch):
    from lightning.pytorch.loggers import WandbLogger

    from ftlab.cli import FtlabCLI
    from ftlab.objectives._base import Objective
    from ftlab.peft import LoRA
    from ftlab.runs import run_name

    assert run_name(LoRA(rank=16, alpha=32, targets=["q_proj", "v_proj"])) == "LoRA-r16-a32-q_proj,v_proj"
    monkeypatch.setenv("WANDB_MODE", "offline")  # ftlab's default loggers leave W&B out when it is disabled
    args = ["--config", str(ROOT / "configs" / "lora.yaml"), f"--{RANK}", "4"]
    cli = FtlabCLI(Objective, subclass_mode_model=True, subclass_mode_data=True, run=False, args=args)
    (wandb,) = [lg for lg in cli.trainer.loggers if isinstance(lg, WandbLogger)]
    init = wandb._wandb_init  # wandb.init's arguments, before the run starts
    assert init["name"] == "LoRA-r4-a32-q_proj,k_proj,v_proj,o_proj"
    assert init["group"] == "CausalLM-tiny-llama-synthetic"
    assert init["tags"] == ["LoRA", "CausalLM", "tiny-llama"]
    # What the user (or ftlab sweep, through W&B's own variables) sets is left alone.
    monkeypatch.setenv("WANDB_RUN_GROUP", "my_sweep")
    monkeypatch.setenv("WANDB_TAGS", "sweep")
    mine = [{"class_path": "lightning.pytorch.loggers.WandbLogger", "init_args": {"name": "mine"}}]
    cli = FtlabCLI(Objective, subclass_mode_model=True, subclass_mode_data=True, run=False,
                   args=[*args, "--trainer.logger", json.dumps(mine)])
    init = cli.trainer.logger._wandb_init
    assert init["name"] == "mine" and init.get("group") is None
    assert init["tags"] == ["LoRA", "CausalLM", "tiny-llama", "sweep"]


def test_compare_notebook_runs_on_results(tmp_path, monkeypatch):
    import nbclient
    import nbformat

    columns = ["run", "rank", "status", "metric", "value", "params/trainable_pct", "perf/tokens_per_s",
               "perf/peak_mem_gib", "steps", "method"]
    rows = [dict(zip(columns, values)) for values in [
        ("rank=1", 1, "done", "val/accuracy", 0.84, 0.2, 9000.0, 1.1, 10, "LoRA"),
        ("rank=8", 8, "done", "val/accuracy", 0.87, 0.6, 8800.0, 1.2, 10, "LoRA"),
        ("rank=64", 64, "failed (exit 1)", "val/accuracy", "", "", "", "", "", ""),
    ]]
    results = tmp_path / "lora_rank" / "results.csv"
    results.parent.mkdir()
    with open(results, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    # The kernel must be this interpreter (the venv's), whatever kernelspecs the machine has.
    kernels = tmp_path / "jupyter" / "kernels" / "python3"
    kernels.mkdir(parents=True)
    (kernels / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "Python 3", "language": "python"}))
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
    monkeypatch.setenv("IPYTHONDIR", str(tmp_path / "ipython"))
    monkeypatch.setenv("FTLAB_RESULTS", str(results))
    monkeypatch.delenv("MPLBACKEND", raising=False)

    nb = nbformat.read(ROOT / "notebooks" / "compare_methods.ipynb", as_version=4)
    nbclient.NotebookClient(nb, kernel_name="python3", timeout=120,
                            resources={"metadata": {"path": str(ROOT / "notebooks")}}).execute()
    outputs = [o for cell in nb.cells if cell.cell_type == "code" for o in cell.outputs]
    text = "".join(o.get("text", "") for o in outputs)
    assert "1 results file(s), 3 runs, 2 finished" in text
    assert any("image/png" in o.get("data", {}) for o in outputs)  # the comparison plot
    assert any("rank=8" in str(o.get("data", {}).get("text/html", "")) for o in outputs)  # the table


def test_results_have_each_column_once(tmp_path):
    """perf/* are both logged metrics and summary fields: results.csv has them once."""
    from ftlab.sweep import load, plan, rows

    sweep = plan(load(_sweep_file(tmp_path)))
    for point, loss in zip(sweep.points, (0.5, 0.4)):
        point.run_dir.mkdir(parents=True)
        (point.run_dir / "summary.json").write_text(json.dumps(
            {"metrics": {"train/loss": loss, "perf/tokens_per_s": 100.0, "val/f1": 0.7},
             "perf/tokens_per_s": 100.0, "steps": 2}))
    columns, table = rows(sweep)
    assert len(columns) == len(set(columns)) and {"perf/tokens_per_s", "val/f1"} <= set(columns)
    assert [(r["value"], r["perf/tokens_per_s"]) for r in table] == [(0.5, 100.0), (0.4, 100.0)]
