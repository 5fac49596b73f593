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
from lightning.pytorch.utilities import rank_zero_info, rank_zero_only

from ftlab.peft._method import count_parameters
from ftlab.peft._targets import module_patterns

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
    lines += ["-" * (width + 14), f"{'trainable':<{width}}  {trainable:>12,}", f"{'total':<{width}}  {total:>12,}",
              f"{'trainable %':<{width}}  {pct:>12.4f}"]
    return "\n".join(lines), {"params/trainable": trainable, "params/total": total, "params/trainable_pct": pct}


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
                {"perf/step_s": dt, "perf/tokens_per_s": tokens / dt,
                 "perf/peak_mem_gib": peak_memory_gib(pl_module.device)},
                on_step=True, on_epoch=False,
            )


def run_dir(trainer: L.Trainer) -> Path:
    """The directory of this run: the first logger's log_dir, else ``default_root_dir``.

    ``trainer.log_dir`` is a collective under distributed strategies: call this on every rank
    (e.g. in ``setup``), never inside a rank-zero-only function.
    """
    return Path(trainer.log_dir or trainer.default_root_dir)


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
    """Training produced a NaN or infinite loss."""


class StopOnNonFinite(L.Callback):
    """Stop at the first NaN/inf training loss, before anything is saved from the broken weights.

    Checkpoints and the adapter are written at validation and fit end; raising here skips both,
    so the last good checkpoint on disk is never overwritten.
    """

    def on_train_batch_end(self, trainer, pl_module, outputs, batch: Any, batch_idx: int) -> None:
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        if loss is not None and not torch.isfinite(loss.detach()).all():
            raise NonFiniteLossError(
                f"train/loss is {loss.item()} at step {trainer.global_step} (batch {batch_idx}); stopped. "
                "Checkpoints already on disk were left as they were. Try a lower learning rate, "
                "gradient clipping (--trainer.gradient_clip_val 1.0) or float32."
            )


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
