"""Every config runs with fast_dev_run; user mistakes end in one clear line, not a traceback."""

from pathlib import Path

import pytest
from conftest import nli_tsv

from ftlab.cli import main

ROOT = Path(__file__).parents[1]
# every shipped config, and the configs experiments build their candidates on
CONFIGS = sorted((ROOT / "configs").glob("*.yaml")) + sorted((ROOT / "experiments").glob("*/base.yaml"))


def _sst2_like(tmp_path: Path) -> str:
    rows = "sentence\tlabel\n" + "".join(f"{w} film \t{i % 2}\n" for i, w in enumerate(["good", "bad"] * 8))
    (tmp_path / "train.tsv").write_text(rows)
    (tmp_path / "dev.tsv").write_text(rows)
    return str(tmp_path)


def _sts_like(tmp_path: Path) -> str:
    """A tiny STS-B folder in the real layout: tab-separated, no header, a row with licence columns."""
    rows = [
        f"main-captions\tMSRvid\t2012\t{i:04d}\t{i % 6}.000\tA man plays {w}.\tA man is playing {w}."
        for i, w in enumerate(["a flute", "the drums", "a guitar", "cards", "chess", "music"] * 3)
    ]
    rows[0] += "\tlicence a\tlicence b"
    for split in ("train", "dev", "test"):
        (tmp_path / f"sts-{split}.csv").write_text("\n".join(rows) + "\n")
    return str(tmp_path)


def _hh_like(tmp_path: Path) -> str:
    import json

    rows = [
        {
            "chosen": f"\n\nHuman: question {i}?\n\nAssistant: a kind and helpful answer number {i}",
            "rejected": f"\n\nHuman: question {i}?\n\nAssistant: a rude and useless answer number {i}",
        }
        for i in range(24)
    ]
    path = tmp_path / "hh.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return str(path)


def _overrides(config: Path, tmp_path: Path) -> list[str]:
    text = config.read_text()
    extra = []
    if "sst2_glue" in text:
        extra += ["--data.init_args.source", _sst2_like(tmp_path)]
    if "stsbenchmark" in text:
        extra += ["--data.init_args.source", _sts_like(tmp_path)]
    if "snli_dev_test" in text:
        extra += ["--data.init_args.mix_source", nli_tsv(tmp_path / "snli.tsv", 8)]
    if "hh_rlhf" in text:
        extra += ["--data.init_args.source", _hh_like(tmp_path)]
    if "synthetic_size" in text or "TextData" in text:
        extra += ["--data.init_args.synthetic_size", "64"]
    if "InstructionData" in text:
        extra += ["--data.init_args.synthetic_train_size", "64", "--data.init_args.synthetic_val_size", "8"]
    return extra


def _config_id(path: Path) -> str:
    return path.stem if path.parent.name == "configs" else f"{path.parent.name}/{path.stem}"


@pytest.mark.parametrize("config", CONFIGS, ids=_config_id)
def test_config_runs_fast_dev_run(config, tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    main(
        [
            "fit",
            "--config",
            str(config),
            "--trainer.fast_dev_run=true",
            f"--trainer.default_root_dir={tmp_path}",
            *_overrides(config, tmp_path),
        ]
    )


def test_links_fill_tokenizer_and_max_length(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["fit", "--config", str(ROOT / "configs" / "lora.yaml"), "--print_config"])
    assert exit_.value.code == 0
    printed = capsys.readouterr().out
    assert "max_length: 96" in printed  # linked targets (data tokenizer, model max_length) are not printed
    # The links must act, not just parse: lora_sst2 uses minilm, whose tokenizer the data must take
    # (a link from "model.init_args.backbone.name_or_path" once left the byte tokenizer in place).
    from ftlab.cli import FtlabCLI
    from ftlab.objectives._base import Objective

    cli = FtlabCLI(
        Objective,
        subclass_mode_model=True,
        subclass_mode_data=True,
        run=False,
        args=["--config", str(ROOT / "configs" / "lora_sst2.yaml"), "--trainer.logger=false"],
    )
    assert cli.datamodule.tokenizer_name == "minilm"
    assert cli.model.max_length == cli.datamodule.max_length == 64


def _error(args, capsys) -> str:
    with pytest.raises(SystemExit) as exit_:
        main(args)
    assert exit_.value.code == 2
    return capsys.readouterr().err


def test_unknown_preset_is_one_line(capsys, tmp_path):
    err = _error(
        [
            "fit",
            "--config",
            "configs/lora.yaml",
            "--trainer.fast_dev_run=true",
            "--model.init_args.backbone.name_or_path",
            "tiny-lama",
            f"--trainer.default_root_dir={tmp_path}",
        ],
        capsys,
    )
    assert "unknown backbone preset 'tiny-lama'" in err and "Traceback" not in err


def test_rank_zero_is_rejected(capsys, tmp_path):
    err = _error(
        [
            "fit",
            "--config",
            "configs/lora.yaml",
            "--trainer.fast_dev_run=true",
            "--model.init_args.method.init_args.rank",
            "0",
            f"--trainer.default_root_dir={tmp_path}",
        ],
        capsys,
    )
    assert "rank must be > 0" in err and "Traceback" not in err


def test_target_matching_nothing_lists_modules(capsys, tmp_path):
    err = _error(
        [
            "fit",
            "--config",
            "configs/lora.yaml",
            "--trainer.fast_dev_run=true",
            "--model.init_args.method.init_args.targets",
            "[query]",
            f"--trainer.default_root_dir={tmp_path}",
            "--data.init_args.synthetic_train_size",
            "8",
            "--data.init_args.synthetic_val_size",
            "4",
        ],
        capsys,
    )
    assert "match no module" in err and "model.layers.*.self_attn.q_proj" in err


def test_config_key_typo(capsys):
    err = _error(["fit", "--config", "configs/lora.yaml", "--model.init_args.methd", "x"], capsys)
    assert "methd" in err


def test_missing_data_path(capsys, tmp_path):
    err = _error(
        [
            "fit",
            "--config",
            "configs/lora_sst2.yaml",
            "--trainer.fast_dev_run=true",
            "--data.init_args.source",
            str(tmp_path / "nowhere"),
            f"--trainer.default_root_dir={tmp_path}",
        ],
        capsys,
    )
    assert "nowhere does not exist" in err


def test_missing_checkpoint_is_one_line(capsys, tmp_path):
    err = _error(
        [
            "fit",
            "--config",
            "configs/lora.yaml",
            f"--trainer.default_root_dir={tmp_path}",
            "--ckpt_path",
            str(tmp_path / "nope.ckpt"),
        ],
        capsys,
    )
    assert "nope.ckpt: no such checkpoint" in err and "Traceback" not in err


@pytest.fixture(autouse=True)
def _repo_root(monkeypatch):
    monkeypatch.chdir(Path(__file__).parents[1])
