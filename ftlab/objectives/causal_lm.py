"""Supervised / instruction fine-tuning of a causal LM: next-token loss on the response tokens.

Loss: the mean next-token cross-entropy over labelled positions (labels ``-100`` on prompt and
padding: the data decides). With ``chunked_loss`` (the default) it is computed from the final hidden
states a chunk of positions at a time (``ftlab.losses.chunked``), so (B, T, V) logits never exist;
otherwise ``masked_lm_loss`` on the model's logits. The two agree to float rounding.

Packed rows (``packing: true`` in the data) hold several whole samples each: the batch carries
``position_ids`` that restart at 0 per sample and no attention mask is passed, so transformers builds
the block-causal mask itself (SDPA/eager/flex) or runs flash-attention's varlen kernel (the rows are
then flattened into one, as ``DataCollatorWithFlattening`` does). Each sample's first label is
``-100``, so no sample predicts the next one's first token.

Normalisation: a training step's loss is the sum over every labelled token of the step — all
micro-batches of a gradient-accumulation window, all ranks — divided by their number (the loader
counts the window's tokens ahead), so packed and padded batches, one process or several, with or
without accumulation, give the same gradient for the same samples.

Validation also generates greedily from each (unpacked) prompt and scores exact match against the
reference, when the batches carry references (``InstructionData`` does).
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torchmetrics import MeanMetric

from ftlab.losses.chunked import chunked_lm_loss
from ftlab.losses.lm import count_targets, masked_lm_loss
from ftlab.models.backbone import Backbone
from ftlab.models.lm_head import OutputHead, hidden_states
from ftlab.objectives._base import Objective
from ftlab.peft.method import Method

log = logging.getLogger("ftlab")

#: Attention implementations that mask packed rows per sample from ``position_ids`` (transformers' own).
PACKABLE_ATTENTION = ("sdpa", "eager", "flex_attention")


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
        chunked_loss: Compute the loss from the hidden states a chunk of positions at a time, never
            holding (B, T, V) logits (Liger's fused kernel on CUDA when liger-kernel is installed).
            Models whose output head is not a plain linear layer fall back to the plain loss.
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
        chunked_loss: bool = True,
    ):
        super().__init__(backbone, method, optimizer, scheduler, adapter, max_length)
        self.exact_match, self.max_new_tokens, self.chunked_loss = exact_match, max_new_tokens, chunked_loss
        self.val_exact_match = MeanMetric()
        self._head_checked = False

    export_kind = "causal_lm"

    def build(self):
        return self.backbone.load(self.export_kind)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits (B, T, V); given ``labels`` (B, T), the summed next-token loss over labelled positions
        instead (a scalar). Packed rows pass ``position_ids`` (B, T) and no ``attention_mask``."""
        inputs = self._inputs(input_ids, attention_mask, position_ids)
        shape = input_ids.shape
        head = OutputHead.of(self.model) if self.chunked_loss and labels is not None else None
        if head is not None:
            length = inputs["input_ids"].size(1)
            hidden, last = hidden_states(self.model, length, **inputs)  # (b, t, H), (b, 1, V)
            if self._head_matches(head, hidden, last):
                hidden = hidden.reshape(*shape, -1)  # (B, T, H): packed rows flattened for flash-attention
                return chunked_lm_loss(
                    hidden,
                    head.weight,
                    labels,
                    head.bias,
                    scale=head.scale,
                    softcap=head.softcap,
                    reduction="sum",
                    liger=True,
                )
        logits = self.model(**inputs, use_cache=False).logits.reshape(*shape, -1)  # (B, T, V)
        return logits if labels is None else masked_lm_loss(logits, labels, reduction="sum")

    def _head_matches(self, head: OutputHead, hidden: torch.Tensor, last: torch.Tensor) -> bool:
        """Once per run: does the head as ftlab reads it give the model's own logits? Else warn and turn
        ``chunked_loss`` off (the caller computes the plain loss)."""
        if not self._head_checked:
            self._head_checked = True
            if not head.matches(hidden[:, -1], last[:, -1]):
                log.warning(
                    "chunked_loss: %s's output head does more than a linear map ftlab knows; "
                    "using the plain loss",
                    type(self.model).__name__,
                )
                self.chunked_loss = False
        return self.chunked_loss

    def _inputs(self, input_ids, attention_mask, position_ids) -> dict[str, torch.Tensor]:
        if position_ids is None:
            return {"input_ids": input_ids, "attention_mask": attention_mask}
        implementation = getattr(self.model.config, "_attn_implementation", None) or "sdpa"
        if self.model._forward_pre_hooks:  # prompt tuning puts tokens in front and shifts every position
            raise ValueError(
                "packed rows (data packing: true) need a model that reads position_ids as "
                f"given; {type(self.method).__name__} changes the input in front: set data "
                "packing false"
            )
        if implementation.startswith("flash"):  # varlen kernels read sample boundaries from one flat row
            return {"input_ids": input_ids.reshape(1, -1), "position_ids": position_ids.reshape(1, -1)}
        if implementation not in PACKABLE_ATTENTION:
            raise ValueError(
                f"packed rows (data packing: true) need attention that transformers masks per "
                f"sample ({', '.join(PACKABLE_ATTENTION)}, flash); {implementation!r} (set by "
                f"{type(self.method).__name__}) is not: set data packing false"
            )
        return {"input_ids": input_ids, "position_ids": position_ids}

    def _loss_sum(self, batch: dict[str, Any]) -> torch.Tensor:
        return self(
            batch["input_ids"],
            None if "position_ids" in batch else batch["attention_mask"],
            batch.get("position_ids"),
            labels=batch["labels"],
        )

    def _count(self, batch: dict[str, Any]) -> int:
        """Labelled positions the summed loss runs over."""
        return count_targets(batch["labels"])

    def _loss(self, batch: dict[str, Any]) -> torch.Tensor:
        """The mean loss per labelled token of the batch."""
        return self._loss_sum(batch) / max(1, self._count(batch))

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        total = self._loss_sum(batch)
        n = self._count(batch)
        size = self.batch_size_of(batch)
        self.log("train/loss", total.detach() / max(1, n), prog_bar=True, batch_size=size)
        if "packing_efficiency" in batch:  # real tokens / row tokens
            self.log("train/packing_efficiency", batch["packing_efficiency"], batch_size=size)
        return self.step_loss(total, n, batch)

    def step_loss(self, total: torch.Tensor, n: int, batch: dict[str, Any]) -> torch.Tensor:
        """What to backpropagate so that the step's gradient is that of the mean over every labelled token
        of the step: ``total`` (this micro-batch's summed loss) over the tokens of the whole accumulation
        window on all ranks, times what Lightning (÷ accumulate_grad_batches) and DDP/FSDP (÷ world
        size) divide by. Batches without the loader's ``targets_in_step`` count: ``total / n``."""
        if "targets_in_step" not in batch or self._trainer is None:
            return total / max(1, n)
        window = torch.tensor(float(batch["targets_in_step"]), device=total.device)
        window = self.trainer.strategy.reduce(window, reduce_op="sum")  # every rank's tokens of the step
        return total * (self.trainer.accumulate_grad_batches * self.trainer.world_size) / window.clamp_min(1)

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        n = self.batch_size_of(batch)
        self.log("val/loss", self._loss(batch), prog_bar=True, batch_size=n, sync_dist=True)
        if self.exact_match and "references" in batch:
            texts = self.generate(
                batch["prompt_ids"],
                batch["prompt_mask"],
                _budget(self.tokenizer, batch["references"], self.max_new_tokens),
            )
            hits = torch.tensor(
                [t.strip() == r.strip() for t, r in zip(texts, batch["references"])], dtype=torch.float
            )
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
    def generate(
        self, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, max_new_tokens: int, **kwargs
    ) -> list[str]:
        """Greedy continuations of left-padded prompts (B, P), decoded without special tokens."""
        tok = self.tokenizer
        out = self.model.generate(
            input_ids=prompt_ids,
            attention_mask=prompt_mask,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=tok.pad_token_id,
            eos_token_id=tok.eos_token_id,
            **kwargs,
        )  # (B, P + new)
        return tok.batch_decode(out[:, prompt_ids.size(1) :], skip_special_tokens=True)


def _budget(tokenizer, references: list[str], cap: int) -> int:
    """Enough new tokens for the longest reference plus its eos, at most ``cap``."""
    longest = max(len(tokenizer(r, add_special_tokens=False)["input_ids"]) for r in references)
    return min(cap, longest + 2)
