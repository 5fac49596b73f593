"""IA³: Few-Shot Parameter-Efficient Fine-Tuning is Better and Cheaper than In-Context Learning
(Liu et al., 2022, arXiv:2205.05638).

Learned vectors rescale the keys, the values and the feed-forward activations; nothing else trains:

    k = l_k ⊙ (W_k x),     v = l_v ⊙ (W_v x),     h = W_down (l_ff ⊙ a),   a = act(W_up x)

Each vector starts at ones, so the adapted model starts equal to the base. A vector on a layer's
output scales its rows (``W ← diag(l) W``, and the bias), one on its input scales its columns
(``W ← W diag(l)``): both fold into the base weight, so ``merge_and_unload`` leaves a plain model.
Targets are module-name patterns as for LoRA; ``feedforward`` says which of them are scaled on
their input (the feed-forward output projection, whose input is the activation ``a``).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from typing import Any

import torch
from torch import nn

from ftlab.peft.layers import compute_dtype, features, is_conv1d, is_quantized, linear_kinds
from ftlab.peft.method import Method, freeze
from ftlab.peft.targets import find_targets, matches, set_submodule


class IA3Linear(nn.Module):
    """A frozen linear layer whose output (or, for ``on_input``, input) is scaled by ``ia3_l``."""

    def __init__(self, base: nn.Module, on_input: bool):
        super().__init__()
        self.base, self.on_input, self.enabled = base, on_input, True
        in_f, out_f = features(base)
        device = next(base.parameters()).device
        self.ia3_l = nn.Parameter(torch.ones(in_f if on_input else out_f, dtype=compute_dtype(base), device=device))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return self.base(x)
        if self.on_input:
            return self.base(x * self.ia3_l.to(x.dtype))  # (..., out)
        y = self.base(x)  # (..., out)
        return y * self.ia3_l.to(y.dtype)

    def fold(self) -> nn.Module:
        """The base layer with the scale folded into its weight (and bias, for an output scale)."""
        if is_quantized(self.base):
            raise ValueError("cannot fold IA³ scales into a quantized layer; dequantize it first")
        w, l = self.base.weight, self.ia3_l.detach()
        # Conv1D stores (in, out): its rows are inputs, its columns outputs.
        rows = self.on_input == is_conv1d(self.base)
        with torch.no_grad():
            w.mul_((l[:, None] if rows else l[None, :]).to(w.dtype))
            if not self.on_input and getattr(self.base, "bias", None) is not None:
                self.base.bias.mul_(l.to(self.base.bias.dtype))
        return self.base

    def extra_repr(self) -> str:
        return f"scales={'input' if self.on_input else 'output'}, size={self.ia3_l.numel()}, enabled={self.enabled}"


class IA3(Method):
    """Learned scaling vectors on keys, values and feed-forward activations; the backbone stays frozen.

    Args:
        targets: Module-name patterns of the layers to scale (keys, values and the feed-forward output
            projection; for GPT-2: ``[c_attn, mlp.c_proj]``).
        feedforward: Which of ``targets`` are scaled on their input (the feed-forward output projection).
        layers: Which transformer blocks: all (null), a list of indices, ``"a-b"``, ``"top:k"``...
    """

    def __init__(
        self,
        targets: list[str] = ["k_proj", "v_proj", "down_proj"],  # noqa: B006 - jsonargparse needs a literal default
        feedforward: list[str] = ["down_proj"],  # noqa: B006
        layers: list[int] | str | None = None,
    ):
        unknown = [f for f in feedforward if f not in targets]
        if unknown:
            raise ValueError(f"feedforward {unknown} must also be in targets {targets}")
        self.targets, self.feedforward, self.layers = list(targets), list(feedforward), layers

    def apply(self, model: nn.Module) -> None:
        if any(isinstance(m, IA3Linear) for m in model.modules()):
            raise ValueError("this model already has IA³ scales (IA3 was applied twice)")
        freeze(model)
        for name, module in find_targets(model, self.targets, self.layers, linear_kinds()):
            on_input = any(matches(name, f) for f in self.feedforward)
            set_submodule(model, name, IA3Linear(module, on_input))

    def hparams(self) -> dict[str, Any]:
        return {"targets": self.targets, "feedforward": self.feedforward, "layers": self.layers}

    def num_parameters(self, model: nn.Module) -> int:
        """The formula: one value per scaled feature, ``in`` for feed-forward targets, ``out`` for others."""
        return sum(features(m.base)[0 if m.on_input else 1] for m in ia3_layers(model))

    def disabled(self, model: nn.Module) -> AbstractContextManager[None]:
        return disable_ia3(model)

    def merge_and_unload(self, model: nn.Module) -> None:
        for name, m in list(model.named_modules()):
            if isinstance(m, IA3Linear):
                set_submodule(model, name, m.fold())


def ia3_layers(model: nn.Module) -> Iterator[IA3Linear]:
    return (m for m in model.modules() if isinstance(m, IA3Linear))


@contextmanager
def disable_ia3(model: nn.Module) -> Iterator[None]:
    """Run the base model: every IA³ scale off inside the block."""
    layers = list(ia3_layers(model))
    saved = [m.enabled for m in layers]
    for m in layers:
        m.enabled = False
    try:
        yield
    finally:
        for m, enabled in zip(layers, saved):
            m.enabled = enabled
