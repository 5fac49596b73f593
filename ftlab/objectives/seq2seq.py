"""Sequence-to-sequence fine-tuning of an encoder-decoder (T5, FLAN-T5, BART): loss on the target.

The encoder reads the source, the decoder predicts the target behind its start token:

    L = − Σ_t log p(y_t | y_<t, x) / |y|        (tokens labelled −100 do not count)

As in ``CausalLM``, ``chunked_loss`` computes it from the decoder's final states a chunk of target
positions at a time. Everything else is ``CausalLM``'s too: validation generates greedily from each
source and scores exact match against the reference; ``predict`` writes the generations. Use it
with ``Seq2SeqData``.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from ftlab.losses.chunked import chunked_lm_loss
from ftlab.losses.lm import IGNORE
from ftlab.models.lm_head import OutputHead, hidden_states
from ftlab.objectives.causal_lm import CausalLM


class Seq2SeqLM(CausalLM):
    """Encoder-decoder language modelling (arguments as for ``CausalLM``)."""

    export_kind = "seq2seq_lm"

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        loss: bool = False,
    ) -> torch.Tensor:
        """Logits (B, T, V) of the targets ``labels`` (B, T) given the sources (B, S); with ``loss``, the
        summed cross-entropy over target tokens instead (a scalar), chunked when ``chunked_loss``."""
        head = OutputHead.of(self.model) if self.chunked_loss and loss else None
        if head is not None:
            decoder_ids = self.model.prepare_decoder_input_ids_from_labels(labels=labels)  # (B, T): y shifted
            hidden, last = hidden_states(
                self.model,
                labels.size(1),
                input_ids=input_ids,
                attention_mask=attention_mask,
                decoder_input_ids=decoder_ids,
            )
            if self._head_matches(head, hidden, last):  # T5 rescales before its head, BART adds a bias after
                return chunked_lm_loss(
                    hidden,
                    head.weight,
                    labels,
                    head.bias,
                    scale=head.scale,
                    softcap=head.softcap,
                    reduction="sum",
                    shift=False,
                    liger=True,
                )
        logits = self.model(
            input_ids=input_ids, attention_mask=attention_mask, labels=labels, use_cache=False
        ).logits
        if not loss:
            return logits
        return F.cross_entropy(
            logits.flatten(0, 1).float(), labels.flatten(), ignore_index=IGNORE, reduction="sum"
        )

    def _loss_sum(self, batch: dict[str, Any]) -> torch.Tensor:
        return self(batch["input_ids"], batch["attention_mask"], batch["labels"], loss=True)

    def _count(self, batch: dict[str, Any]) -> int:
        return int((batch["labels"] != IGNORE).sum())  # the decoder learns every target token

    @torch.no_grad()
    def generate(
        self, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, max_new_tokens: int, **kwargs
    ) -> list[str]:
        """Greedy targets for the sources (B, S), decoded without special tokens."""
        tok = self.tokenizer
        out = self.model.generate(
            input_ids=prompt_ids,
            attention_mask=prompt_mask,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=tok.pad_token_id,
            eos_token_id=tok.eos_token_id,
            **kwargs,
        )  # (B, 1 + new): the decoder's start token, then the target
        return tok.batch_decode(out, skip_special_tokens=True)
