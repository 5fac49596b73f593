"""What a user gets wrong, met through the CLI as a user would: one clear line naming the file, line,
key or module (exit code 2, no traceback), and nothing on disk lost."""

from __future__ import annotations

import gzip
import json
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch

from ftlab.callbacks import NonFiniteLossError, StopOnNonFinite
from ftlab.cli import main

ROOT = Path(__file__).parents[1]
LORA = str(ROOT / "configs" / "lora.yaml")
TINY = [
    "--data.init_args.synthetic_train_size",
    "16",
    "--data.init_args.synthetic_val_size",
    "4",
    "--trainer.enable_progress_bar",
    "false",
]


def _error(capsys, *args: str) -> str:
    with pytest.raises(SystemExit) as exit_:
        main(list(args))
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "usage:" not in err.split("ftlab: error:")[-1]
    return err.split("ftlab: error:")[-1].strip()


def _fit(tmp_path: Path, *args: str, config: str = LORA) -> None:
    main(["fit", "--config", config, f"--trainer.default_root_dir={tmp_path}", *TINY, *args])


# ------------------------------------------------------------------------- unreadable data
def _instruction_rows(n: int = 8) -> list[dict]:
    return [{"instruction": "Repeat the word.", "input": f"w{i}", "output": f"w{i}"} for i in range(n)]


def test_non_utf8_file_names_the_line(tmp_path, capsys):
    path = tmp_path / "train.jsonl"
    path.write_bytes(json.dumps(_instruction_rows()[0]).encode() + b"\n" + b'{"instruction": "caf\xe9"}\n')
    err = _error(capsys, "fit", "--config", LORA, "--data.init_args.source", str(path), *TINY)
    assert f"{path}:2: not UTF-8 text (byte 0xe9)" in err


def test_gz_that_is_not_gzip(tmp_path, capsys):
    path = tmp_path / "train.jsonl.gz"
    path.write_text(json.dumps(_instruction_rows()[0]) + "\n")
    err = _error(capsys, "fit", "--config", LORA, "--data.init_args.source", str(path), *TINY)
    assert f"{path}: not a readable gzip file" in err


def test_corrupt_parquet(tmp_path, capsys):
    path = tmp_path / "train.parquet"
    path.write_bytes(b"PAR1 this is not a parquet file at all PAR1")
    err = _error(capsys, "fit", "--config", LORA, "--data.init_args.source", str(path), *TINY)
    assert f"{path}: not a readable parquet file" in err


def test_gzip_jsonl_and_parquet_read_the_same_rows(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from ftlab.data._io import read_records

    rows = _instruction_rows(3)
    with gzip.open(tmp_path / "a.jsonl.gz", "wt", encoding="utf-8") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "a.parquet")
    for name in ("a.jsonl.gz", "a.parquet"):
        assert [{k: v for k, v in r.items() if k != "_where"} for r in read_records(tmp_path / name)] == rows


@pytest.mark.parametrize(
    ("field", "value", "kind"), [("output", ["a", "b"], "list"), ("input", {"x": 1}, "dict")]
)
def test_a_list_or_object_where_text_belongs(tmp_path, capsys, field, value, kind):
    rows = _instruction_rows()
    rows[3][field] = value
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    err = _error(capsys, "fit", "--config", LORA, "--data.init_args.source", str(path), *TINY)
    assert f"{path}:4: field {field!r} must be text, got a {kind}" in err


# ------------------------------------------------------------------------- labels
def _classification(tmp_path: Path, labels: list) -> str:
    rows = "sentence\tlabel\n" + "".join(f"word{i} film\t{label}\n" for i, label in enumerate(labels))
    (tmp_path / "train.tsv").write_text(rows)
    (tmp_path / "dev.tsv").write_text(rows)
    return str(tmp_path)


CLASSIFY = [
    "--config",
    str(ROOT / "configs" / "lora_sst2.yaml"),
    "--model.init_args.backbone.name_or_path",
    "tiny-llama",
    "--model.init_args.method.init_args.targets",
    "[q_proj]",
    "--trainer.fast_dev_run",
    "true",
]


def test_label_outside_num_labels(tmp_path, capsys):
    source = _classification(tmp_path, [0, 1, 2] * 4)
    err = _error(
        capsys,
        "fit",
        *CLASSIFY,
        "--data.init_args.source",
        source,
        "--model.init_args.num_labels",
        "2",
        f"--trainer.default_root_dir={tmp_path}",
    )
    assert "num_labels=2, but the data has 3 labels (['0', '1', '2'])" in err


def test_labels_1_and_1_point_0_are_one_class(tmp_path):
    from ftlab.data import ClassificationData

    tmp_path.joinpath("train.jsonl").write_text(
        "".join(
            json.dumps({"sentence": f"s{i}", "label": label}) + "\n"
            for i, label in enumerate([0, 1, 1.0, "1.0", "0", 2.5])
        )
    )
    dm = ClassificationData(source=str(tmp_path / "train.jsonl"), val_fraction=0.0)
    assert dm.labels is None and dm.num_labels == 3 and dm.labels == ["0", "1", "2.5"]


# ------------------------------------------------------------------------- models and checkpoints
def test_hub_name_without_network(tmp_path, capsys):
    err = _error(
        capsys,
        "fit",
        "--config",
        LORA,
        "--model.init_args.backbone.name_or_path",
        "some-org/some-model",
        f"--trainer.default_root_dir={tmp_path}",
        *TINY,
    )
    assert "cannot load the tokenizer of Hugging Face hub model 'some-org/some-model'" in err
    assert "give a local folder" in err


def test_ckpt_path_that_is_an_adapter_folder(tmp_path, capsys):
    (tmp_path / "adapter").mkdir()
    (tmp_path / "adapter" / "adapter.json").write_text("{}")
    err = _error(capsys, "fit", "--config", LORA, "--ckpt_path", str(tmp_path / "adapter"), *TINY)
    assert "is an adapter folder, not a training checkpoint" in err and "--model.init_args.adapter" in err


def test_checkpoint_monitoring_a_metric_nobody_logs(tmp_path, capsys):
    err = _error(
        capsys,
        "fit",
        "--config",
        LORA,
        f"--trainer.default_root_dir={tmp_path}",
        *TINY,
        "--trainer.max_steps",
        "2",
        "--trainer.val_check_interval",
        "1",
        "--trainer.callbacks+=ModelCheckpoint",
        "--trainer.callbacks.monitor",
        "val/los",
    )
    assert (
        "ModelCheckpoint(monitor='val/los'): no metric of that name is logged (did you mean 'val/loss'?)"
        in err
    )


def test_prompt_longer_than_max_length_is_counted_not_a_nan(tmp_path, caplog):
    from ftlab.data import InstructionData

    rows = [
        {"instruction": "Repeat the word " + "very " * (40 if i % 2 else 1) + "carefully.", "output": "ok"}
        for i in range(8)
    ]
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    dm = InstructionData(source=str(path), template="alpaca_short", max_length=96, val_fraction=0.0)
    dm.setup()
    assert len(dm.splits["train"]) == 4  # the four long prompts are left out...
    assert "4 of 8 train samples have no target token within max_length=96" in caplog.text  # ...and counted
    assert all(any(t != -100 for t in it["labels"][1:]) for it in dm.splits["train"])
    from ftlab.data._io import DataError

    with pytest.raises(DataError, match="nothing is left to train on; raise data.init_args.max_length"):
        InstructionData(source=str(path), max_length=16, val_fraction=0.0).setup()


# ------------------------------------------------------------------------- nothing lost
def test_two_runs_without_a_logger_keep_their_own_files(tmp_path):
    for _ in range(2):
        _fit(
            tmp_path,
            "--trainer.logger=false",
            "--trainer.max_steps",
            "1",
            "--trainer.val_check_interval",
            "1",
        )
    for version in (0, 1):
        run = tmp_path / f"version_{version}"
        assert {"config.yaml", "summary.json", "adapter", "checkpoints"} <= {p.name for p in run.iterdir()}
    assert not (tmp_path / "config.yaml").exists() and not (tmp_path / "checkpoints").exists()


def test_default_root_dir_moves_every_output(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _fit(tmp_path / "elsewhere", "--trainer.max_steps", "1", "--trainer.val_check_interval", "1")
    run = tmp_path / "elsewhere" / "version_0"
    assert {"config.yaml", "metrics.csv", "summary.json", "adapter", "checkpoints"} <= {
        p.name for p in run.iterdir()
    }
    assert not (tmp_path / "runs").exists()  # the config's own default_root_dir (runs/lora) is not used


def test_export_refuses_a_folder_that_is_not_an_earlier_export(tmp_path, capsys):
    _fit(tmp_path, "--trainer.max_steps", "1", "--trainer.val_check_interval", "1")
    run = tmp_path / "version_0"
    before = sorted(p.relative_to(run) for p in run.rglob("*"))
    err = _error(capsys, "export", "--config", LORA, "--adapter", str(run / "adapter"), "--out", str(run))
    assert "holds the adapter" in err
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "mine.txt").write_text("keep me")
    err = _error(
        capsys,
        "export",
        "--config",
        LORA,
        "--adapter",
        str(run / "adapter"),
        "--out",
        str(tmp_path / "notes"),
    )
    assert "not an earlier export" in err and "--overwrite" in err
    assert (tmp_path / "notes" / "mine.txt").read_text() == "keep me"
    assert sorted(p.relative_to(run) for p in run.rglob("*")) == before
    for _ in range(2):  # a new folder, then the same folder again: an earlier export is replaced
        main(
            ["export", "--config", LORA, "--adapter", str(run / "adapter"), "--out", str(tmp_path / "merged")]
        )
    assert (tmp_path / "merged" / "ftlab_export.json").exists() and (
        tmp_path / "merged" / "config.json"
    ).exists()


def test_data_tool_refuses_to_write_over_its_input(tmp_path, capsys):
    path = tmp_path / "export.json"
    path.write_text("[]")
    err = _error(capsys, "data", "labelstudio", "--input", str(path), "--output", str(path))
    assert "is the --input file" in err and path.read_text() == "[]"


class _Overflow(L.LightningModule):
    """The weights become inf during step ``bad_step`` while that step's loss is still finite."""

    def __init__(self, bad_step: int):
        super().__init__()
        self.lin, self.bad_step = torch.nn.Linear(2, 1), bad_step

    def training_step(self, batch, i):
        loss = self.lin(batch).pow(2).mean()
        if self.global_step == self.bad_step:
            with torch.no_grad():
                self.lin.weight.fill_(float("inf"))
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)

    def train_dataloader(self):
        return torch.utils.data.DataLoader(torch.randn(64, 2), batch_size=4)


def test_no_checkpoint_holds_non_finite_weights(tmp_path):
    ckpt = L.pytorch.callbacks.ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=1, save_top_k=-1)
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=10,
        logger=False,
        enable_progress_bar=False,
        callbacks=[ckpt, StopOnNonFinite()],
    )
    with pytest.raises(
        NonFiniteLossError, match=r"trainable weights hold NaN/inf after step 4 \(lin.weight\)"
    ):
        trainer.fit(_Overflow(bad_step=3))
    saved = sorted(p.name for p in tmp_path.glob("*.ckpt"))
    assert saved == [f"epoch=0-step={s}.ckpt" for s in (1, 2, 3)]
    for name in saved:
        assert all(
            torch.isfinite(v).all()
            for v in torch.load(tmp_path / name, weights_only=True)["state_dict"].values()
        )
    with pytest.raises(NonFiniteLossError, match="when saving a checkpoint"):  # any other save is refused too
        trainer.save_checkpoint(tmp_path / "manual.ckpt")
    assert not (tmp_path / "manual.ckpt").exists()


# ------------------------------------------------------------------------- output and start-up
def test_plain_progress_lines_when_output_is_not_a_terminal(tmp_path, capsys):
    _fit(tmp_path, "--trainer.max_steps", "3", "--trainer.val_check_interval", "3", "--trainer.logger=false")
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("ftlab: step ")]
    assert lines[0].startswith("ftlab: step 1/3 | epoch 0 | loss ") and "tokens/s | eta " in lines[0]
    assert lines[-1].startswith("ftlab: step 3/3")


def test_ftlab_help_does_not_load_lightning():
    code = (
        "import sys; from ftlab.cli import main; main(['--help']); "
        "print(sorted(m for m in sys.modules if m.startswith(('lightning', 'torch'))))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and "commands:" in done.stdout and done.stdout.strip().endswith("[]")
