"""Instruction data for encoder-decoders (T5, BART): the prompt is the source, the response the target.

Same records, fields and templates as ``InstructionData``; what changes is the shape of a sample:

    source = template(instruction, input, system, history)      -> the encoder's input_ids
    target = output + eos                                       -> labels (the decoder learns all of it)

The decoder's inputs are the labels shifted right behind the model's ``decoder_start_token_id``,
which the model builds itself. Validation batches also carry the references for exact match.
"""

from __future__ import annotations

from typing import Any

from ftlab.data._base import pad
from ftlab.data.instruction import InstructionData
from ftlab.losses.lm import IGNORE


class Seq2SeqData(InstructionData):
    """Alpaca-style instructions as source -> target pairs (arguments as for ``InstructionData``;
    ``max_length`` caps the source and the target each, and ``train_on_prompt`` does not apply)."""

    cannot_pack = (
        "T5 and BART take no position_ids, so transformers cannot mask packed samples apart; "
        "set packing false"
    )

    def encode(self, row: dict[str, Any]) -> dict[str, Any]:
        tok = self.tokenizer
        prompt, response = self.prompt_and_response(row)
        source = tok(prompt, add_special_tokens=self.template != "chat")["input_ids"]
        target = tok(response, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        return {
            "input_ids": source[: self.max_length],
            "labels": target[: self.max_length],
            "reference": response,
            "truncated": len(source) > self.max_length or len(target) > self.max_length,
        }

    def collate(self, items: list[dict[str, Any]], split: str) -> dict[str, Any]:
        batch = {
            "input_ids": pad([it["input_ids"] for it in items], self.tokenizer.pad_token_id),  # (B, S)
            "attention_mask": pad([[1] * len(it["input_ids"]) for it in items], 0),
            "labels": pad([it["labels"] for it in items], IGNORE),  # (B, T)
        }
        if split != "train":  # an encoder reads right-padded prompts as they are
            batch["prompt_ids"], batch["prompt_mask"] = batch["input_ids"], batch["attention_mask"]
            batch["references"] = [it["reference"] for it in items]
        return batch

    def targets_in(self, batch: dict[str, Any]) -> int:
        return int((batch["labels"] != IGNORE).sum())  # the decoder learns every target token
