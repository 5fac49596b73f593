"""ORPO: odds-ratio preference optimisation, SFT and preference in one loss with no reference model.

ORPO (Hong et al., 2024, arXiv:2403.07691). With ``ℓ(y) = (1/|y|) Σ_t log π(y_t | x, y_<t)`` the
length-averaged log-probability of a response and ``odds(y) = P / (1 − P)``, ``P = exp ℓ(y)``:

    log OR = log odds(y_c) − log odds(y_r) = (ℓ_c − ℓ_r) − (log(1 − e^{ℓ_c}) − log(1 − e^{ℓ_r}))
    L = L_SFT + λ · (−log σ(log OR)),         L_SFT = −ℓ_c  (NLL of the chosen response)

The SFT term teaches the chosen answers; the odds-ratio term pushes the rejected ones down
relative to them. ``λ`` is the paper's 0.1 (0.1–0.25 in its runs).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def log_odds(logps: torch.Tensor) -> torch.Tensor:
    """``log(P / (1 − P))`` of length-averaged log-probs ``ℓ = log P``: (B,) -> (B,) fp32.

    ``log(1 − e^ℓ)`` is computed as ``log(−expm1(ℓ))``, finite for ℓ < 0; ℓ is capped just below 0
    (a response of probability 1 has infinite odds).
    """
    ell = logps.float().clamp_max(-1e-6)
    return ell - torch.log(-torch.expm1(ell))


def log_odds_ratio(chosen: torch.Tensor, rejected: torch.Tensor) -> torch.Tensor:
    """``log odds(y_c) − log odds(y_r)`` from length-averaged log-probs: (B,), (B,) -> (B,) fp32."""
    return log_odds(chosen) - log_odds(rejected)


def orpo_loss(
    chosen: torch.Tensor,
    rejected: torch.Tensor,
    lam: float = 0.1,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Mean ORPO loss.

    Args:
        chosen: (B,) length-averaged log π of the chosen responses.
        rejected: (B,) length-averaged log π of the rejected responses.
        lam: λ, the weight of the odds-ratio term.

    Returns ``(loss, nll, log_or)``: the scalar loss, its SFT part (scalar, detached) and the (B,)
    detached log odds ratios.
    """
    if lam < 0:
        raise ValueError(f"lam must be >= 0, got {lam}")
    log_or = log_odds_ratio(chosen, rejected)  # (B,)
    nll = -chosen.float().mean()
    loss = nll - lam * F.logsigmoid(log_or).mean()
    return loss, nll.detach(), log_or.detach()
