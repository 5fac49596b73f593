"""``ftlab``: LightningCLI with ftlab's objectives, data, methods and default callbacks.

    ftlab fit --config configs/lora.yaml
    ftlab fit --config configs/lora.yaml --model.init_args.method.init_args.rank 64
    ftlab validate|test|predict --config ... [--ckpt_path ...]
    ftlab fit --config configs/lora.yaml --print_config

Links: the data's tokenizer comes from ``model.init_args.backbone.name_or_path`` and the model's
``max_length`` from the data, so neither is written twice.
"""

from __future__ import annotations

import importlib
import logging
import os
import sys
import traceback
from pathlib import Path

from lightning.pytorch.cli import LightningCLI

import ftlab.data  # noqa: F401 - registers DataModules for short class names
import ftlab.objectives  # noqa: F401
import ftlab.optim  # noqa: F401
import ftlab.peft  # noqa: F401
from ftlab.callbacks import (
    ParameterTable, RestoreRNG, RunSummary, SaveAdapter, StopOnNonFinite, Throughput, WritePredictions,
)
from ftlab.objectives._base import Objective
from ftlab.runs import LogConfig, check_strategy, name_wandb_runs

DEFAULT_CALLBACKS = (
    ParameterTable, Throughput, StopOnNonFinite, RestoreRNG, SaveAdapter, RunSummary, WritePredictions,
)
#: Subcommands beside Lightning's fit/validate/test/predict: name -> "module:function(argv)".
EXTRA_COMMANDS: dict[str, str] = {}
EXTRA_COMMANDS["data"] = "ftlab.data.tools:main"
EXTRA_COMMANDS["export"] = "ftlab.export:main"
EXTRA_COMMANDS["sweep"] = "ftlab.sweep:main"


class FtlabCLI(LightningCLI):
    def __init__(self, *args, **kwargs):
        kwargs.setdefault("save_config_callback", LogConfig)  # config.yaml + the config in every logger
        super().__init__(*args, **kwargs)

    def add_arguments_to_parser(self, parser) -> None:
        # jsonargparse holds the Backbone dataclass as {class_path, init_args}: a link from
        # "model.init_args.backbone.name_or_path" was accepted and silently did nothing.
        parser.link_arguments("model.init_args.backbone.init_args.name_or_path", "data.init_args.tokenizer")
        parser.link_arguments("data.init_args.max_length", "model.init_args.max_length")

    def before_instantiate_classes(self) -> None:
        config = self.config.get(self.subcommand) if self.subcommand else self.config
        check_strategy(config.get("trainer"))  # before any model or data is loaded
        ckpt = config.get("ckpt_path")
        named = ckpt in ("last", "best", "hpc") or str(ckpt).startswith("registry")  # Lightning resolves these
        if ckpt and not named and not Path(ckpt).exists():
            raise FileNotFoundError(f"--ckpt_path {ckpt}: no such checkpoint (or use --ckpt_path last)")

    def instantiate_trainer(self, **kwargs):
        trainer = super().instantiate_trainer(**kwargs)
        name_wandb_runs(trainer.loggers, self.model, self.datamodule)
        present = {type(c) for c in trainer.callbacks}
        for cls in DEFAULT_CALLBACKS:
            if cls not in present:
                trainer.callbacks.append(cls())
        return trainer


def main(args: list[str] | None = None) -> None:
    _log_to_stderr()
    argv = sys.argv[1:] if args is None else list(args)
    if argv and argv[0] in EXTRA_COMMANDS:
        module, _, func = EXTRA_COMMANDS[argv[0]].partition(":")
        command = getattr(importlib.import_module(module), func)
        return _friendly(lambda: command(argv[1:]))
    return _friendly(lambda: FtlabCLI(
        Objective, subclass_mode_model=True, subclass_mode_data=True,
        save_config_kwargs={"overwrite": True}, args=args,
        parser_kwargs={"description": "ftlab: method x objective x data, from one YAML. Lightning's fit, "
                       "validate, test, predict below; also `ftlab export`, `ftlab data` and `ftlab sweep` "
                       "(each with --help)."},
    ))


def _log_to_stderr() -> None:
    """ftlab's own INFO messages (truncation counts, quantization sizes...) go to stderr."""
    log = logging.getLogger("ftlab")
    if not log.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("ftlab: %(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)


def _friendly(run) -> None:
    """Run ``run()``; a mistake that ftlab's own code detected ends in one line and exit code 2."""
    try:
        run()
    except (ValueError, KeyError, FileNotFoundError, RuntimeError) as err:
        cause = _ftlab_cause(err)
        if os.environ.get("FTLAB_DEBUG") or cause is None:
            raise
        print(f"ftlab: error: {cause}", file=sys.stderr)
        sys.exit(2)


def _ftlab_cause(err: BaseException) -> BaseException | None:
    """The innermost error in ``err``'s chain raised by ftlab's own checks (jsonargparse wraps
    errors from ``__init__`` in its own), or None for errors from anywhere else."""
    found, seen = None, set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        frames = traceback.extract_tb(err.__traceback__)
        if frames and "/ftlab/" in frames[-1].filename.replace("\\", "/") and isinstance(
            err, (ValueError, KeyError, FileNotFoundError, RuntimeError)
        ):
            found = err
        err = err.__cause__ or err.__context__
    return found


if __name__ == "__main__":
    main()
