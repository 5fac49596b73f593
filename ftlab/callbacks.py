"""Callbacks every run uses: parameter table, throughput and memory, adapter-only saving.

Metric names are the same for every method (DESIGN.md): ``params/trainable``, ``params/total``,
``params/trainable_pct``, ``perf/tokens_per_s``, ``perf/step_s``, ``perf/peak_mem_gib``.
"""

from __future__ import annotations

import logging
import random
import resource
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_info, rank_zero_only

from ftlab.peft.method import count_parameters
from ftlab.peft.targets import module_patterns

log = logging.getLogger("ftlab")


def parameter_table(module: torch.nn.Module) -> tuple[str, dict[str, float]]:
    """A text table of trainable tensors (layers folded) and the ``params/*`` numbers."""
    groups: dict[str, int] = defaultdict(int)
    for name, p in module.named_parameters():
        if p.requires_grad:
            groups[module_patterns([(name, None)])[0]] += p.numel()
    trainable, total = count_parameters(module)
    width = max([len(k) for k in groups] + [20])
    lines = [f"{'trainable tensor':<{width}}  {'params':>12}", "-" * (width + 14)]
    lines += [f"{k:<{width}}  {v:>12,}" for k, v in groups.items()]
    pct = 100.0 * trainable / max(total, 1)
    lines += [
        "-" * (width + 14),
        f"{'trainable':<{width}}  {trainable:>12,}",
        f"{'total':<{width}}  {total:>12,}",
        f"{'trainable %':<{width}}  {pct:>12.4f}",
    ]
    return "\n".join(lines), {
        "params/trainable": trainable,
        "params/total": total,
        "params/trainable_pct": pct,
    }


class ParameterTable(L.Callback):
    """Print the trainable-parameter table at the start of fit and log ``params/*``."""

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        table, numbers = parameter_table(pl_module)
        rank_zero_info(f"\n{table}\n")
        for logger in trainer.loggers:
            logger.log_hyperparams(numbers)
        trainer.ftlab_params = numbers  # read by the run summary


def peak_memory_gib(device: torch.device) -> float:
    """Peak memory of this process: CUDA allocator peak on GPU, max resident set on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB


class Throughput(L.Callback):
    """Log ``perf/step_s``, ``perf/tokens_per_s`` (non-padding tokens) and ``perf/peak_mem_gib``.

    Args:
        log_every_n_steps: How often to log (the first step is skipped: it includes warm-up).
    """

    def __init__(self, log_every_n_steps: int = 10):
        self.every = log_every_n_steps
        self._t0 = 0.0
        self._tokens = 0
        self._steps = 0
        self.step_times: list[float] = []
        self.tokens_per_s: list[float] = []

    def on_train_batch_start(self, trainer, pl_module, batch: Any, batch_idx: int) -> None:
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize(pl_module.device)
        self._t0 = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch: Any, batch_idx: int) -> None:
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize(pl_module.device)
        dt = time.perf_counter() - self._t0
        mask = batch.get("attention_mask") if isinstance(batch, dict) else None
        tokens = int(mask.sum()) if mask is not None else 0
        tokens *= trainer.world_size
        self._steps += 1
        if self._steps == 1:
            return
        self.step_times.append(dt)
        self.tokens_per_s.append(tokens / dt)
        if self._steps % self.every == 0:
            pl_module.log_dict(
                {
                    "perf/step_s": dt,
                    "perf/tokens_per_s": tokens / dt,
                    "perf/peak_mem_gib": peak_memory_gib(pl_module.device),
                },
                on_step=True,
                on_epoch=False,
            )


def run_dir(trainer: L.Trainer) -> Path:
    """The directory of this run: its config, checkpoints, adapter, summary and predictions.

    It is the log directory of the first versioned logger (CSV or TensorBoard:
    ``<save_dir>/<name>/version_N``); with no such logger, the next free ``version_N`` under
    ``default_root_dir``. Either way a second run into the same root gets a directory of its own and
    never writes over the first. Chosen on rank zero and broadcast, so this is a collective under
    distributed strategies: call it on every rank (e.g. in ``setup``), never inside a
    rank-zero-only function. Memoised on the trainer.
    """
    chosen = getattr(trainer, "_ftlab_run_dir", None)
    if chosen is None:
        path = None
        if trainer.is_global_zero:
            versioned = [lg for lg in trainer.loggers if isinstance(lg, CSVLogger | TensorBoardLogger)]
            path = str(versioned[0].log_dir) if versioned else str(next_version_dir(trainer.default_root_dir))
        chosen = trainer._ftlab_run_dir = Path(trainer.strategy.broadcast(path))
    return chosen


def next_version_dir(root: str | Path) -> Path:
    """``root/version_N`` for the first N above every existing ``version_*`` folder in ``root``."""
    root = Path(root)
    taken = [int(p.name[8:]) for p in root.glob("version_*") if p.name[8:].isdigit()] if root.is_dir() else []
    return root / f"version_{max(taken, default=-1) + 1}"


class RunDirectory(L.Callback):
    """Put every output of a run in its run directory (``run_dir``), checkpoints included.

    A ``ModelCheckpoint`` with no ``dirpath`` writes to ``<run dir>/checkpoints``; without a logger
    Lightning would use ``default_root_dir/checkpoints``, shared by every run there.
    """

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        directory = run_dir(trainer)
        for callback in trainer.checkpoint_callbacks:
            if isinstance(callback, ModelCheckpoint) and callback.dirpath is None:
                callback.dirpath = str(directory / "checkpoints")


class SaveAdapter(L.Callback):
    """Write the adapter-only file (method tensors + heads + base fingerprint) when fit ends.

    Args:
        dirname: Sub-directory of the run directory.
    """

    def __init__(self, dirname: str = "adapter"):
        self.dirname = dirname

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.fast_dev_run or not hasattr(pl_module, "save_adapter"):
            return
        # Every rank takes part (sharded tensors are gathered); rank zero writes.
        path = pl_module.save_adapter(run_dir(trainer) / self.dirname, write=trainer.is_global_zero)
        rank_zero_info(f"adapter saved to {path}")


class SaveBackboneWeights(L.Callback):
    """Write the trained trunk (no LM head: it is tied) as safetensors when fit ends.

    ``configs/pretrain.yaml`` uses it to produce ``ftlab/models/weights/tiny-llama.safetensors``.

    Args:
        path: Output file.
    """

    def __init__(self, path: str):
        self.path = Path(path)

    @rank_zero_only
    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        from safetensors.torch import save_file

        if trainer.fast_dev_run:
            return
        state = {k: v.detach().contiguous().cpu() for k, v in pl_module.model.base_model.state_dict().items()}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        save_file(state, tmp, metadata={"produced_by": "ftlab configs/pretrain.yaml"})
        tmp.replace(self.path)
        rank_zero_info(f"backbone weights saved to {self.path}")


class NonFiniteLossError(RuntimeError):
    """Training produced a NaN or infinite loss or trainable weight."""


def first_non_finite(module: torch.nn.Module) -> str | None:
    """The name of the first trainable parameter holding a NaN or inf (this rank's shard), or None.

    One device sync for all tensors: each ``isfinite().all()`` stays on the device until stacked.
    """
    named = [
        (n, p.to_local() if hasattr(p, "to_local") else p)
        for n, p in module.named_parameters()
        if p.requires_grad
    ]
    named = [(n, p) for n, p in named if p.numel()]
    if not named:
        return None
    finite = torch.stack([torch.isfinite(p.detach()).all() for _, p in named]).cpu()
    return None if bool(finite.all()) else named[int((~finite).nonzero()[0])][0]


class StopOnNonFinite(L.Callback):
    """Stop at the first NaN/inf training loss or trainable weight, before any checkpoint holds it.

    The check runs after every training batch, before checkpoint callbacks (ftlab orders it so),
    and again whenever a checkpoint is about to be written; the adapter file refuses non-finite
    tensors too. The weights are checked, not only the loss: after an optimizer step that
    overflows, the loss of that step is still finite.
    """

    HINT = (
        "Checkpoints already on disk were left as they were. Try a lower learning rate, "
        "gradient clipping (--trainer.gradient_clip_val 1.0) or float32."
    )

    def on_train_batch_end(self, trainer, pl_module, outputs, batch: Any, batch_idx: int) -> None:
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        if loss is not None and not torch.isfinite(loss.detach()).all():
            raise NonFiniteLossError(
                f"train/loss is {loss.item()} at step {trainer.global_step} (batch {batch_idx}); stopped. "
                f"{self.HINT}"
            )
        self._check_weights(trainer, pl_module, f"after step {trainer.global_step}")

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict[str, Any]) -> None:
        self._check_weights(trainer, pl_module, f"when saving a checkpoint at step {trainer.global_step}")

    def _check_weights(self, trainer, pl_module, when: str) -> None:
        bad = first_non_finite(pl_module)
        if trainer.strategy.reduce_boolean_decision(bad is None, all=True):
            return
        raise NonFiniteLossError(
            f"trainable weights hold NaN/inf {when} ({bad or 'on another rank'}); stopped before writing "
            "them. " + self.HINT
        )


class CheckMonitors(L.Callback):
    """A ``ModelCheckpoint`` or ``EarlyStopping`` that monitors a metric nobody logs is an error.

    Lightning skips such a checkpoint with a warning until validation has run and only then fails
    deep in the loop; this check runs at the end of each validation (before those callbacks) and
    names the metrics that do exist. At the end of training, a monitor still missing (validation
    never ran) is a warning.
    """

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.sanity_checking:
            missing = self._missing(trainer)
            if missing:
                raise ValueError(missing)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        missing = self._missing(trainer)
        if missing:
            log.warning("%s; nothing was selected by it", missing)

    @staticmethod
    def _missing(trainer: L.Trainer) -> str | None:
        import difflib

        logged = sorted(trainer.callback_metrics)
        for callback in trainer.callbacks:
            monitor = getattr(callback, "monitor", None)
            if isinstance(monitor, str) and monitor not in logged:
                near = difflib.get_close_matches(monitor, logged, n=1)
                return (
                    f"{type(callback).__name__}(monitor={monitor!r}): no metric of that name is logged"
                    + (f" (did you mean {near[0]!r}?)" if near else "")
                    + f"; logged: {', '.join(logged) or 'none'}"
                )
        return None


class ProgressLog(L.Callback):
    """Plain progress lines for non-interactive output (a cluster job's log file), where a progress
    bar prints nothing: step, loss, throughput and time left, every ``every_s`` seconds.

    Args:
        every_s: Seconds between lines (the first step and the last always get one).
        interactive: Also print when stdout is a terminal (where the progress bar already shows this).
    """

    def __init__(self, every_s: float = 30.0, interactive: bool = False):
        self.every_s, self.interactive = every_s, interactive
        self._start = self._last = 0.0
        self._tokens = self._first_step = 0

    def _active(self, trainer: L.Trainer) -> bool:
        import sys

        return trainer.is_global_zero and (self.interactive or not sys.stdout.isatty())

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._start, self._last, self._tokens, self._first_step = (
            time.perf_counter(),
            0.0,
            0,
            trainer.global_step,
        )

    def on_train_batch_end(self, trainer, pl_module, outputs, batch: Any, batch_idx: int) -> None:
        mask = batch.get("attention_mask") if isinstance(batch, dict) else None
        self._tokens += int(mask.sum()) * trainer.world_size if mask is not None else 0
        now = time.perf_counter()
        step, total = trainer.global_step, trainer.max_steps if trainer.max_steps > 0 else None
        last = total is not None and step >= total
        if not self._active(trainer) or not (self._last == 0.0 or last or now - self._last >= self.every_s):
            return
        self._last = now
        elapsed = now - self._start
        done = max(step - self._first_step, 1)
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        parts = [f"step {step}" + (f"/{total}" if total else ""), f"epoch {trainer.current_epoch}"]
        if loss is not None:
            parts.append(f"loss {float(loss.detach()):.4f}")
        parts.append(f"{done / elapsed:.2f} steps/s")
        if self._tokens:
            parts.append(f"{self._tokens / elapsed:,.0f} tokens/s")
        if total:
            parts.append(f"eta {_clock((total - step) * elapsed / done)}")
        log.info(" | ".join(parts))


def _clock(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class RestoreRNG(L.Callback):
    """Save the random-number generators in every checkpoint and put them back on resume.

    Lightning restores weights, optimizer, scheduler and loop progress, but not the generators
    behind dropout and sampling. The states (torch, CUDA, Python, NumPy; those of rank zero) are
    stored as tensors and ints, so ``weights_only`` loading reads them, and set right before the
    first resumed training step, after anything that runs between restore and that step.
    """

    def __init__(self):
        self._pending: dict[str, Any] | None = None

    def state_dict(self) -> dict[str, Any]:
        import numpy as np

        kind, keys, pos, has_gauss, gauss = np.random.get_state()
        return {
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "python": random.getstate(),
            "numpy": [kind, torch.from_numpy(keys.astype("int64")), pos, has_gauss, gauss],
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._pending = state_dict

    def on_train_batch_start(self, trainer, pl_module, batch: Any, batch_idx: int) -> None:
        if self._pending is None:
            return
        import numpy as np

        state, self._pending = self._pending, None
        torch.set_rng_state(state["torch"])
        if state["cuda"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda"])
        random.setstate(state["python"])
        kind, keys, pos, has_gauss, gauss = state["numpy"]
        np.random.set_state((kind, keys.numpy().astype("uint32"), pos, has_gauss, gauss))


class RunSummary(L.Callback):
    """Write ``summary.json`` to the run directory when fit ends: method, objective, arguments,
    final metrics, parameter counts, median tokens/s and peak memory, so runs compare in one table."""

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.fast_dev_run:
            self._write(run_dir(trainer), trainer, pl_module)

    @rank_zero_only
    def _write(self, directory: Path, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        import json

        perf = next((c for c in trainer.callbacks if isinstance(c, Throughput)), None)
        median = lambda xs: sorted(xs)[len(xs) // 2] if xs else None  # noqa: E731
        hp = dict(pl_module.hparams)
        summary = {
            "objective": type(pl_module).__name__,
            "method": hp.get("method", {}).get("class"),
            "hparams": hp,
            "metrics": {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1},
            **getattr(trainer, "ftlab_params", {}),
            "steps": trainer.global_step,
            "perf/tokens_per_s": median(perf.tokens_per_s) if perf else None,
            "perf/step_s": median(perf.step_times) if perf else None,
            "perf/peak_mem_gib": peak_memory_gib(pl_module.device),
        }
        path = directory / "summary.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(summary, indent=2, default=str))
        rank_zero_info(f"run summary written to {path}")


class WritePredictions(L.Callback):
    """``ftlab predict`` writes ``predictions.jsonl`` (one line per sample) to the run directory."""

    def __init__(self):
        self.rows: list[Any] = []

    def on_predict_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        if isinstance(outputs, torch.Tensor):
            outputs = outputs.tolist()
        self.rows.extend(outputs if isinstance(outputs, list) else [outputs])

    def on_predict_end(self, trainer, pl_module) -> None:
        self._write(run_dir(trainer))

    @rank_zero_only
    def _write(self, directory: Path) -> None:
        import json

        path = directory / "predictions.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(json.dumps(r, default=str) + "\n" for r in self.rows))
        rank_zero_info(f"{len(self.rows)} predictions written to {path}")
        self.rows = []
