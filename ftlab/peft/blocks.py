"""Transformer blocks found by structure, for methods that need more than module names.

A *block* is a module at ``<stack>.N`` (``model.layers.3``, ``transformer.h.0``, ``encoder.layer.1``,
``encoder.block.0`` and ``decoder.block.0`` of a T5...). Inside it:

- its **self-attention** is the first submodule whose class name contains ``Attention`` and that is
  not cross-attention (class or attribute name with ``Cross``, or ``encoder_attn`` as in BART); its
  **core** is the innermost such module (BERT's ``attention.self``, T5's ``layer.0.SelfAttention``),
  the one that calls the attention function;
- the **attention output projection** is the last linear layer inside that self-attention
  (``o_proj``, ``c_proj``, ``attention.output.dense``, ``dense``, ``out_lin``, ``Wo``...);
- its **input projections** are the other linear layers inside it (``q_proj``/``k_proj``/``v_proj``, or a
  fused ``c_attn``/``query_key_value``/``Wqkv``);
- the **feed-forward output projection** is the last linear layer of the block outside every
  attention submodule whose output width is the block's width (``down_proj``, ``mlp.c_proj``,
  ``output.dense``, ``fc2``, ``ffn.lin2``, ``DenseReluDense.wo``...).

This covers the Hugging Face families this project tests (Llama, Qwen, Mistral, Gemma, Phi-3, OLMo,
Granite, GPT-2, GPT-NeoX, OPT, Falcon, BERT, RoBERTa, DeBERTa-v2, DistilBERT, ELECTRA, ModernBERT,
T5, BART) without a table of families. For an exotic model, ``attention_output`` and ``ffn_output``
name-pattern overrides (as for LoRA's targets) replace the structural guess.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from torch import nn

from ftlab.peft.layers import features, linear_kinds
from ftlab.peft.targets import TargetError, matches

#: A block: ``<...>.<layers|layer|h|blocks|block>.<N>`` exactly.
_BLOCK_RE = re.compile(r"(?:^|\.)(?:layers|layer|h|blocks|block)\.(\d+)$")


@dataclass
class Block:
    """Names (in the model) of one transformer block's parts."""

    name: str
    index: int
    attention: str | None = None  # the self-attention module
    core: str | None = None  # the innermost self-attention module: the one calling the attention function
    attention_output: str | None = None
    projections: list[str] = field(default_factory=list)  # the self-attention's input projections
    ffn_output: str | None = None


def _is_attention(name: str, module: nn.Module) -> bool:
    return "attention" in type(module).__name__.lower()


def _is_cross(name: str, module: nn.Module) -> bool:
    leaf = name.rsplit(".", 1)[-1].lower()
    return (
        "cross" in type(module).__name__.lower()
        or "cross" in leaf
        or leaf == "encoder_attn"
        or getattr(module, "is_cross_attention", False) is True
    )


def find_blocks(
    model: nn.Module, attention_output: list[str] | None = None, ffn_output: list[str] | None = None
) -> list[Block]:
    """Every transformer block of ``model`` with its parts (see the module docstring). Parts that
    cannot be found stay None; ``attention_output`` / ``ffn_output`` patterns override the guess."""
    linear = linear_kinds()
    modules = dict(model.named_modules())
    blocks: list[Block] = []
    for name, module in modules.items():
        found = _BLOCK_RE.search(name)
        if not found or not list(module.children()) or any(name.startswith(b.name + ".") for b in blocks):
            continue  # T5's blocks hold a ModuleList "layer" of their own: not blocks
        block = Block(name, int(found.group(1)))
        inner = [(n, m) for n, m in module.named_modules() if n]
        attentions = [n for n, m in inner if _is_attention(n, m)]
        self_attention = next(
            (
                n
                for n in attentions
                if not _is_cross(n, modules[f"{name}.{n}"])
                and not any(n.startswith(a + ".") for a in attentions)
            ),
            None,
        )
        if self_attention is not None:
            block.attention = f"{name}.{self_attention}"
            cores = [n for n in attentions if n == self_attention or n.startswith(self_attention + ".")]
            block.core = f"{name}.{cores[-1]}"
            lin = [
                f"{name}.{n}"
                for n, m in inner
                if isinstance(m, linear) and n.startswith(self_attention + ".")
            ]
            if lin:
                block.attention_output, block.projections = lin[-1], lin[:-1]
        width = _width(model)
        outside = [
            f"{name}.{n}"
            for n, m in inner
            if isinstance(m, linear)
            and not any(n.startswith(a + ".") for a in attentions)
            and features(m)[1] == width
        ]
        block.ffn_output = outside[-1] if outside else None
        for pattern, part in ((attention_output, "attention_output"), (ffn_output, "ffn_output")):
            if pattern:
                hits = [
                    n
                    for n, m in inner
                    if isinstance(m, linear) and any(matches(f"{name}.{n}", p) for p in pattern)
                ]
                setattr(block, part, f"{name}.{hits[-1]}" if hits else None)
        blocks.append(block)
    if not blocks:
        raise TargetError(
            f"found no transformer blocks in {type(model).__name__} (modules named like "
            "'layers.N', 'h.N', 'layer.N' or 'block.N')"
        )
    return blocks


def _width(model: nn.Module) -> int | None:
    cfg = getattr(model, "config", None)
    for key in ("hidden_size", "d_model", "n_embd", "dim"):
        if isinstance(getattr(cfg, key, None), int):
            return getattr(cfg, key)
    return None


def attention_targets(model: nn.Module) -> list[str]:
    """Names of every linear layer of every block's self-attention (input and output projections)."""
    return [n for b in find_blocks(model) for n in (*b.projections, b.attention_output) if n]
