"""``FtlabCLI``: LightningCLI with ftlab's objectives, data, methods, loggers and default callbacks.

Links: the data's tokenizer comes from ``model.init_args.backbone.name_or_path`` and the model's
``max_length`` from the data, so neither is written twice.

Where a run writes: everything of one run (config.yaml, logs, checkpoints, adapter, summary.json,
predictions) goes to one run directory, ``<default_root_dir>/version_N`` with the next free N
(see ``ftlab.callbacks.run_dir``), so ``--trainer.default_root_dir`` alone moves a run and a
second run never writes over a first. When the config names no logger, ftlab logs to CSV there
and to W&B (offline unless ``WANDB_MODE=online``; none with ``WANDB_MODE=disabled``).

Resuming: ``--ckpt_path last`` is the newest ``last*.ckpt`` of any earlier run under the same
root (or of a ``ModelCheckpoint`` with its own ``dirpath``); the resumed run writes to a new
``version_N`` beside it, so nothing of the interrupted run is overwritten.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

import ftlab.data  # noqa: F401 - registers DataModules for short class names
import ftlab.objectives  # noqa: F401
import ftlab.optim  # noqa: F401
import ftlab.peft  # noqa: F401
from ftlab.callbacks import (
    CheckMonitors,
    ParameterTable,
    ProgressLog,
    RestoreRNG,
    RunDirectory,
    RunSummary,
    SaveAdapter,
    StopOnNonFinite,
    Throughput,
    WritePredictions,
)
from ftlab.objectives._base import Objective
from ftlab.runs import LogConfig, check_strategy, name_wandb_runs

log = logging.getLogger("ftlab")

#: Added to every run that does not configure them itself; they run before checkpoint callbacks.
DEFAULT_CALLBACKS = (
    RunDirectory,
    ParameterTable,
    Throughput,
    ProgressLog,
    StopOnNonFinite,
    CheckMonitors,
    RestoreRNG,
    SaveAdapter,
    RunSummary,
    WritePredictions,
)


class FtlabParser(LightningArgumentParser):
    """A config error prints the error and where help is, not the ~50 lines of the full usage."""

    def print_usage(self, file=None) -> None:
        print(f"usage: {self.prog} [--config CONFIG] [options]", file=file or sys.stderr)


class FtlabCLI(LightningCLI):
    def __init__(self, *args, **kwargs):
        kwargs.setdefault("save_config_callback", LogConfig)  # config.yaml + the config in every logger
        kwargs.setdefault("save_config_kwargs", {"overwrite": True, "save_to_log_dir": False})
        kwargs.setdefault("parser_class", FtlabParser)
        super().__init__(*args, **kwargs)

    def add_arguments_to_parser(self, parser) -> None:
        # jsonargparse holds the Backbone dataclass as {class_path, init_args}: a link from
        # "model.init_args.backbone.name_or_path" was accepted and silently did nothing.
        parser.link_arguments("model.init_args.backbone.init_args.name_or_path", "data.init_args.tokenizer")
        parser.link_arguments("data.init_args.max_length", "model.init_args.max_length")

    def before_instantiate_classes(self) -> None:
        config = self.config.get(self.subcommand) if self.subcommand else self.config
        check_strategy(config.get("trainer"))  # before any model or data is loaded
        check_ckpt_path(config.get("ckpt_path"))

    def instantiate_trainer(self, **kwargs):
        config = self._get(self.config_init, "trainer", default={})
        if config.get("logger") in (None, True):
            kwargs["logger"] = default_loggers(config.get("default_root_dir") or os.getcwd())
        callbacks = config.get("callbacks") or []
        callbacks = list(callbacks) if isinstance(callbacks, list | tuple) else [callbacks]
        present = {type(c) for c in callbacks}
        kwargs["callbacks"] = [cls() for cls in DEFAULT_CALLBACKS if cls not in present] + callbacks
        trainer = super().instantiate_trainer(**kwargs)
        name_wandb_runs(trainer.loggers, self.model, self.datamodule)
        return trainer

    # ``--ckpt_path last`` is resolved by ftlab before any subcommand runs.
    def before_fit(self) -> None:
        self._resolve_last()

    before_validate = before_test = before_predict = before_fit

    def _resolve_last(self) -> None:
        config = self.config_init[self.subcommand]
        if config.get("ckpt_path") != "last":
            return
        found = find_last_checkpoint(self.trainer)
        if found is None:
            raise FileNotFoundError(
                f"--ckpt_path last: no last checkpoint under {run_root(self.trainer)} (nor in any "
                "ModelCheckpoint "
                "dirpath); a ModelCheckpoint with save_last: true writes one (README: Checkpoints and "
                "resuming)"
            )
        log.info("resuming from %s", found)
        config["ckpt_path"] = str(found)


def default_loggers(root: str | Path) -> list:
    """CSV logs in ``root/version_N`` and a W&B run saved under ``root`` (offline unless
    ``WANDB_MODE`` is ``online``; none when it is ``disabled``; project ``$WANDB_PROJECT`` or ftlab)."""
    loggers: list = [CSVLogger(root, name="")]
    mode = os.environ.get("WANDB_MODE", "offline").lower()
    if mode != "disabled":
        from lightning.pytorch.loggers import WandbLogger

        loggers.append(
            WandbLogger(
                project=os.environ.get("WANDB_PROJECT", "ftlab"),
                save_dir=str(root),
                offline=mode not in ("online", "run"),
            )
        )
    return loggers


def run_root(trainer) -> Path:
    """The folder that holds this run's ``version_N`` directory (see ``ftlab.callbacks.run_dir``)."""
    versioned = [lg for lg in trainer.loggers if isinstance(lg, CSVLogger | TensorBoardLogger)]
    return Path(versioned[0].root_dir if versioned else trainer.default_root_dir)


def find_last_checkpoint(trainer) -> Path | None:
    """The newest ``last*.ckpt`` in ``<run root>/version_*/checkpoints`` or in the ``dirpath`` of a
    configured ``ModelCheckpoint``; None when there is none."""
    folders = [Path(cb.dirpath) for cb in trainer.checkpoint_callbacks if getattr(cb, "dirpath", None)]
    folders += sorted(run_root(trainer).glob("version_*/checkpoints"))
    found = [p for folder in folders for p in folder.glob("last*.ckpt")]
    return max(found, key=lambda p: p.stat().st_mtime) if found else None


def check_ckpt_path(ckpt: str | None) -> None:
    """A ``--ckpt_path`` that cannot be a Lightning checkpoint is one clear error, before loading."""
    if not ckpt or ckpt in ("last", "best", "hpc") or str(ckpt).startswith("registry"):
        return  # Lightning (or ftlab, for "last") resolves these names
    path = Path(ckpt)
    if not path.exists():
        raise FileNotFoundError(f"--ckpt_path {ckpt}: no such checkpoint (or use --ckpt_path last)")
    if path.is_dir():
        if (path / "adapter.json").exists() or (path / "adapter_config.json").exists():
            raise ValueError(
                f"--ckpt_path {ckpt} is an adapter folder, not a training checkpoint; to start "
                f"from the adapter use --model.init_args.adapter {ckpt}"
            )
        if not (path / ".metadata").exists():
            raise ValueError(
                f"--ckpt_path {ckpt} is a folder but not a sharded checkpoint (no .metadata); "
                "give a .ckpt file"
            )


def run(args: list[str] | None = None) -> None:
    """``ftlab fit|validate|test|predict ...``."""
    FtlabCLI(
        Objective,
        subclass_mode_model=True,
        subclass_mode_data=True,
        args=args,
        parser_kwargs={
            "prog": "ftlab",
            "description": "ftlab: method x objective x data, from one YAML. Lightning's fit, "
            "validate, test, predict below; also `ftlab export`, `ftlab data` and `ftlab sweep` "
            "(each with --help).",
        },
    )
