"""IA³: Few-Shot Parameter-Efficient Fine-Tuning is Better and Cheaper than In-Context Learning
(Liu et al., 2022, arXiv:2205.05638).

Learned vectors rescale the keys, the values and the feed-forward activations; nothing else trains:

    k = l_k ⊙ (W_k x),     v = l_v ⊙ (W_v x),     h = W_down (l_ff ⊙ a),   a = act(W_up x)

Each vector starts at ones, so the adapted model starts equal to the base. A vector on a layer's
output scales its rows (``W ← diag(l) W``, and the bias), one on its input scales its columns
(``W ← W diag(l)``): both fold into the base weight, so ``merge_and_unload`` leaves a plain model.
By default the layers are found by structure (``ftlab.peft.blocks``): in each block, the key and
value projections of the self-attention (a fused q/k/v projection such as GPT-2's ``c_attn`` is
scaled whole, as PEFT does) and the feed-forward output projection. Explicit ``targets`` are
module-name patterns as for LoRA; ``feedforward`` says which of them are scaled on their input.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import AbstractContextManager
from typing import Any

import torch
from torch import nn

from ftlab.peft.blocks import find_blocks
from ftlab.peft.layers import LinearWrapper, compute_dtype, features, is_conv1d, is_quantized, linear_kinds
from ftlab.peft.method import Method, freeze, switched_off
from ftlab.peft.targets import TargetError, find_targets, matches, num_layers, select_layers, set_submodule

#: Leaf names of separate key and value projections (k_proj, key, v_lin, value_proj, k, ...).
KEY_VALUE = re.compile(r"^(k|v|key|value)(_proj|_lin)?$", re.IGNORECASE)


class IA3Linear(LinearWrapper):
    """A frozen linear layer whose output (or, for ``on_input``, input) is scaled by ``ia3_l``."""

    def __init__(self, base: nn.Module, on_input: bool):
        super().__init__()
        self.base, self.on_input, self.enabled = base, on_input, True
        in_f, out_f = features(base)
        device = next(base.parameters()).device
        self.ia3_l = nn.Parameter(
            torch.ones(in_f if on_input else out_f, dtype=compute_dtype(base), device=device)
        )

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
        w, scale = self.base.weight, self.ia3_l.detach()
        # Conv1D stores (in, out): its rows are inputs, its columns outputs.
        rows = self.on_input == is_conv1d(self.base)
        with torch.no_grad():
            w.mul_((scale[:, None] if rows else scale[None, :]).to(w.dtype))
            if not self.on_input and self.bias is not None:
                self.bias.mul_(scale.to(self.bias.dtype))
        return self.base

    def extra_repr(self) -> str:
        side = "input" if self.on_input else "output"
        return f"scales={side}, size={self.ia3_l.numel()}, enabled={self.enabled}"


class IA3(Method):
    """Learned scaling vectors on keys, values and feed-forward activations; the backbone stays frozen.

    Args:
        targets: Module-name patterns of the layers to scale (e.g. ``[k_proj, v_proj, down_proj]``);
            null finds keys, values and feed-forward output projections by structure.
        feedforward: Which of ``targets`` are scaled on their input (the feed-forward output projection).
        layers: Which transformer blocks: all (null), a list of indices, ``"a-b"``, ``"top:k"``...
    """

    def __init__(
        self,
        targets: list[str] | None = None,
        feedforward: list[str] | None = None,
        layers: list[int] | str | None = None,
    ):
        if (targets is None) != (feedforward is None):
            raise ValueError("give both targets and feedforward (module-name patterns), or neither")
        unknown = [f for f in feedforward or [] if f not in targets]
        if unknown:
            raise ValueError(f"feedforward {unknown} must also be in targets {targets}")
        self.targets, self.feedforward, self.layers = targets, feedforward, layers

    def apply(self, model: nn.Module) -> None:
        if any(isinstance(m, IA3Linear) for m in model.modules()):
            raise ValueError("this model already has IA³ scales (IA3 was applied twice)")
        chosen = self._sites(model)
        freeze(model)
        for name, on_input in chosen.items():
            set_submodule(model, name, IA3Linear(model.get_submodule(name), on_input))

    def _sites(self, model: nn.Module) -> dict[str, bool]:
        """Layer name -> scaled on its input?"""
        if self.targets is not None:
            return {
                name: any(matches(name, f) for f in self.feedforward)
                for name, _ in find_targets(model, self.targets, self.layers, linear_kinds())
            }
        keep = select_layers(self.layers, num_layers(model))
        sites = {}
        for block in find_blocks(model):
            if block.index not in keep:
                continue
            kv = [n for n in block.projections if KEY_VALUE.search(n.rsplit(".", 1)[-1])]
            sites.update(dict.fromkeys(kv or block.projections, False))
            if block.ffn_output:
                sites[block.ffn_output] = True
        if not sites:
            raise TargetError(
                f"IA3 found no attention projections in {type(model).__name__}; give targets and "
                "feedforward as module-name patterns"
            )
        return sites

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


def disable_ia3(model: nn.Module) -> AbstractContextManager[None]:
    """Run the base model: every IA³ scale off inside the block."""
    return switched_off(ia3_layers(model))
