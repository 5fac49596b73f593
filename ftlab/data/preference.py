"""Preference pairs for reward models: prompt, chosen response, rejected response.

Formats (``format``):

- ``records``: rows with ``prompt``, ``chosen``, ``rejected``; the prompt may also be a
  ShareGPT-style turn list (``[{"from": "human", "value": ...}, ...]``, as in the OASST ranked
  pairs), rendered as a ``\\n\\nHuman: ... \\n\\nAssistant:`` transcript.
- ``hh``: Anthropic hh-rlhf rows: ``chosen`` and ``rejected`` are whole transcripts that share
  the conversation up to the last ``\\n\\nAssistant:``; that shared part is the prompt.
- ``labelstudio``: a Label Studio JSON export of a pairwise-comparison project (tasks with
  ``data.{prompt, answer1, answer2}`` and a ``pairwise`` result ``selected: left|right``).
- ``auto`` tells them apart from the first row's fields.

Cleaning, as in the usual comparison-data recipe: pairs whose chosen equals rejected and pairs with
a side under ``min_words`` words are dropped; each rule's count is logged and kept in ``cleaning``.
A batch stacks the chosen sequences then the rejected ones: ``input_ids`` (2B, T).
"""

from __future__ import annotations

import logging
import os
import random
from typing import Any, Literal

import torch

from ftlab.data._base import TokenizedData, pad
from ftlab.data._io import DataError, Record, require
from ftlab.data.pairs import special_frame
from ftlab.data.synthetic import make_word
from ftlab.data.templates import TEMPLATES
from ftlab.losses.logprobs import IGNORE

log = logging.getLogger("ftlab")

HUMAN, ASSISTANT = "\n\nHuman:", "\n\nAssistant:"
USER_ROLES, BOT_ROLES = (
    ("human", "user", "prompter"),
    ("gpt", "assistant", "model", "chatgpt", "bard", "bing"),
)


def split_hh(chosen: str, rejected: str, where: str) -> tuple[str, str, str]:
    """(prompt, chosen response, rejected response) of an hh-rlhf pair of transcripts."""
    common = os.path.commonprefix([chosen, rejected])
    cut = common.rfind(ASSISTANT)
    if cut < 0:
        raise DataError(
            f"{where}: fields 'chosen' and 'rejected' share no prompt: no common "
            f"conversation ending in {ASSISTANT!r} (is this hh-rlhf data?)"
        )
    prompt = common[: cut + len(ASSISTANT)]
    rest = chosen[len(prompt) :], rejected[len(prompt) :]
    for field, text in zip(("chosen", "rejected"), rest):
        if HUMAN in text:
            raise DataError(
                f"{where}: fields 'chosen' and 'rejected' differ before their last assistant turn; "
                f"{field!r} goes on with another human turn, so they share no prompt"
            )
    return prompt, rest[0].strip(), rest[1].strip()


def render_turns(turns: Any, where: str, field: str = "prompt") -> str:
    """A ShareGPT/OASST turn list as an hh-style transcript ending in ``\\n\\nAssistant:``."""
    if not isinstance(turns, list) or not turns:
        raise DataError(f"{where}: field {field!r} must be a string or a non-empty list of turns")
    parts = []
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict) or "value" not in turn:
            raise DataError(f"{where}: field {field}[{i}] must be an object with 'from' and 'value'")
        role = str(turn.get("from", turn.get("role", ""))).lower()
        if role not in USER_ROLES + BOT_ROLES:
            raise DataError(
                f"{where}: field {field}[{i}].from = {role!r} is not a known role "
                f"({', '.join(USER_ROLES + BOT_ROLES)})"
            )
        parts.append(f"{HUMAN if role in USER_ROLES else ASSISTANT} {str(turn['value']).strip()}")
    return "".join(parts) + ASSISTANT


def labelstudio_pairs(
    tasks: list[Record], prompt: str = "prompt", left: str = "answer1", right: str = "answer2"
) -> tuple[list[Record], dict[str, int]]:
    """Prompt/chosen/rejected records from a Label Studio pairwise export: one per annotation.

    ``left`` is the first answer the annotator saw (``selected: left`` prefers it). Cancelled and
    empty annotations and unlabelled tasks are skipped and counted; an annotation from another
    labelling template (no ``pairwise`` result) is an error.
    """
    out, counts = [], {"tasks": len(tasks), "unlabelled": 0, "cancelled": 0, "empty": 0}
    for task in tasks:
        where = f"{task.get('_where', '?')} (task {task.get('id', '?')})"
        data = task.get("data")
        if not isinstance(data, dict) or "annotations" not in task:
            raise DataError(
                f"{where}: not a Label Studio task (needs 'data' and 'annotations'); "
                "export the project as JSON"
            )
        texts = {}
        for name in (prompt, left, right):
            if data.get(name) is None:
                raise DataError(
                    f"{where}: missing field 'data.{name}' (task data has {sorted(data)}); "
                    "set the prompt/left/right field names of this project"
                )
            texts[name] = str(data[name])
        labelled = False
        for ann in task["annotations"] or []:
            if ann.get("was_cancelled"):
                counts["cancelled"] += 1
                continue
            results = ann.get("result") or []
            if not results:
                counts["empty"] += 1
                continue
            pairwise = [r for r in results if r.get("type") == "pairwise"]
            if not pairwise:
                kinds = sorted({str(r.get("type")) for r in results})
                raise DataError(
                    f"{where}: annotation {ann.get('id', '?')} has no 'pairwise' result (result "
                    f"types: {kinds}); this export is not from a pairwise-comparison template"
                )
            selected = (pairwise[0].get("value") or {}).get("selected")
            if selected not in ("left", "right"):
                raise DataError(
                    f"{where}: field 'result.value.selected' = {selected!r}, expected 'left' or 'right'"
                )
            win, lose = (left, right) if selected == "left" else (right, left)
            out.append(
                {"prompt": texts[prompt], "chosen": texts[win], "rejected": texts[lose], "_where": where}
            )
            labelled = True
        counts["unlabelled"] += not labelled
    return out, counts


def clean_pairs(
    rows: list[Record], min_words: int = 5, drop_identical: bool = True
) -> tuple[list[Record], dict[str, int]]:
    """Drop pairs with chosen == rejected, then pairs with a side under ``min_words`` words."""
    counts = {"rows": len(rows), "identical": 0, "too_short": 0}
    kept = []
    for row in rows:
        if drop_identical and row["chosen"].strip() == row["rejected"].strip():
            counts["identical"] += 1
        elif min(len(row["chosen"].split()), len(row["rejected"].split())) < min_words:
            counts["too_short"] += 1
        else:
            kept.append(row)
    counts["kept"] = len(kept)
    return kept, counts


def response_frame(tokenizer) -> tuple[list[int], list[int]]:
    """The special tokens around ``prompt ⊕ response``: the tokenizer's own (BERT: [CLS] … [SEP]);
    decoders with none end on EOS, where a reward model's ``last`` pooling reads."""
    head, tail = special_frame(tokenizer)
    if not tail and tokenizer.eos_token_id is not None:
        tail = [tokenizer.eos_token_id]
    return head, tail


def encode_response(
    tokenizer, frame: tuple[list[int], list[int]], prompt: str, response: str, max_length: int
) -> tuple[list[int], bool, int]:
    """Token ids of ``head + prompt + " " + response + tail``, the layout every preference and reward
    model in ftlab reads (a reward model scores policy samples in the layout it was trained on).

    Over ``max_length`` the response keeps at least half the room and the prompt is cut from its
    left. Returns ``(ids, truncated, response_start)``: the index of the first response token.
    """
    head, tail = frame
    p = tokenizer(prompt, add_special_tokens=False, verbose=False)["input_ids"]
    r = tokenizer(" " + response, add_special_tokens=False, verbose=False)["input_ids"]
    room = max_length - len(head) - len(tail)
    if room <= 0:
        raise ValueError(
            f"max_length={max_length} leaves no room for tokens between the special tokens {frame}"
        )
    if len(p) + len(r) <= room:
        return head + p + r + tail, False, len(head) + len(p)
    keep_r = min(len(r), max(room // 2, room - len(p)))  # the response matters most: it gets ≥ half
    keep_p = room - keep_r
    return head + (p[-keep_p:] if keep_p else []) + r[:keep_r] + tail, True, len(head) + keep_p


class PreferenceData(TokenizedData):
    """Preference pairs for ``RewardModel`` (and pairwise objectives).

    Args:
        source: A file or folder (json/jsonl/csv/tsv/parquet, ``.gz`` too), an HF dataset name, or
            ``synthetic`` (a tiny task made in code, see ``synthetic_task``).
        tokenizer: Backbone whose tokenizer to use (linked from ``model.backbone.name_or_path``).
        format: ``auto``, ``records``, ``hh`` or ``labelstudio`` (see the module docstring).
        fields: Column names for ``prompt``, ``chosen``, ``rejected``, ``margin`` (optional
            per-pair Bradley–Terry margin), and Label Studio's ``left``/``right`` answers
            (default ``answer1``/``answer2``).
        min_words: Drop pairs where either response has fewer words (0 keeps all).
        drop_identical: Drop pairs whose chosen and rejected responses are equal.
        max_length: Tokens per prompt + response; the prompt is cut from the left first, then
            the response from the right (truncations are counted).
        batch_size: Pairs per batch.
        num_workers: DataLoader worker processes.
        val_source: A separate validation file.
        val_fraction: Share of training pairs held out when there is no validation file.
        max_samples: Cap on the rows per split.
        seed: Seed for shuffling, splitting and the synthetic task.
        synthetic_size: Training pairs of the synthetic task (validation: a tenth, at least 64).
        synthetic_task: ``courtesy`` (courteous answers beat rude ones) or ``instructions``: the
            embedded instruction task, its correct answer over a plausible wrong one (see
            ``ftlab.data.rule_pairs``); set ``min_words: 0``, since its answers are single words.
        template: Prompt template of the ``instructions`` task (as ``InstructionData``'s).
    """

    def __init__(
        self,
        source: str = "synthetic",
        tokenizer: str = "tiny-llama",
        format: Literal["auto", "records", "hh", "labelstudio"] = "auto",
        fields: dict[str, str] | None = None,
        min_words: int = 5,
        drop_identical: bool = True,
        max_length: int = 256,
        batch_size: int = 16,
        num_workers: int = 0,
        val_source: str | None = None,
        val_fraction: float = 0.1,
        max_samples: int | None = None,
        seed: int = 0,
        synthetic_size: int = 1000,
        synthetic_task: Literal["courtesy", "instructions"] = "courtesy",
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
        if synthetic_task not in ("courtesy", "instructions"):
            raise ValueError(f"unknown synthetic_task {synthetic_task!r}; use 'courtesy' or 'instructions'")
        if template not in TEMPLATES:
            raise ValueError(f"unknown template {template!r}; choose one of {TEMPLATES}")
        self.synthetic_task, self.template = synthetic_task, template
        names = ("prompt", "chosen", "rejected", "margin", "left", "right")
        unknown = set(fields or {}) - set(names)
        if unknown:
            raise ValueError(f"unknown keys {sorted(unknown)} in fields; use {list(names)}")
        self.fields = {
            "prompt": "prompt",
            "chosen": "chosen",
            "rejected": "rejected",
            "margin": None,
            "left": "answer1",
            "right": "answer2",
        } | dict(fields or {})
        self.format, self.min_words, self.drop_identical = format, min_words, drop_identical
        self.synthetic_size = synthetic_size
        self.cleaning: dict[str, dict[str, int]] = {}
        self._frame: tuple[list[int], list[int]] | None = None

    # ------------------------------------------------------------------ rows
    def synthetic_rows(self, split: str) -> list[Record]:
        if self.synthetic_task == "instructions":
            from ftlab.data.rule_pairs import instruction_pairs

            n = self.synthetic_size if split == "train" else max(64, self.synthetic_size // 10)
            return instruction_pairs(
                n, self.seed if split == "train" else self.seed + 1_000_003, self.template
            )
        rng = random.Random(f"preference-{self.seed}-{split}")
        kind = ["kind", "helpful", "polite", "clear", "friendly", "careful"]
        rude = ["rude", "useless", "lazy", "wrong", "harsh", "careless"]
        filler = ["answer", "about", "the", "word", "is", "here", "and", "it", "really", "seems"]
        n = self.synthetic_size if split == "train" else max(64, self.synthetic_size // 10)
        rows = []
        for i in range(n):
            word = make_word(rng)
            words = rng.sample(filler, 5)
            good, bad = list(words), list(words)
            pos = rng.randrange(6)
            good.insert(pos, rng.choice(kind))
            bad.insert(pos, rng.choice(rude))
            rows.append(
                {
                    "prompt": f"Tell me about {word}.",
                    "chosen": f"{word}: " + " ".join(good),
                    "rejected": f"{word}: " + " ".join(bad),
                    "_where": f"synthetic row {i}",
                }
            )
        return rows

    def raw_rows(self, split: str) -> list[Record] | None:
        rows = super().raw_rows(split)
        return None if rows is None else self.pairs(rows, split)

    def pairs(self, rows: list[Record], split: str) -> list[Record]:
        """Rows of any pair format -> cleaned ``{prompt, chosen, rejected, margin?, _where}`` pairs."""
        pairs, counts = clean_pairs(self.normalise(rows, split), self.min_words, self.drop_identical)
        self.cleaning[split] = counts
        log.info(
            "PreferenceData: %s: %d pairs; dropped %d with chosen == rejected, %d with a side under %d "
            "words; kept %d",
            split,
            counts["rows"],
            counts["identical"],
            counts["too_short"],
            self.min_words,
            counts["kept"],
        )
        if not pairs and split == "train":
            raise DataError(f"data source {self.source}: no training pairs left after cleaning ({counts})")
        return pairs

    def detect(self, row: Record) -> str:
        if self.format != "auto":
            return self.format
        f = self.fields
        if "annotations" in row and "data" in row:
            return "labelstudio"
        if f["prompt"] not in row and f["chosen"] in row and f["rejected"] in row:
            return "hh"
        return "records"

    def normalise(self, rows: list[Record], split: str) -> list[Record]:
        """Rows of any format -> ``{prompt, chosen, rejected, margin?, _where}`` with non-empty prompts."""
        if not rows:
            return []
        f, fmt = self.fields, self.detect(rows[0])
        if fmt == "labelstudio":
            rows, counts = labelstudio_pairs(rows, f["prompt"], f["left"], f["right"])
            log.info(
                "PreferenceData: %s: Label Studio export: %d tasks, %d unlabelled, %d cancelled "
                "annotations; %d pairs",
                split,
                counts["tasks"],
                counts["unlabelled"],
                counts["cancelled"],
                len(rows),
            )
            f = {**f, "prompt": "prompt", "chosen": "chosen", "rejected": "rejected"}
        out = []
        for row in rows:
            where = row.get("_where", "?")
            if fmt == "hh":
                prompt, chosen, rejected = split_hh(
                    str(require(row, f["chosen"])), str(require(row, f["rejected"])), where
                )
            else:
                prompt = require(row, f["prompt"])
                prompt = prompt if isinstance(prompt, str) else render_turns(prompt, where, f["prompt"])
                chosen, rejected = (
                    str(require(row, f["chosen"])).strip(),
                    str(require(row, f["rejected"])).strip(),
                )
            if not prompt.strip():
                raise DataError(
                    f"{where}: field {f['prompt']!r} is empty: a preference pair needs the prompt "
                    "both responses answer"
                )
            pair = {"prompt": prompt, "chosen": chosen, "rejected": rejected, "_where": where}
            if f["margin"]:
                try:
                    pair["margin"] = float(require(row, f["margin"]))
                except ValueError:
                    raise DataError(
                        f"{where}: field {f['margin']!r} = {row[f['margin']]!r} is not a number"
                    ) from None
            out.append(pair)
        return out

    # ------------------------------------------------------------------ tensors
    def _ids(self, prompt: str, response: str) -> tuple[list[int], bool, int]:
        if self._frame is None:
            self._frame = response_frame(self.tokenizer)
        return encode_response(self.tokenizer, self._frame, prompt, response, self.max_length)

    def encode(self, row: Record) -> dict[str, Any]:
        chosen, cut_c, start_c = self._ids(row["prompt"], row["chosen"])
        rejected, cut_r, start_r = self._ids(row["prompt"], row["rejected"])
        return {
            "chosen": chosen,
            "rejected": rejected,
            "starts": (start_c, start_r),
            "margin": row.get("margin"),
            "truncated": cut_c or cut_r,
        }

    def collate(self, items: list[dict[str, Any]], split: str) -> dict[str, Any]:
        seqs = [it["chosen"] for it in items] + [
            it["rejected"] for it in items
        ]  # chosen first, then rejected
        starts = [it["starts"][0] for it in items] + [it["starts"][1] for it in items]
        batch = {
            "input_ids": pad(seqs, self.tokenizer.pad_token_id),  # (2B, T)
            "attention_mask": pad([[1] * len(s) for s in seqs], 0),  # (2B, T)
            # the response tokens (and the closing special token): what a causal LM's log-prob counts
            "labels": pad([[IGNORE] * k + s[k:] for s, k in zip(seqs, starts)], IGNORE),  # (2B, T)
        }
        if items[0]["margin"] is not None:
            batch["margin"] = torch.tensor([it["margin"] for it in items], dtype=torch.float)  # (B,)
        return batch
