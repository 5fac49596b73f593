"""Callbacks that ``ftlab sweep`` adds to every run: per-example validation results, and the budget.

``ExampleResults`` writes ``val_examples.npz`` to the run directory after each validation (the last one
wins): whatever per-example tensors the objective's ``validation_step`` returns, as a dict of (B,)
tensors, in validation order. An objective opts in by returning them; ``SequenceClassifier`` returns
``accuracy`` (1 if the prediction is right), ``loss`` (per-example cross-entropy), ``pred`` and ``label``,
so that the mean of ``accuracy`` is ``val/accuracy`` and paired tests can compare runs example by example.
The file also holds ``digest``, a hash of the validation inputs (non-padding token ids of every
example, in order): runs with different digests did not see the same examples and are not paired.

``Budget`` counts the samples and non-padding tokens each run trains on (``budget.json``), can set the
run length from a budget in tokens or epochs instead of steps, and makes sure the final step validates
(so that the summary's metrics are the end of the run's, whatever ``val_check_interval`` is).

A token budget resolves to the fewest optimizer steps whose batches, in the run's own training order
(its seed's), hold at least that many non-padding tokens: for packed data every full step has
``batch_size x max_length`` tokens; for padded data the count is the attention mask's sum. An epoch
budget is ``ceil(epochs x steps per epoch)``. Both are resolved when fit starts, before the learning-rate
schedule reads the run length.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable, Iterable
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_only, rank_zero_warn

from ftlab.callbacks import run_dir


def _mask_and_ids(batch: Any) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Attention masks and input ids of a batch (keys ending in ``attention_mask`` / ``input_ids``)."""
    if not isinstance(batch, dict):
        return [], []
    masks = [v for k, v in batch.items() if k.endswith("attention_mask") and isinstance(v, torch.Tensor)]
    ids = [v for k, v in batch.items() if k.endswith("input_ids") and isinstance(v, torch.Tensor)]
    return masks, ids


def batch_size_and_tokens(batch: Any) -> tuple[int, int]:
    """(samples, non-padding tokens) of a collated batch: the attention masks' sum (all of ``input_ids``
    when there is no mask). Samples are the first dimension of the first ``input_ids``."""
    masks, ids = _mask_and_ids(batch)
    samples = int(ids[0].size(0)) if ids else (int(masks[0].size(0)) if masks else 0)
    tokens = sum(int(m.sum()) for m in masks) if masks else sum(int(t.numel()) for t in ids)
    return samples, tokens


def steps_for_tokens(
    epoch_steps: Callable[[int], Iterable[int]], budget: int, max_epochs: int = 10_000
) -> tuple[int, int]:
    """The fewest steps whose tokens reach ``budget``, walking epoch after epoch.

    ``epoch_steps(e)`` gives the tokens of each optimizer step of epoch ``e`` in training order.
    Returns ``(steps, tokens those steps hold)``.
    """
    steps = tokens = 0
    for epoch in range(max_epochs):
        seen = 0
        for step_tokens in epoch_steps(epoch):
            steps, tokens, seen = steps + 1, tokens + step_tokens, seen + step_tokens
            if tokens >= budget:
                return steps, tokens
        if seen == 0:
            raise ValueError(
                f"a token budget needs training batches with tokens (input_ids); epoch {epoch} has none"
            )
    raise ValueError(f"a budget of {budget} tokens is more than {max_epochs} epochs of this data")


class Budget(L.Callback):
    """Count what the run trains on, set its length from a token or epoch budget, validate at its end.

    Args:
        tokens: Train on at least this many non-padding tokens (sets ``max_steps``); null: keep the config's.
        epochs: Train for this many epochs, fractions allowed (sets ``max_steps``); null: keep the config's.
    """

    def __init__(self, tokens: int | None = None, epochs: float | None = None):
        if tokens is not None and epochs is not None:
            raise ValueError("Budget: give tokens or epochs, not both")
        if (tokens is not None and tokens <= 0) or (epochs is not None and epochs <= 0):
            raise ValueError(f"Budget: the budget must be positive, got tokens={tokens}, epochs={epochs}")
        self.tokens, self.epochs = tokens, epochs
        self.seen = {"samples": 0, "tokens": 0}
        self.resolved: dict[str, Any] = {}

    # ------------------------------------------------------------------ resolving
    def resolve(self, datamodule: Any, accumulate: int = 1, limit_batches: float | None = None) -> int:
        """Optimizer steps this budget gives on ``datamodule``'s training data (set up beforehand)."""
        loader = datamodule.train_dataloader()

        def batches(epoch: int) -> list[int]:
            if hasattr(loader.sampler, "set_epoch"):
                loader.sampler.set_epoch(epoch)
            out = [batch_size_and_tokens(b)[1] for b in loader]
            if limit_batches is not None:
                out = out[
                    : (
                        min(len(out), limit_batches)
                        if isinstance(limit_batches, int)
                        else int(len(out) * limit_batches)
                    )
                ]
            return out

        if self.epochs is not None:
            per_epoch = math.ceil(len(batches(0)) / accumulate)
            return max(1, math.ceil(self.epochs * per_epoch))

        def epoch_steps(epoch: int) -> list[int]:
            toks = batches(epoch)
            return [sum(toks[i : i + accumulate]) for i in range(0, len(toks), accumulate)]

        steps, _ = steps_for_tokens(epoch_steps, int(self.tokens))
        return steps

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit" or (self.tokens is None and self.epochs is None):
            return
        if trainer.datamodule is None:
            raise ValueError("Budget: a token or epoch budget needs a LightningDataModule to count the data")
        if self.tokens is not None and trainer.world_size > 1:
            raise ValueError(
                "Budget: a token budget is resolved in one process; with several, give "
                "trainer.max_steps or an epoch budget"
            )
        steps = self.resolve(trainer.datamodule, trainer.accumulate_grad_batches, trainer.limit_train_batches)
        trainer.fit_loop.epoch_loop.max_steps = steps
        trainer.fit_loop.max_epochs = -1
        kind = f"{self.tokens} tokens" if self.tokens is not None else f"{self.epochs} epochs"
        self.resolved = {"budget": kind, "max_steps": steps}
        rank_zero_info(f"budget of {kind}: {steps} steps")

    # ------------------------------------------------------------------ counting
    def on_train_batch_end(self, trainer, pl_module, outputs, batch: Any, batch_idx: int) -> None:
        samples, tokens = batch_size_and_tokens(batch)
        self.seen["samples"] += samples * trainer.world_size
        self.seen["tokens"] += tokens * trainer.world_size
        # Lightning validates when a run is asked to stop: the last step's metrics are then the run's own.
        if trainer.max_steps > 0 and trainer.global_step >= trainer.max_steps:
            trainer.should_stop = True

    def state_dict(self) -> dict[str, Any]:
        return dict(self.seen)  # a resumed run goes on counting

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.seen.update({k: int(v) for k, v in state_dict.items() if k in self.seen})

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.fast_dev_run:
            self._write(run_dir(trainer), trainer.global_step)

    @rank_zero_only
    def _write(self, directory, steps: int) -> None:
        data = {"steps": steps, **self.seen, **self.resolved}
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "budget.json").write_text(json.dumps(data, indent=2))


class ExampleResults(L.Callback):
    """Write the objective's per-example validation results to ``val_examples.npz`` (see the module)."""

    def __init__(self):
        self._parts: dict[str, list[torch.Tensor]] = {}
        self._digest = hashlib.sha1()
        self._warned = False

    def on_validation_epoch_start(self, trainer, pl_module) -> None:
        self._parts, self._digest = {}, hashlib.sha1()

    def on_validation_batch_end(
        self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0
    ) -> None:
        if trainer.sanity_checking or dataloader_idx != 0 or not isinstance(outputs, dict):
            return
        if trainer.world_size > 1:
            if not self._warned:
                rank_zero_warn("ExampleResults: per-example results are written by single-process runs only")
                self._warned = True
            return
        for key, value in outputs.items():
            if isinstance(value, torch.Tensor) and value.dim() == 1:
                self._parts.setdefault(key, []).append(value.detach().float().cpu())
        masks, ids = _mask_and_ids(batch)
        if ids:
            mask = masks[0] if masks else torch.ones_like(ids[0])
            for row, keep in zip(ids[0].cpu(), mask.cpu().bool()):
                self._digest.update(row[keep].to(torch.int64).numpy().tobytes() + b"|")

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        if trainer.sanity_checking or not self._parts or trainer.fast_dev_run:
            return
        import numpy as np

        arrays = {k: torch.cat(v).numpy() for k, v in self._parts.items()}
        sizes = {k: len(v) for k, v in arrays.items()}
        if len(set(sizes.values())) != 1:
            raise ValueError(f"validation_step returned per-example results of different lengths: {sizes}")
        directory = run_dir(trainer)
        directory.mkdir(parents=True, exist_ok=True)
        np.savez(
            directory / "val_examples.npz",
            digest=np.array(self._digest.hexdigest()),
            step=np.array(trainer.global_step),
            **arrays,
        )
