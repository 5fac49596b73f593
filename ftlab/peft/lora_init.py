"""How LoRA's ``A`` and ``B`` start: a registry of initialisations, name -> ``init(layer, name)``.

    kaiming   A ~ U(kaiming, as nn.Linear initialises a weight), B = 0        (Hu et al., 2021)
    gaussian  A ~ N(0, 1/r), B = 0
    pissa     W0 = U S Vᵀ:  B = U_r S_r^½ / √s,  A = S_r^½ V_rᵀ / √s,  W0 ← W0 − s·B A
              (Meng et al., 2024, arXiv:2404.02948: the principal components train, the rest stays)
    olora     W0 = Q R:     B = Q_r (first r columns),  A = R_r (first r rows),  W0 ← W0 − s·B A
              (Büyükakyüz, 2024, arXiv:2406.01775: an orthonormal B)

Every initialisation leaves the adapted model equal to the base at the start: with B = 0 the
update is zero; PiSSA and OLoRA move ``s·B A`` out of the base weight into the adapter
(``ResidualInit``), so ``W0 − s·B A + s·B A = W0`` up to float rounding. They work wherever the layer's
weight can be rewritten: dense layers, and 4-bit layers (re-quantized: the residual is what is
quantized, as in QLoRA + PiSSA). They are deterministic given the base, so an adapter saved from a
PiSSA run loads onto a fresh base by re-running the same decomposition.

A new initialisation is one function registered here with ``@register("name")``; ``LoRA``, DoRA
and QLoRA accept it as ``init: name``.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

from ftlab.peft.layers import dense_weight, set_dense_weight

#: name -> init(layer, adapter_name): sets ``layer.lora_A[name]`` and ``layer.lora_B[name]`` in place.
INITS: dict[str, Callable[[nn.Module, str], None]] = {}


def register(name: str):
    def add(init: Callable[[nn.Module, str], None]):
        INITS[name] = init
        return init

    return add


@register("kaiming")
def kaiming(layer: nn.Module, name: str) -> None:
    nn.init.kaiming_uniform_(layer.lora_A[name], a=math.sqrt(5))
    nn.init.zeros_(layer.lora_B[name])


@register("gaussian")
def gaussian(layer: nn.Module, name: str) -> None:
    nn.init.normal_(layer.lora_A[name], std=1.0 / layer.lora_A[name].size(0))
    nn.init.zeros_(layer.lora_B[name])


class ResidualInit:
    """An initialisation that takes ``s·B A`` out of the base weight: ``decompose(W0, r, s)``
    returns (B, A) in float32, and the base keeps ``W0 − s·B A``."""

    def __init__(self, decompose: Callable[[torch.Tensor, int, float], tuple[torch.Tensor, torch.Tensor]]):
        self.decompose = decompose
        self.__doc__ = decompose.__doc__

    def __call__(self, layer: nn.Module, name: str) -> None:
        a, b, s = layer.lora_A[name], layer.lora_B[name], layer.scaling[name]
        w0 = dense_weight(layer.base).detach().float()  # (out, in)
        rank = a.size(0)
        if rank > min(w0.shape):
            raise ValueError(f"rank {rank} exceeds the rank of a {tuple(w0.shape)} weight")
        b0, a0 = self.decompose(w0, rank, s)  # (out, r), (r, in)
        with torch.no_grad():
            a.copy_(a0.to(a.dtype))
            b.copy_(b0.to(b.dtype))
            # Subtract what the adapter holds *in its own dtype*, so base + adapter == W0 there.
            set_dense_weight(layer.base, w0 - s * (b.float() @ a.float()))


def _pissa(w0: torch.Tensor, rank: int, s: float) -> tuple[torch.Tensor, torch.Tensor]:
    """PiSSA: the top-r singular triplets, split evenly between B and A."""
    u, sv, vh = torch.linalg.svd(w0, full_matrices=False)  # (out, k), (k,), (k, in)
    root = (sv[:rank] / s).sqrt()  # (r,)
    return u[:, :rank] * root, root[:, None] * vh[:rank]


def _olora(w0: torch.Tensor, rank: int, s: float) -> tuple[torch.Tensor, torch.Tensor]:
    """OLoRA: the first r columns of Q and rows of R of ``W0 = Q R``."""
    q, r = torch.linalg.qr(w0)  # (out, k), (k, in)
    return q[:, :rank], r[:rank]


register("pissa")(ResidualInit(_pissa))
register("olora")(ResidualInit(_olora))
