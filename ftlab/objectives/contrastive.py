"""Contrastive fine-tuning of embedding models (Sentence-BERT style bi-encoders).

``e = normalize(pool(trunk(x)))``; the similarity of two texts is ``cos(e1, e2)``. Losses:

- ``infonce``: multiple-negatives ranking with in-batch (and hard) negatives, temperature τ fixed
  or learned (``τ = exp(-s)`` with ``s`` trained, as CLIP's logit scale).
- ``cosent`` / ``cosine``: graded pairs (STS 0-5): CoSENT ranking, or cosine regression on scores
  scaled to [0, 1].
- ``auto``: ``graded_loss`` (cosent or cosine) for batches with scores, ``infonce`` otherwise; with
  two sources trained together (``PairData(mix_source=...)``, a batch of each per step) the
  training loss is ``L_main + mix_weight · L_mix``.

Under DDP the loss is that of the global batch (``gather_across_processes``, on by default): every
process gathers all processes' embeddings, so each anchor's in-batch negatives are the other
``world_size · B - 1`` positives (and every hard negative), as one process with the whole batch
would have. Gradients flow back to each process's own embeddings (see ``gather_across_processes``).

Metrics: ``val/spearman`` (Spearman's ρ between the cosine and the gold score, in [-1, 1]; STS
papers print it ×100) for graded pairs; ``val/recall@k`` for retrieval pairs: each anchor ranks every positive
(and hard negative) of the whole split, and a hit is its own positive in the top k; for triplets also
``val/triplet_accuracy``, the share of anchors closer to their positive than to their own hard
negative (e.g. entailment above contradiction for an NLI premise).
"""

from __future__ import annotations

import math
from typing import Any, Literal

import torch
import torch.distributed as dist
import torch.nn.functional as F
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import nn
from torchmetrics.regression import SpearmanCorrCoef

from ftlab.losses.contrastive import cosent_loss, cosine_matrix, cosine_regression_loss, info_nce
from ftlab.models.backbone import Backbone
from ftlab.models.pooling import Pooling, default_pooling, pool
from ftlab.objectives._base import Objective
from ftlab.peft.method import Method

Loss = Literal["auto", "infonce", "cosent", "cosine"]


class Temperature(nn.Module):
    """A learnable softmax temperature, stored as the log of its inverse (CLIP's logit scale)."""

    def __init__(self, init: float, min_temperature: float = 0.01):
        super().__init__()
        self.log_scale = nn.Parameter(torch.tensor(math.log(1.0 / init)))
        self.max_log_scale = math.log(1.0 / min_temperature)

    def forward(self) -> torch.Tensor:
        return torch.exp(-self.log_scale.clamp(max=self.max_log_scale))  # 0-dim τ


class _GatherRows(torch.autograd.Function):
    """All processes' (N_r, ...) rows concatenated in rank order; the gradient goes back to each
    process's own rows.

    torch's autograd-aware gathers (``torch.distributed.nn.functional.all_gather``, the functional
    collectives) are deprecated one after the other in torch 2.x; this one uses only the stable
    ``all_gather`` and ``all_reduce``, works on gloo and NCCL, and takes rows of unequal counts.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, counts: list[int]) -> torch.Tensor:
        ctx.counts, ctx.rank = counts, dist.get_rank()
        padded = x.new_zeros((max(counts), *x.shape[1:]))  # all_gather needs equal shapes
        padded[: x.size(0)] = x
        parts = [torch.empty_like(padded) for _ in counts]
        dist.all_gather(parts, padded.contiguous())
        return torch.cat([part[:n] for part, n in zip(parts, counts)])  # (Σ N_r, ...)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        # Every process's loss used every row: this process's rows get the sum of all those gradients.
        grad = grad.contiguous().clone()
        dist.all_reduce(grad)
        start = sum(ctx.counts[: ctx.rank])
        return grad[start : start + ctx.counts[ctx.rank]], None


def world_size() -> int:
    """Processes in the default group (1 when torch.distributed is not initialised)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def gather_across_processes(x: torch.Tensor) -> torch.Tensor:
    """(N_r, ...) rows of each process -> (Σ N_r, ...) rows of all, in rank order, on every process.

    Differentiable: the backward sums each row's gradient over the processes (each computed a loss
    of the whole gathered batch) and hands each process its own rows. Under DDP, which averages
    parameter gradients over the W processes, a loss ``L`` of the global batch computed on every
    process then trains with exactly the gradient of ``L`` on one process holding the whole batch:
    ``(1/W) Σ_r W ∂L/∂e_r · ∂e_r/∂θ = ∂L/∂θ``. Without torch.distributed, ``x`` itself.
    """
    if world_size() == 1:
        return x
    count = torch.tensor([x.size(0)], device=x.device)
    counts = [torch.zeros_like(count) for _ in range(world_size())]
    dist.all_gather(counts, count)
    return _GatherRows.apply(x, [int(c) for c in counts])


def triplet_accuracy(anchor: torch.Tensor, positive: torch.Tensor, negative: torch.Tensor) -> torch.Tensor:
    """Share of (B, H) anchors whose cosine with their positive beats that with their own negative."""
    pos = F.cosine_similarity(anchor.float(), positive.float(), dim=-1)  # (B,)
    return (pos > F.cosine_similarity(anchor.float(), negative.float(), dim=-1)).float().mean()


def recall_at_k(
    queries: torch.Tensor,
    candidates: torch.Tensor,
    target_ids: torch.Tensor,
    candidate_ids: torch.Tensor,
    k: int,
) -> torch.Tensor:
    """Share of (Q, H) queries whose target text is among their top-k (C, H) candidates by cosine.

    ``target_ids`` (Q,) and ``candidate_ids`` (C,) identify texts: any copy of the target counts.
    """
    top = cosine_matrix(queries, candidates).topk(min(k, candidates.size(0)), dim=1).indices  # (Q, k)
    return (candidate_ids[top] == target_ids[:, None]).any(dim=1).float().mean()


class Contrastive(Objective):
    """Embedding model trained on pairs, triplets or graded pairs, with any method.

    Args:
        backbone: What to load; its trunk (no LM head) is the embedding model.
        method: How to adapt the trunk. Default: Full.
        optimizer: Optimizer class and arguments (trainable parameters only).
        scheduler: Learning-rate scheduler, e.g. ``ftlab.optim.WarmupLinear``.
        adapter: Start from a saved adapter (and learned temperature).
        max_length: Sequence length (linked from the data).
        loss: ``infonce``, ``cosent``, ``cosine``, or ``auto`` (``graded_loss`` for batches with
            scores, ``infonce`` otherwise: what mixed sources need).
        pooling: ``auto`` (last token for decoders, mean for encoders), ``mean``, ``cls``, ``last``.
        normalize: L2-normalise the embeddings that ``forward`` returns (cosines are unaffected).
        temperature: InfoNCE's τ (initial value when learned).
        learn_temperature: Train τ (it is then saved with the adapter).
        symmetric: InfoNCE in both directions (anchor→positive and positive→anchor).
        graded_loss: What ``loss: auto`` uses for graded pairs: ``cosent`` or ``cosine``.
        cosent_scale: CoSENT's λ.
        recall_k: The k of ``val/recall@k`` for retrieval pairs.
        mix_weight: Weight of the second source's loss in the sum (``PairData(mix_source=...)``):
            InfoNCE's gradients dwarf cosine regression's, so a weight well below 1 may balance them.
        gather_across_processes: Under DDP, train on the loss of the global batch: every process's
            embeddings join the in-batch negatives of all (gradients reach each process's own).
            Off: each process's loss sees only its local batch.
    """

    def __init__(
        self,
        backbone: Backbone | None = None,
        method: Method | None = None,
        optimizer: OptimizerCallable = torch.optim.AdamW,
        scheduler: LRSchedulerCallable | None = None,
        adapter: str | None = None,
        max_length: int | None = None,
        loss: Loss = "auto",
        pooling: Pooling = "auto",
        normalize: bool = True,
        temperature: float = 0.05,
        learn_temperature: bool = False,
        symmetric: bool = False,
        graded_loss: Literal["cosent", "cosine"] = "cosent",
        cosent_scale: float = 20.0,
        recall_k: list[int] | None = None,
        mix_weight: float = 1.0,
        gather_across_processes: bool = True,
    ):
        super().__init__(backbone, method, optimizer, scheduler, adapter, max_length)
        if loss not in ("auto", "infonce", "cosent", "cosine"):
            raise ValueError(f"unknown loss {loss!r}; use auto, infonce, cosent or cosine")
        if graded_loss not in ("cosent", "cosine"):
            raise ValueError(f"unknown graded_loss {graded_loss!r}; use cosent or cosine")
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.loss_name, self.graded_loss, self.pooling, self.normalize = loss, graded_loss, pooling, normalize
        self.symmetric, self.cosent_scale = symmetric, cosent_scale
        self.recall_k = list(recall_k or [1, 5])
        if mix_weight < 0:
            raise ValueError(f"mix_weight must be >= 0, got {mix_weight}")
        self.mix_weight, self.gather = mix_weight, gather_across_processes
        self.fixed_temperature = temperature
        self.temperature = Temperature(temperature) if learn_temperature else None
        self.heads = ("temperature",) if learn_temperature else ()
        self._retrieval: dict[str, list[torch.Tensor]] = {}

    def build(self):
        trunk = self.backbone.load("encoder")
        if self.pooling == "auto":
            self.pooling = default_pooling(trunk)
        self.metrics = nn.ModuleDict({"val": SpearmanCorrCoef(), "test": SpearmanCorrCoef()})
        return trunk

    # ------------------------------------------------------------------ embeddings
    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """(N, T) token ids and mask -> (N, H) embeddings."""
        hidden = self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state  # (N, T, H)
        emb = pool(hidden, attention_mask, self.pooling)  # (N, H)
        return F.normalize(emb, dim=-1) if self.normalize else emb

    def _embed(self, batch: dict[str, Any]) -> list[torch.Tensor]:
        """One forward for every text of the batch, split back into roles: [(B, H), (B, H)(, (B, H))]."""
        emb = self(batch["input_ids"], batch["attention_mask"])  # (R·B, H)
        return list(emb.chunk(len(batch["roles"])))

    def tau(self) -> float | torch.Tensor:
        return self.temperature() if self.temperature is not None else self.fixed_temperature

    def compute_loss(self, batch: dict[str, Any], embs: list[torch.Tensor]) -> torch.Tensor:
        """The loss of a batch's role-split embeddings (of the global batch when training under DDP)."""
        name = self.loss_name
        if name == "auto":
            name = self.graded_loss if "score" in batch else "infonce"
        if name != "infonce" and "score" not in batch:
            raise ValueError(
                f"loss {name!r} needs graded pairs (a score per pair); this data has none: use infonce"
            )
        ids, score = list(batch["text_ids"].chunk(len(embs))), batch.get("score")
        if self.gather and self.training and world_size() > 1:
            # Role by role, so that rows stay aligned: anchors of ranks 0..W-1, positives of ranks 0..W-1, ...
            embs = [gather_across_processes(e) for e in embs]  # [(W·B, H)] * R
            ids = [gather_across_processes(i) for i in ids]
            score = gather_across_processes(score) if score is not None else None
        if name == "infonce":
            neg = embs[2] if len(embs) > 2 else None
            return info_nce(
                embs[0],
                embs[1],
                neg,
                self.tau(),
                self.symmetric,
                ids[0],
                ids[1],
                ids[2] if len(ids) > 2 else None,
            )
        cos = F.cosine_similarity(embs[0].float(), embs[1].float(), dim=-1)  # (B,)
        if name == "cosent":
            return cosent_loss(cos, score, self.cosent_scale)
        return cosine_regression_loss(cos, score)

    # ------------------------------------------------------------------ steps
    def batch_size_of(self, batch: dict[str, Any]) -> int:
        return int(batch["input_ids"].size(0)) // len(batch["roles"])

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        # Two sources trained together (PairData's mix_source) come as {"main": batch, "mix": batch}:
        # each gets its own loss (a scored batch and a triplet batch under loss=auto), summed.
        parts = {"": batch} if "input_ids" in batch else batch
        loss = torch.zeros((), device=self.device)
        for key, part in parts.items():
            part_loss = self.compute_loss(part, self._embed(part))
            loss = loss + (self.mix_weight if key == "mix" else 1.0) * part_loss
            if key:
                self.log(f"train/loss_{key}", part_loss, batch_size=self.batch_size_of(part))
        n = self.batch_size_of(next(iter(parts.values())))
        self.log("train/loss", loss, prog_bar=True, batch_size=n)
        if self.temperature is not None:
            self.log("train/temperature", self.tau(), batch_size=n)
        return loss

    def _eval(self, batch: dict[str, Any], stage: str) -> None:
        embs = self._embed(batch)
        n = self.batch_size_of(batch)
        if "score" in batch or self.loss_name in ("auto", "infonce"):
            # A model trained on graded pairs can still be scored on triplets, with no loss to log.
            self.log(f"{stage}/loss", self.compute_loss(batch, embs), batch_size=n, sync_dist=True)
        if "score" in batch:
            cos = F.cosine_similarity(embs[0].float(), embs[1].float(), dim=-1)  # (B,)
            metric = self.metrics[stage]
            metric.update(cos, batch["score"].float())
            self.log(f"{stage}/spearman", metric, prog_bar=True, batch_size=n)  # computed at epoch end
        else:
            keep = self._retrieval.setdefault(stage, [])
            keep.append(torch.cat([e.detach().float() for e in embs]).cpu())
            keep.append(batch["text_ids"].cpu())
            keep.append(torch.tensor(len(embs)))

    def _log_recall(self, stage: str) -> None:
        """Recall@k over the whole split (not per batch): each anchor against every candidate; and
        for triplets, the share of anchors closer to their positive than to their hard negative."""
        parts = self._retrieval.pop(stage, [])
        if not parts:
            return
        anchors, cands, c_ids, pos_ids = [], [], [], []
        for emb, ids, roles in zip(parts[0::3], parts[1::3], parts[2::3]):
            embs, idss = emb.chunk(int(roles)), ids.chunk(int(roles))
            anchors.append(embs[0])
            pos_ids.append(idss[1])
            cands += embs[1:]
            c_ids += idss[1:]
        queries, candidates = torch.cat(anchors), torch.cat(cands)
        target, cand_ids = torch.cat(pos_ids), torch.cat(c_ids)
        if int(parts[2]) == 3:
            pos, neg = torch.cat(cands[0::2]), torch.cat(cands[1::2])  # (Q, H) each
            self.log(f"{stage}/triplet_accuracy", triplet_accuracy(queries, pos, neg))
        # Each text once: a positive shared by several anchors must not crowd the top k with copies.
        cand_ids, first = _unique_first(cand_ids)
        candidates = candidates[first]
        for k in self.recall_k:
            self.log(
                f"{stage}/recall@{k}", recall_at_k(queries, candidates, target, cand_ids, k), prog_bar=k == 1
            )

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._eval(batch, "val")

    def on_validation_epoch_end(self) -> None:
        self._log_recall("val")

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._eval(batch, "test")

    def on_test_epoch_end(self) -> None:
        self._log_recall("test")

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        return self(batch["input_ids"], batch["attention_mask"])


def _unique_first(ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The distinct values of (N,) ``ids`` and the index of the first occurrence of each."""
    uniq, inverse = torch.unique(ids, return_inverse=True)
    first = torch.full((uniq.numel(),), ids.numel(), dtype=torch.long)
    first.scatter_reduce_(0, inverse, torch.arange(ids.numel()), reduce="amin")
    return uniq, first
