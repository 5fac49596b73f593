"""Supervised / instruction fine-tuning of a causal LM: next-token loss on the response tokens.

Loss: ``masked_lm_loss(logits, labels)``, labels ``-100`` on prompt and padding (the data decides).
Validation also generates greedily from each prompt and scores exact match against the reference,
when the batches carry references (``InstructionData`` does).
"""

from __future__ import annotations

from typing import Any

import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torchmetrics import MeanMetric

from ftlab.losses.lm import masked_lm_loss
from ftlab.models.backbone import Backbone
from ftlab.objectives._base import Objective
from ftlab.peft.method import Method


class CausalLM(Objective):
    """Causal language modelling (SFT, instruction tuning, pretraining).

    Args:
        backbone: What to load (``name_or_path``, dtype, gradient checkpointing...).
        method: How to adapt it (``ftlab.peft.LoRA``, ``ftlab.peft.Full``...). Default: Full.
        optimizer: Optimizer class and arguments (gets the trainable parameters only).
        scheduler: Learning-rate scheduler, e.g. ``ftlab.optim.WarmupLinear``; null for a constant lr.
        adapter: Start from a saved adapter (ftlab or PEFT format) instead of a fresh method.
        max_length: Sequence length (linked from the data); checked against the model's positions.
        exact_match: Generate on validation batches with references and log ``val/exact_match``.
        max_new_tokens: Generation budget for validation and predict.
    """

    def __init__(
        self,
        backbone: Backbone | None = None,
        method: Method | None = None,
        optimizer: OptimizerCallable = torch.optim.AdamW,
        scheduler: LRSchedulerCallable | None = None,
        adapter: str | None = None,
        max_length: int | None = None,
        exact_match: bool = True,
        max_new_tokens: int = 64,
    ):
        super().__init__(backbone, method, optimizer, scheduler, adapter, max_length)
        self.exact_match, self.max_new_tokens = exact_match, max_new_tokens
        self.val_exact_match = MeanMetric()

    export_kind = "causal_lm"

    def build(self):
        return self.backbone.load(self.export_kind)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits  # (B, T, V)

    def _loss(self, batch: dict[str, Any]) -> torch.Tensor:
        return masked_lm_loss(self(batch["input_ids"], batch["attention_mask"]), batch["labels"])

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        loss = self._loss(batch)
        self.log("train/loss", loss, prog_bar=True, batch_size=self.batch_size_of(batch))
        return loss

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        n = self.batch_size_of(batch)
        self.log("val/loss", self._loss(batch), prog_bar=True, batch_size=n, sync_dist=True)
        if self.exact_match and "references" in batch:
            texts = self.generate(batch["prompt_ids"], batch["prompt_mask"], _budget(self.tokenizer, batch["references"], self.max_new_tokens))
            hits = torch.tensor([t.strip() == r.strip() for t, r in zip(texts, batch["references"])], dtype=torch.float)
            self.val_exact_match.update(hits)
            self.log("val/exact_match", self.val_exact_match, prog_bar=True, batch_size=n)

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self.log("test/loss", self._loss(batch), batch_size=self.batch_size_of(batch), sync_dist=True)

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> list[dict[str, str]]:
        texts = self.generate(batch["prompt_ids"], batch["prompt_mask"], self.max_new_tokens)
        prompts = self.tokenizer.batch_decode(batch["prompt_ids"], skip_special_tokens=True)
        refs = batch.get("references") or [None] * len(texts)
        return [{"prompt": p, "generated": t, "reference": r} for p, t, r in zip(prompts, texts, refs)]

    @torch.no_grad()
    def generate(self, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, max_new_tokens: int, **kwargs) -> list[str]:
        """Greedy continuations of left-padded prompts (B, P), decoded without special tokens."""
        tok = self.tokenizer
        out = self.model.generate(
            input_ids=prompt_ids, attention_mask=prompt_mask, max_new_tokens=max_new_tokens,
            do_sample=False, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, **kwargs,
        )  # (B, P + new)
        return tok.batch_decode(out[:, prompt_ids.size(1):], skip_special_tokens=True)


def _budget(tokenizer, references: list[str], cap: int) -> int:
    """Enough new tokens for the longest reference plus its eos, at most ``cap``."""
    longest = max(len(tokenizer(r, add_special_tokens=False)["input_ids"]) for r in references)
    return min(cap, longest + 2)
