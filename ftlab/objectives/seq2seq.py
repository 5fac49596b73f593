"""Sequence-to-sequence fine-tuning of an encoder-decoder (T5, FLAN-T5, BART): loss on the target.

The encoder reads the source, the decoder predicts the target behind its start token:

    L = − Σ_t log p(y_t | y_<t, x) / |y|        (tokens labelled −100 do not count)

Everything else is ``CausalLM``'s: validation generates greedily from each source and scores exact
match against the reference; ``predict`` writes the generations. Use it with ``Seq2SeqData``.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from ftlab.losses.lm import IGNORE
from ftlab.objectives.causal_lm import CausalLM


class Seq2SeqLM(CausalLM):
    """Encoder-decoder language modelling (arguments as for ``CausalLM``)."""

    export_kind = "seq2seq_lm"

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                labels: torch.Tensor | None = None) -> torch.Tensor:
        return self.model(input_ids=input_ids, attention_mask=attention_mask, labels=labels, use_cache=False).logits

    def _loss(self, batch: dict[str, Any]) -> torch.Tensor:
        logits = self(batch["input_ids"], batch["attention_mask"], batch["labels"])  # (B, T, V): y_t given y_<t
        return F.cross_entropy(logits.flatten(0, 1).float(), batch["labels"].flatten(), ignore_index=IGNORE)

    @torch.no_grad()
    def generate(self, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, max_new_tokens: int, **kwargs) -> list[str]:
        """Greedy targets for the sources (B, S), decoded without special tokens."""
        tok = self.tokenizer
        out = self.model.generate(
            input_ids=prompt_ids, attention_mask=prompt_mask, max_new_tokens=max_new_tokens, do_sample=False,
            pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, **kwargs,
        )  # (B, 1 + new): the decoder's start token, then the target
        return tok.batch_decode(out, skip_special_tokens=True)
