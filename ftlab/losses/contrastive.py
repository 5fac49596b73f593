"""Contrastive and score-regression losses for embedding models.

- ``info_nce``: multiple-negatives ranking / InfoNCE (van den Oord et al., 2018; Henderson et al.,
  2017). Anchor ``i`` must pick its positive among every positive in the batch (in-batch
  negatives) plus any explicit hard negatives:
  ``L = -1/B Σ_i log( exp(s_ii/τ) / Σ_j exp(s_ij/τ) )`` with ``s`` the cosine similarity.
  ``symmetric`` adds the positive→anchor direction (as in CLIP) and averages the two.
- ``cosent_loss``: CoSENT (Su, 2022) for graded pairs: every pair (i, j) with gold ``y_i > y_j``
  should have ``cos_i > cos_j``: ``L = log(1 + Σ_{y_i > y_j} exp(λ (cos_j - cos_i)))``.
- ``cosine_regression_loss``: ``mean((cos - y)²)`` with ``y`` scaled to [0, 1] (Sentence-BERT's
  CosineSimilarityLoss).

All are pure functions: embeddings or cosines in, a scalar out, fp32 inside for stability.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def cosine_matrix(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(N, H), (M, H) -> (N, M) cosine similarities (fp32)."""
    return F.normalize(a.float(), dim=-1) @ F.normalize(b.float(), dim=-1).T


def _false_negatives(
    col_ids: torch.Tensor | None, row_ids: torch.Tensor | None, B: int, device: torch.device
) -> torch.Tensor | None:
    """(B, B) mask of in-batch columns to leave out of row i's softmax denominator.

    Column j (j != i) goes when it is row i's own target text again (same ``col_ids``) or pair j
    shares row i's text (same ``row_ids``): it is then a right answer, not a negative. And a text
    repeated among the columns counts once: later copies go. Row i's softmax is then exactly
    the one over the deduplicated batch.
    """
    if col_ids is None and row_ids is None:
        return None
    eye = torch.eye(B, dtype=torch.bool, device=device)
    same = torch.zeros(B, B, dtype=torch.bool, device=device)
    repeat = torch.zeros(B, dtype=torch.bool, device=device)
    if col_ids is not None:
        equal = col_ids[:, None] == col_ids[None, :]  # (B, B)
        same |= equal
        repeat = torch.triu(equal, diagonal=1).any(dim=0)  # (B,): column j copies an earlier column
    if row_ids is not None:
        same |= row_ids[:, None] == row_ids[None, :]
    return (same & ~eye) | (repeat[None, :] & ~same)


def info_nce(
    anchor: torch.Tensor,
    positive: torch.Tensor,
    negative: torch.Tensor | None = None,
    temperature: float | torch.Tensor = 0.05,
    symmetric: bool = False,
    anchor_ids: torch.Tensor | None = None,
    positive_ids: torch.Tensor | None = None,
    negative_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """Multiple-negatives ranking loss with in-batch negatives.

    Args:
        anchor: (B, H) anchor embeddings (normalised inside: the scores are cosines).
        positive: (B, H) positive of each anchor; the other rows are its in-batch negatives.
        negative: (N, H) optional hard negatives (e.g. one per anchor, N = B), shared by every anchor.
        temperature: τ, a float or a 0-dim tensor (learnable); logits are ``cos / τ``.
        symmetric: Also classify each positive's anchor among all anchors, and average.
        anchor_ids, positive_ids, negative_ids: optional (B,), (B,), (N,) integer ids of the
            texts (e.g. hashes). Pairs that share an anchor or a positive do not serve as each
            other's negatives, a text repeated among the candidates (positives and hard
            negatives) counts once, and a hard negative equal to the anchor's positive is left out.

    Returns the mean cross-entropy, a scalar.
    """
    B = anchor.size(0)
    candidates = positive if negative is None else torch.cat([positive, negative])  # (B + N, H)
    logits = cosine_matrix(anchor, candidates) / temperature  # (B, B + N)
    target = torch.arange(B, device=anchor.device)
    mask = _false_negatives(positive_ids, anchor_ids, B, anchor.device)
    if mask is not None:
        if negative is not None:
            drop = torch.zeros(negative.size(0), dtype=torch.bool, device=anchor.device)  # (N,)
            if negative_ids is not None:
                # A hard negative that is already a column (a positive, or an earlier hard negative)
                # counts once; one that is a row's own positive text is no negative of that row.
                drop = torch.triu(negative_ids[:, None] == negative_ids[None, :], diagonal=1).any(dim=0)
                if positive_ids is not None:
                    drop |= (positive_ids[:, None] == negative_ids[None, :]).any(dim=0)
            mask = torch.cat([mask, drop[None, :].expand(B, -1)], dim=1)  # (B, B + N)
        logits = logits.masked_fill(mask, float("-inf"))
    loss = F.cross_entropy(logits, target)
    if not symmetric:
        return loss
    back = cosine_matrix(positive, anchor) / temperature  # (B, B): positive i among all anchors
    mask = _false_negatives(anchor_ids, positive_ids, B, anchor.device)
    if mask is not None:
        back = back.masked_fill(mask, float("-inf"))
    return (loss + F.cross_entropy(back, target)) / 2


def cosent_loss(cos: torch.Tensor, scores: torch.Tensor, scale: float = 20.0) -> torch.Tensor:
    """CoSENT: rank the pairs' cosines in the order of their gold scores.

    Args:
        cos: (B,) cosine similarity of each pair.
        scores: (B,) gold similarity (any monotone scale: only the order matters).
        scale: λ, sharpness of the ranking (20 in the paper).

    Returns ``log(1 + Σ_{y_i > y_j} exp(λ (cos_j - cos_i)))``, a scalar; 0 terms give log(1) = 0.
    """
    cos = cos.float() * scale
    diff = cos[None, :] - cos[:, None]  # (B, B): [i, j] = λ (cos_j - cos_i)
    ordered = scores[:, None] > scores[None, :]  # (B, B): pairs where i should score above j
    diff = diff.masked_fill(~ordered, float("-inf"))
    zero = torch.zeros(1, device=cos.device)  # the "1 +" inside the log
    return torch.logsumexp(torch.cat([zero, diff.flatten()]), dim=0)


def cosine_regression_loss(cos: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
    """Mean squared error between (B,) cosines and (B,) gold scores scaled to [0, 1]; a scalar."""
    return F.mse_loss(cos.float(), scores.float())
