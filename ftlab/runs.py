"""Run bookkeeping around the CLI: W&B run names, the full config in every logger, pre-flight checks.

``FtlabCLI`` calls these; nothing here branches on a method. A W&B run that the config leaves
unnamed gets

- name: the method's class and its key hyper-parameters from ``method.hparams()``
  (``LoRA-r16-a32-q_proj,v_proj``): values in ``KEY_HPARAMS`` always, others when they differ
  from the class default;
- group: objective, backbone and data source (``SequenceClassifier-minilm-sst2_glue``), so every
  method on one task sits side by side;
- tags: ``[method, objective, backbone, seed=<s>]`` plus ``$WANDB_TAGS``;
- the seed (``seed_everything``) ends the name (``...-seed0``), so runs that differ only by seed are
  told apart while the group keeps them together.

Values set in the config win, and so do W&B's own ``WANDB_NAME`` / ``WANDB_RUN_GROUP`` variables
(``ftlab sweep`` sets them to ``<point> seed=<s>`` and one group per grid point, ``<sweep>/<point>``).
"""

from __future__ import annotations

import inspect
import os
from pathlib import Path
from typing import Any

from lightning.pytorch.cli import SaveConfigCallback

#: hparams shown in a run name whatever their value, and their short prefix ("" = value alone).
KEY_HPARAMS = {
    "rank": "r",
    "alpha": "a",
    "targets": "",
    "placement": "",
    "num_virtual_tokens": "n",
    "reduction_factor": "rf",
    "dropout": "drop",
}
_MISSING = object()


def _text(value: Any) -> str:
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, (list, tuple)):
        return ",".join(_text(v) for v in value)
    return str(value)


def run_name(method: Any) -> str:
    """``<Class>-<key hparams>`` for a method object (one with ``hparams()``), at most 128 characters."""
    hp = method.hparams() if hasattr(method, "hparams") else {}
    defaults = {k: p.default for k, p in inspect.signature(type(method)).parameters.items()}
    parts = [type(method).__name__]
    for key, value in hp.items():
        if value is None or value is False or (not isinstance(value, bool) and value in ("", 0, [], ())):
            continue  # unset or switched off
        if key not in KEY_HPARAMS and value == defaults.get(key, _MISSING):
            continue
        if key in KEY_HPARAMS:
            parts.append(KEY_HPARAMS[key] + _text(value))
        else:
            parts.append(key if value is True else f"{key}={_text(value)}")
    return "-".join(parts)[:128]


def run_seed() -> int | None:
    """The seed of this run: what ``seed_everything`` set (Lightning keeps it in ``PL_GLOBAL_SEED``)."""
    seed = os.environ.get("PL_GLOBAL_SEED")
    return int(seed) if seed and seed.lstrip("-").isdigit() else None


def run_identity(model: Any, datamodule: Any) -> tuple[str, str, list[str]]:
    """(name, group, tags) of a run of ``model`` (an ftlab Objective) on ``datamodule``."""
    method = getattr(model, "method", None)
    objective = type(model).__name__
    backbone = Path(str(getattr(getattr(model, "backbone", None), "name_or_path", "") or "model")).name
    source = getattr(datamodule, "source", None)
    data = Path(str(source)).name if source else type(datamodule).__name__
    method_name = type(method).__name__ if method is not None else "Full"
    name = run_name(method) if method is not None else method_name
    tags = [method_name, objective, backbone[:64]]
    seed = run_seed()
    if seed is not None:
        name = f"{name[:120]}-seed{seed}"
        tags.append(f"seed={seed}")
    return name, f"{objective}-{backbone}-{data}"[:128], tags


def name_wandb_runs(loggers: list, model: Any, datamodule: Any) -> None:
    """Fill name, group and tags of every not-yet-started ``WandbLogger`` the config left unset."""
    from lightning.pytorch.loggers import WandbLogger

    name, group, tags = run_identity(model, datamodule)
    env_tags = [t for t in os.environ.get("WANDB_TAGS", "").split(",") if t]
    for logger in loggers:
        # WandbLogger keeps wandb.init's arguments here until the run starts (on first use).
        init = getattr(logger, "_wandb_init", None)
        if not isinstance(logger, WandbLogger) or init is None or logger._experiment is not None:
            continue
        if init.get("name") is None and not os.environ.get("WANDB_NAME"):
            init["name"] = logger._name = name
        if init.get("group") is None and not os.environ.get("WANDB_RUN_GROUP"):
            init["group"] = group
        if init.get("tags") is None:
            init["tags"] = list(dict.fromkeys(tags + env_tags))


class LogConfig(SaveConfigCallback):
    """Save ``config.yaml`` to the run directory (``ftlab.callbacks.run_dir``, not Lightning's
    ``log_dir``, which is shared by every run when there is no logger) and log the full config to
    every logger, so W&B's config columns are the CLI's own keys
    (``model.init_args.method.init_args.rank``). Use with ``save_to_log_dir=False``."""

    def setup(self, trainer, pl_module, stage: str) -> None:
        from ftlab.callbacks import run_dir

        run_dir(trainer)  # a collective: every rank takes part before rank zero writes in save_config
        super().setup(trainer, pl_module, stage)

    def save_config(self, trainer, pl_module, stage: str) -> None:
        import yaml

        from ftlab.callbacks import run_dir

        directory = run_dir(trainer)  # memoised by setup: no collective here, on rank zero only
        directory.mkdir(parents=True, exist_ok=True)
        self.parser.save(
            self.config,
            str(directory / self.config_filename),
            skip_none=False,
            overwrite=self.overwrite,
            multifile=self.multifile,
        )
        config = yaml.safe_load(self.parser.dump(self.config, skip_none=False)) or {}
        for logger in trainer.loggers:
            logger.log_hyperparams(config)


def check_strategy(trainer: Any) -> None:
    """A strategy/accelerator pair that cannot run fails here, before anything is loaded.

    ``trainer`` is the parsed ``trainer`` section of the config (a jsonargparse Namespace or dict).
    """
    if trainer is None:
        return
    from lightning.fabric.accelerators.cuda import num_cuda_devices  # fork-safe: no CUDA init

    strategy = trainer.get("strategy") or "auto"
    strategy = strategy.get("class_path", "") if hasattr(strategy, "get") else str(strategy)
    short = strategy.rsplit(".", 1)[-1]
    accelerator = trainer.get("accelerator") or "auto"
    if not isinstance(accelerator, str):
        return  # an Accelerator object: Lightning checks it
    accelerator = accelerator.lower()
    gpus = num_cuda_devices()
    if accelerator in ("gpu", "cuda") and gpus == 0:
        raise ValueError(
            f"trainer.accelerator={accelerator} with strategy {short}, but no CUDA GPU is visible; "
            "use --trainer.accelerator cpu (or auto)"
        )
    on_cpu = accelerator == "cpu" or (accelerator == "auto" and gpus == 0)
    if on_cpu and any(s in short.lower() for s in ("fsdp", "deepspeed")):
        raise ValueError(
            f"strategy {short} cannot run on CPU (Lightning's FSDPStrategy and DeepSpeed need CUDA GPUs); "
            "for FSDP on CPU stack configs/strategy/fsdp.yaml (FSDP2 through ModelParallelStrategy, gloo)"
        )
