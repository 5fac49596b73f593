"""What every ftlab DataModule shares: sources, splits, tokenizer, truncation counts, loaders."""

from __future__ import annotations

import logging
import math
import random
from collections.abc import Callable, Iterator
from functools import partial
from itertools import islice
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch.utils.data import DataLoader, DistributedSampler

from ftlab.data._io import DataError, Record, load_source, nonempty

log = logging.getLogger("ftlab")


def load_tokenizer(name_or_path: str):
    """The tokenizer of a backbone preset, HF name or path (the CLI links it from the model)."""
    from ftlab.models.backbone import Backbone

    return Backbone(name_or_path=name_or_path).tokenizer()


class TokenizedData(L.LightningDataModule):
    """Rows from ``source`` -> ``encode`` per row -> ``collate`` per batch.

    Subclasses implement ``synthetic_rows(split)``, ``encode(row)`` (returning a dict with a
    ``truncated`` flag) and ``collate(items, split)``. Those that set ``packing_samples`` have their
    training samples packed whole into rows of ``max_length`` (``ftlab.data.packing``): the training
    split is then a list of rows, each one sample of the sampler. Those whose batches feed a per-token
    loss implement ``targets_in(batch)``: the training loader then tells every batch how many such
    tokens its whole gradient-accumulation window holds (``targets_in_step``).
    """

    name = "data"
    packing_samples = False

    def __init__(
        self,
        source: str,
        tokenizer: str,
        max_length: int,
        batch_size: int,
        num_workers: int,
        val_source: str | None,
        val_fraction: float,
        max_samples: int | None,
        seed: int,
    ):
        super().__init__()
        if max_length <= 0:
            raise ValueError(f"max_length must be > 0, got {max_length}")
        if batch_size <= 0:
            raise ValueError(f"batch_size must be > 0, got {batch_size}")
        self.source, self.tokenizer_name, self.max_length = source, tokenizer, max_length
        self.batch_size, self.num_workers = batch_size, num_workers
        self.val_source, self.val_fraction, self.max_samples, self.seed = (
            val_source,
            val_fraction,
            max_samples,
            seed,
        )
        self._tokenizer = None
        self.splits: dict[str, list[dict[str, Any]]] = {}

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            self._tokenizer = load_tokenizer(self.tokenizer_name)
        return self._tokenizer

    # ------------------------------------------------------------------ rows
    def synthetic_rows(self, split: str) -> list[Record]:
        raise DataError(f"{type(self).__name__} has no synthetic source")

    def raw_rows(self, split: str) -> list[Record] | None:
        """Rows of ``split`` before encoding: from the source, a separate val file, or a split-off."""
        if self.source == "synthetic":
            return self.synthetic_rows(split)
        if split == "validation" and self.val_source:
            return nonempty(load_source(self.val_source, "train"), f"validation source {self.val_source}")
        rows = load_source(self.source, split)
        if split == "train":
            rows = nonempty(rows, f"data source {self.source}")
        return rows

    def split_rows(self) -> dict[str, list[Record]]:
        """Raw ``train`` and ``validation`` rows as training will see them, before encoding: the
        validation file, or the ``val_fraction`` split off by ``seed`` (then ``max_samples``)."""
        train = self.raw_rows("train")
        val = self.raw_rows("validation")
        if val is None and self.val_fraction > 0:
            order = list(range(len(train)))
            random.Random(self.seed).shuffle(order)
            n_val = max(1, int(len(train) * self.val_fraction))
            val = [train[i] for i in order[:n_val]]
            train = [train[i] for i in order[n_val:]]
        splits = {"train": train, "validation": val or []}
        if self.max_samples:
            splits = {k: v[: self.max_samples] for k, v in splits.items()}
        return splits

    # ------------------------------------------------------------------ lightning hooks
    def setup(self, stage: str | None = None) -> None:
        if not self.splits:
            for split, rows in self.split_rows().items():
                self.splits[split] = self._encode_all(rows, split)
            if self.packing_samples and self.splits["train"]:
                self.splits["train"] = self._pack(self.splits["train"])
        # The test split is read only to test: a folder's test file may hold no labels (GLUE).
        if stage == "test" and "test" not in self.splits and self.source != "synthetic":
            rows = self.raw_rows("test") or []
            self.splits["test"] = self._encode_all(
                rows[: self.max_samples] if self.max_samples else rows, "test"
            )

    def _encode_all(self, rows: list[Record], split: str) -> list[dict[str, Any]]:
        """Encode every row; count truncated ones, and leave out (counted) those that truncation
        left with nothing to learn from (``encode`` sets ``no_target``), e.g. a prompt that fills
        ``max_length`` so no response token remains."""
        items = [self.encode(row) for row in rows]
        truncated = sum(bool(it.pop("truncated", False)) for it in items)
        if truncated:
            log.warning(
                "%s: %d of %d %s samples truncated to max_length=%d",
                type(self).__name__,
                truncated,
                len(items),
                split,
                self.max_length,
            )
        kept = [it for it in items if not it.pop("no_target", False)]
        if len(kept) < len(items):
            message = (
                f"{type(self).__name__}: {len(items) - len(kept)} of {len(items)} {split} samples have no "
                f"target token within max_length={self.max_length} (the prompt fills it)"
            )
            if not kept:
                raise DataError(f"{message}: nothing is left to train on; raise data.init_args.max_length")
            log.warning("%s; they are left out", message)
        return kept

    def _pack(self, items: list[dict[str, Any]]) -> list[list[dict[str, Any]]]:
        from ftlab.data.packing import efficiency, pack

        rows = pack(items, self.max_length, self.seed)
        log.info(
            "%s: %d training samples packed into %d rows of up to %d tokens (%.1f%% real tokens)",
            type(self).__name__,
            len(items),
            len(rows),
            self.max_length,
            100 * efficiency(rows, self.max_length),
        )
        return rows

    def encode(self, row: Record) -> dict[str, Any]:
        raise NotImplementedError

    def targets_in(self, batch: dict[str, Any]) -> int | None:
        """Tokens of ``batch`` that the objective's loss averages over (None: not a per-token loss)."""
        return None

    def collate(self, items: list[dict[str, Any]], split: str) -> dict[str, Any]:
        raise NotImplementedError

    def _loader(self, split: str, shuffle: bool) -> DataLoader:
        items = self.splits.get(split)
        if not items:
            raise DataError(f"{type(self).__name__}: the {split} split is empty (source {self.source})")
        collate = partial(self.collate, split=split)
        if split == "train" and self.packing_samples:
            from ftlab.data.packing import collate_packed

            collate = partial(collate_packed, pad_id=self.tokenizer.pad_token_id)
        common = dict(batch_size=self.batch_size, num_workers=self.num_workers, collate_fn=collate)
        if not shuffle:
            return DataLoader(items, **common)
        sampler = ResumableSampler(items, self.seed, self.trainer, self.batch_size)
        generator = torch.Generator().manual_seed(self.seed)
        loader = ResumableLoader(items, sampler=sampler, generator=generator, **common)
        loader.count_targets, loader.trainer = self.targets_in, self.trainer
        return loader

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("validation", shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", shuffle=False)

    def predict_dataloader(self) -> DataLoader:
        return self._loader("validation", shuffle=False)


class ResumableSampler(DistributedSampler):
    """The training order: a permutation per epoch, seeded by ``seed + epoch``, split across ranks.

    One process with global batch B and N processes with batch B/N see the same samples in each
    step (rank r takes every N-th index of the same permutation). Lightning sets the epoch at each
    epoch start and leaves a ``DistributedSampler`` in place under DDP/FSDP. Since the order
    depends only on seed, epoch and position, a fit resumed from a mid-epoch checkpoint goes on
    where the saved run was: the batches the restored loop progress counts as trained in this
    epoch are skipped, once.
    """

    def __init__(self, items: list, seed: int, trainer: L.Trainer | None = None, batch_size: int = 1):
        spread = (trainer.distributed_sampler_kwargs if trainer is not None else None) or {}
        super().__init__(
            items,
            num_replicas=spread.get("num_replicas", 1),
            rank=spread.get("rank", 0),
            shuffle=True,
            seed=seed,
        )
        self.skip = 0  # samples of this rank to leave out, once
        fit_loop = trainer.fit_loop if trainer is not None else None
        if fit_loop is not None and fit_loop.restarting:
            done = fit_loop.epoch_loop.batch_progress.current.processed
            if done < _batches_per_epoch(
                math.ceil(self.num_samples / batch_size), trainer.limit_train_batches
            ):
                self.skip = done * batch_size  # else the checkpoint closed its epoch: the next starts afresh

    def __iter__(self):
        order = list(super().__iter__())
        skip, self.skip = self.skip, 0
        return iter(order[skip:])

    def batches_skipped(self, batch_size: int) -> int:
        """Batches the next ``__iter__`` leaves out (those a resumed run already trained on)."""
        return self.skip // batch_size


class ResumableLoader(DataLoader):
    """A training loader over a ``ResumableSampler``. Its state is what the data order depends on;
    Lightning saves it in checkpoints, and a resume that changed any of it gets a warning.

    With ``count_targets`` (the data's per-token count) and a trainer, it reads each gradient-
    accumulation window ahead and puts the window's count in every batch as ``targets_in_step``, so
    the objective can divide the step's summed loss by all of its tokens, not average per-batch means
    (which weighs a token of a short batch more than one of a long batch).
    """

    count_targets: Callable[[dict[str, Any]], int | None] | None = None
    trainer: L.Trainer | None = None

    def __iter__(self):
        if self.count_targets is None or self.trainer is None:
            return super().__iter__()
        return self._windows(self.sampler.batches_skipped(self.batch_size), super().__iter__())

    def _windows(self, first: int, batches: Iterator[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        # Lightning steps the optimizer after batches whose 1-based index in the epoch is a multiple
        # of accumulate_grad_batches, and after the epoch's last batch (num_training_batches).
        k, last = self.trainer.accumulate_grad_batches, self.trainer.num_training_batches
        index = first  # index in the epoch of the next batch
        while True:
            end = (index // k + 1) * k
            if last != float("inf"):
                end = min(end, int(last))
            window = list(islice(batches, max(1, end - index)))
            if not window:
                return
            counts = [self.count_targets(b) for b in window]
            if any(c is None for c in counts):
                yield from window
            else:
                for batch in window:
                    batch["targets_in_step"] = sum(counts)
                    yield batch
            index += len(window)

    def state_dict(self) -> dict[str, int]:
        return {
            "seed": self.sampler.seed,
            "batch_size": self.batch_size,
            "world_size": self.sampler.num_replicas,
            "samples": len(self.dataset),
        }

    def load_state_dict(self, state_dict: dict[str, int]) -> None:
        changed = [
            f"{k} {state_dict[k]} -> {v}" for k, v in self.state_dict().items() if state_dict.get(k, v) != v
        ]
        if changed:
            rank_zero_warn(
                f"resuming with a different {', '.join(changed)} than the checkpoint: the training data "
                "order and position differ from the saved run's"
            )


def _batches_per_epoch(batches: int, limit: int | float | None) -> int:
    """Batches Lightning runs per epoch under ``Trainer(limit_train_batches=limit)``."""
    if limit is None:
        return batches
    return min(batches, limit) if isinstance(limit, int) else int(batches * limit)


def pad(seqs: list[list[int]], value: int, left: bool = False) -> torch.Tensor:
    """(B, T) tensor of ``seqs`` padded with ``value`` to the longest, on the right or the left."""
    width = max(len(s) for s in seqs)
    rows = [([value] * (width - len(s)) + s) if left else (s + [value] * (width - len(s))) for s in seqs]
    return torch.tensor(rows, dtype=torch.long)
