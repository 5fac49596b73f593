"""Instruction data (Alpaca form): instruction, input, output, optional system and history.

Each record becomes ``prompt = template(instruction, input, system, history)`` and
``response = output + eos``. Labels are ``-100`` on prompt and padding tokens (loss on the
response only) unless ``train_on_prompt``. Validation batches also carry left-padded prompts and
reference outputs, so the objective can generate and score exact match.

With ``packing`` the training samples are packed whole into rows of ``max_length`` tokens with
positions restarting per sample (``ftlab.data.packing``): no padding inside a row and no attention
across samples; ``batch_size`` then counts rows. Validation stays unpacked.
"""

from __future__ import annotations

from typing import Any

from ftlab.data import synthetic
from ftlab.data._base import TokenizedData, pad
from ftlab.data._io import DataError, Record, text
from ftlab.data.templates import TEMPLATES, render
from ftlab.losses.lm import IGNORE, count_targets


class InstructionData(TokenizedData):
    """Alpaca-style instruction tuning data.

    Args:
        source: ``synthetic`` (the embedded task), a json/jsonl/csv/tsv/parquet file, a folder with
            ``train.*`` and ``dev.*``/``validation.*`` files, or a Hugging Face dataset name.
        tokenizer: Backbone whose tokenizer to use (linked from ``model.backbone.name_or_path``).
        template: ``alpaca``, ``alpaca_short`` or ``chat`` (the tokenizer's chat template).
        max_length: Tokens per sample; longer samples are truncated (and counted in the log).
        batch_size: Samples per batch.
        num_workers: DataLoader worker processes.
        train_on_prompt: Also compute the loss on prompt tokens (default: response tokens only).
        fields: Column names in your file for ``instruction``, ``input``, ``output``, ``system``,
            ``history`` (e.g. ``{instruction: question, output: answer}``).
        val_source: A separate validation file (otherwise ``dev``/``validation`` files in a folder
            source, else ``val_fraction`` of the training rows).
        val_fraction: Share of training rows held out when there is no validation file.
        synthetic_train_size: Training records of the synthetic task.
        synthetic_val_size: Validation records of the synthetic task (new words, disjoint seed).
        max_samples: Cap on the rows per split (quick experiments).
        seed: Seed for shuffling, splitting and packing.
        packing: Pack whole training samples into rows of ``max_length`` (padding-free; positions
            restart per sample, no attention across samples); ``batch_size`` then counts rows.
    """

    #: Why this data cannot pack (None: it can).
    cannot_pack: str | None = None

    def __init__(
        self,
        source: str = "synthetic",
        tokenizer: str = "tiny-llama",
        template: str = "alpaca",
        max_length: int = 256,
        batch_size: int = 16,
        num_workers: int = 0,
        train_on_prompt: bool = False,
        fields: dict[str, str] | None = None,
        val_source: str | None = None,
        val_fraction: float = 0.05,
        synthetic_train_size: int = 20000,
        synthetic_val_size: int = 200,
        max_samples: int | None = None,
        seed: int = 0,
        packing: bool = False,
    ):
        super().__init__(
            source,
            tokenizer,
            max_length,
            batch_size,
            num_workers,
            val_source,
            val_fraction,
            max_samples,
            seed,
        )
        if packing and self.cannot_pack:
            raise ValueError(f"{type(self).__name__} cannot pack: {self.cannot_pack}")
        self.packing_samples = packing
        if template not in TEMPLATES:
            raise ValueError(f"unknown template {template!r}; choose one of {TEMPLATES}")
        self.template, self.train_on_prompt = template, train_on_prompt
        self.fields = {k: k for k in ("instruction", "input", "output", "system", "history")} | dict(
            fields or {}
        )
        self.synthetic_train_size, self.synthetic_val_size = synthetic_train_size, synthetic_val_size

    def synthetic_rows(self, split: str) -> list[Record]:
        if split == "train":
            return synthetic.instruction_rows(self.synthetic_train_size, seed=self.seed)
        return synthetic.instruction_rows(self.synthetic_val_size, seed=self.seed + 1_000_003)

    def prompt_and_response(self, row: Record) -> tuple[str, str]:
        f = self.fields
        where = row.get("_where", "?")
        history = row.get(f["history"]) or []
        if not isinstance(history, list) or any(
            not (isinstance(t, list | tuple) and len(t) == 2 and all(isinstance(x, str) for x in t))
            for t in history
        ):
            raise DataError(
                f"{where}: field {f['history']!r} must be a list of [instruction, response] text pairs"
            )
        prompt = render(
            self.template,
            text(row, f["instruction"]),
            text(row, f["input"], required=False),
            text(row, f["system"], required=False),
            [list(t) for t in history],
            self.tokenizer,
        )
        return prompt, text(row, f["output"])

    def encode(self, row: Record) -> dict[str, Any]:
        tok = self.tokenizer
        prompt, response = self.prompt_and_response(row)
        chat = self.template == "chat"  # the chat template already holds the special tokens
        prompt_ids = tok(prompt, add_special_tokens=not chat)["input_ids"]
        response_ids = tok(response, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        ids = prompt_ids + response_ids
        labels = list(ids) if self.train_on_prompt else [IGNORE] * len(prompt_ids) + response_ids
        labels = labels[: self.max_length]
        return {
            "input_ids": ids[: self.max_length],
            "labels": labels,
            "prompt_ids": prompt_ids[-self.max_length :],
            "reference": response,
            "truncated": len(ids) > self.max_length,
            # position 0 predicts nothing: a sample needs a label after it to have a loss
            "no_target": all(t == IGNORE for t in labels[1:]),
        }

    def collate(self, items: list[dict[str, Any]], split: str) -> dict[str, Any]:
        pad_id = self.tokenizer.pad_token_id
        ids = pad([it["input_ids"] for it in items], pad_id)  # (B, T)
        batch = {
            "input_ids": ids,
            "attention_mask": pad([[1] * len(it["input_ids"]) for it in items], 0),
            "labels": pad([it["labels"] for it in items], IGNORE),
        }
        if split == "train":
            batch["packing_efficiency"] = float(batch["attention_mask"].float().mean())  # real / row tokens
        if split != "train":
            batch["prompt_ids"] = pad([it["prompt_ids"] for it in items], pad_id, left=True)  # (B, P)
            batch["prompt_mask"] = pad([[1] * len(it["prompt_ids"]) for it in items], 0, left=True)
            batch["references"] = [it["reference"] for it in items]
        return batch

    def targets_in(self, batch: dict[str, Any]) -> int:
        return count_targets(batch["labels"])
