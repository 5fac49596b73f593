"""Prompts alone, for on-policy training (PPO): the policy writes the responses itself.

A row is one prompt. Sources: a ``.txt`` file (one prompt per line; blank lines are skipped), a
json/jsonl/csv/tsv/parquet file or folder with a ``prompt`` field (or a ShareGPT-style turn list,
rendered as in ``PreferenceData``), an HF dataset name, or ``synthetic``: the beginnings of the
sentences ``tiny-llama`` was pretrained on ("tomel backwards is", "The sum of 12 and 7 is"),
which it knows how to continue; or, with ``synthetic_task: instructions``, the embedded
instruction task's prompts ("### Instruction: Reverse the letters of the word. ...").

A batch holds the prompts *left*-padded, ready for generation: ``input_ids`` (B, P),
``attention_mask`` (B, P), and the texts in ``prompts``. A prompt over ``max_length`` tokens keeps
its beginning-of-text token and its *last* tokens (the response continues from the end); such
cuts are counted in the log.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any, Literal

from ftlab.data import synthetic
from ftlab.data._base import TokenizedData, pad
from ftlab.data._io import DataError, Record, require
from ftlab.data.pairs import special_frame
from ftlab.data.preference import render_turns
from ftlab.data.templates import TEMPLATES, render


def synthetic_prompts(n: int, seed: int = 0) -> list[str]:
    """``n`` sentence beginnings in the phrasings of ftlab's pretraining corpus, cut before the answer."""
    rng = random.Random(f"prompts-{seed}")
    tasks = list(synthetic.TASKS)
    out = []
    for i in range(n):
        task = tasks[i % len(tasks)]
        x, _ = synthetic.example(task, rng)
        a, _, b = x.partition(" + ")
        phrasing = rng.choice(synthetic._SENTENCES[task])
        out.append(phrasing[: phrasing.index("{y}")].rstrip(" ").format(x=x, a=a, b=b))
    return out


class PromptData(TokenizedData):
    """Prompts for PPO (and for sampling from any causal LM).

    Args:
        source: ``synthetic``, a ``.txt`` file (a prompt per line), a json/jsonl/csv/tsv/parquet file
            or folder, or an HF dataset name.
        tokenizer: Backbone whose tokenizer to use (linked from ``model.backbone.name_or_path``).
        field: Column holding the prompt (a string, or a list of ShareGPT turns).
        max_length: Tokens per prompt; longer prompts keep their last tokens (counted in the log).
            The objective checks that ``max_length`` plus its generation budget fits the model.
        batch_size: Prompts per batch (per PPO iteration).
        num_workers: DataLoader worker processes.
        val_source: A separate validation file.
        val_fraction: Share of prompts held out when there is no validation file.
        synthetic_size: Training prompts of the synthetic source (validation: a tenth, at least 32).
        max_samples: Cap on the prompts per split.
        seed: Seed for shuffling, splitting and the synthetic prompts.
        synthetic_task: ``continuation`` (sentence beginnings) or ``instructions``: the embedded
            instruction task's prompts in ``template``, validation on the words ``InstructionData``
            validates on (scored by ``ftlab.rewards.instruction_following``).
        template: Prompt template of the ``instructions`` task.
    """

    def __init__(
        self,
        source: str = "synthetic",
        tokenizer: str = "tiny-llama",
        field: str = "prompt",
        max_length: int = 64,
        batch_size: int = 16,
        num_workers: int = 0,
        val_source: str | None = None,
        val_fraction: float = 0.05,
        synthetic_size: int = 2000,
        max_samples: int | None = None,
        seed: int = 0,
        synthetic_task: Literal["continuation", "instructions"] = "continuation",
        template: str = "alpaca_short",
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
        if synthetic_task not in ("continuation", "instructions"):
            raise ValueError(
                f"unknown synthetic_task {synthetic_task!r}; use 'continuation' or 'instructions'"
            )
        if template not in TEMPLATES:
            raise ValueError(f"unknown template {template!r}; choose one of {TEMPLATES}")
        self.field, self.synthetic_size = field, synthetic_size
        self.synthetic_task, self.template = synthetic_task, template
        self._head: list[int] | None = None

    # ------------------------------------------------------------------ rows
    def synthetic_rows(self, split: str) -> list[Record]:
        n = self.synthetic_size if split == "train" else max(32, self.synthetic_size // 10)
        seed = self.seed if split == "train" else self.seed + 1_000_003
        if self.synthetic_task == "instructions":
            prompts = [
                render(self.template, r["instruction"], r["input"])
                for r in synthetic.instruction_rows(n, seed)
            ]
        else:
            prompts = synthetic_prompts(n, seed)
        return [{self.field: p, "_where": f"synthetic prompt {i}"} for i, p in enumerate(prompts)]

    def raw_rows(self, split: str) -> list[Record] | None:
        if split == "validation" and self.val_source and _is_txt(self.val_source):
            rows = _read_lines(self.val_source, self.field)
        elif (
            self.source != "synthetic"
            and _is_txt(self.source)
            and not (split == "validation" and self.val_source)
        ):
            rows = (
                _read_lines(self.source, self.field) if split == "train" else None
            )  # a file is the train split
        else:
            rows = super().raw_rows(split)
        if rows is None:
            return None
        for row in rows:
            prompt = require(row, self.field)
            prompt = (
                render_turns(prompt, row.get("_where", "?"), self.field)
                if isinstance(prompt, list)
                else str(prompt)
            )
            row[self.field] = prompt
            if not prompt.strip():
                raise DataError(
                    f"{row.get('_where', '?')}: field {self.field!r} is empty: every row needs a prompt"
                )
        if not rows and split == "train":
            raise DataError(f"PromptData: no prompts in {self.source}: the prompt set is empty")
        return rows

    # ------------------------------------------------------------------ tensors
    def encode(self, row: Record) -> dict[str, Any]:
        tok = self.tokenizer
        prompt = row[self.field]
        if self._head is None:
            self._head = special_frame(tok)[0]  # e.g. <s>: kept when the prompt is cut from the left
        head = self._head
        ids = head + tok(prompt, add_special_tokens=False, verbose=False)["input_ids"]
        truncated = len(ids) > self.max_length
        if truncated:
            keep = self.max_length - len(head)
            if keep <= 0:
                raise ValueError(
                    f"PromptData: max_length={self.max_length} leaves no room for a prompt token"
                )
            ids = head + ids[-keep:]
        return {"input_ids": ids, "prompt": prompt, "truncated": truncated}

    def collate(self, items: list[dict[str, Any]], split: str) -> dict[str, Any]:
        seqs = [it["input_ids"] for it in items]
        return {
            "input_ids": pad(seqs, self.tokenizer.pad_token_id, left=True),  # (B, P)
            "attention_mask": pad([[1] * len(s) for s in seqs], 0, left=True),  # (B, P)
            "prompts": [it["prompt"] for it in items],
        }


def _is_txt(path: str) -> bool:
    return path.endswith((".txt", ".txt.gz"))


def _read_lines(path: str, field: str) -> list[Record]:
    import gzip

    file = Path(path).expanduser()
    if not file.exists():
        raise DataError(f"data file {file} does not exist")
    opener = gzip.open if file.suffix == ".gz" else open
    with opener(file, "rt", encoding="utf-8") as f:
        return [
            {field: line.rstrip("\n"), "_where": f"{file}:{i}"} for i, line in enumerate(f, 1) if line.strip()
        ]
