"""Prefix tuning: Prefix-Tuning: Optimizing Continuous Prompts for Generation (Li & Liang, 2021,
arXiv:2101.00190).

Every chosen attention layer ℓ attends to P trainable key/value vectors before the real ones:

    Attn_ℓ(Q, K, V) = softmax(Q [K_p^ℓ ; K]ᵀ / √d) [V_p^ℓ ; V],    K_p^ℓ, V_p^ℓ: (heads_kv, P, d)

Only the prefixes train. Optionally (the paper's reparameterisation, for stabler training) they
are produced by a small MLP from a P × H table, ``[K_p ; V_p] = W_2 tanh(W_1 E + b_1) + b_2``, which
``PrefixTuning.fold`` turns into plain tensors once training is done.

How the prefix gets in: not through the key/value cache (gradient checkpointing drops the cache
and would replay its update; generation would need mask and position bookkeeping), but through
the attention function itself. Each prefixed attention module gets a config whose attention
implementation is ``ftlab_prefix``, a registered function that prepends the layer's K_p, V_p after
rotary embeddings and after the cache, widens the attention mask by P always-visible columns,
and calls the model's own ``sdpa`` or ``eager`` attention. So the real tokens keep their
positions, a zero-length prefix is the base model, checkpointed layers recompute it, and the
cache during ``generate`` holds real tokens only. The same route serves decoders (Llama, GPT-2)
and encoders (BERT).
"""

from __future__ import annotations

import copy
import sys
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from ftlab.peft.blocks import find_blocks
from ftlab.peft.method import Method, freeze, switched_off
from ftlab.peft.targets import LayerSelection, TargetError, num_layers, select_layers

ATTR = "ftlab_prefix"  # the prefix module's name on the model
IMPLEMENTATION = "ftlab_prefix"  # the attention implementation name the prefixed layers use
SUPPORTED = ("sdpa", "eager")
_NO_INTERFACE = (
    "prefix tuning: {}'s attention does not go through transformers' AttentionInterface, so no "
    "prefix can be put in front of its keys and values; use prompt tuning (PromptTuning) or LoRA"
)


class PrefixEncoder(nn.Module):
    """Per-layer key/value prefixes: a plain tensor, or an MLP over a P × H table.

    Args:
        shape: (layers, heads_kv, P, head_dim) of the prefixes it produces.
        hidden: Width H of the table the MLP reads (reparameterised only).
        projection_dim: The MLP's hidden width; None stores the prefixes directly.
    """

    def __init__(self, shape: tuple[int, int, int, int], hidden: int, projection_dim: int | None = None):
        super().__init__()
        self.n_layers, self.heads, self.length, self.head_dim = shape
        self.enabled = True
        if projection_dim is None:
            self.prefix = nn.Parameter(torch.randn(self.n_layers, 2, self.heads, self.length, self.head_dim))
        else:
            self.embedding = nn.Parameter(torch.randn(self.length, hidden))  # (P, H)
            self.down = nn.Linear(hidden, projection_dim)  # (H', H)
            out = self.n_layers * 2 * self.heads * self.head_dim
            self.up = nn.Linear(projection_dim, out)  # (L·2·h·d, H')

    @property
    def reparameterized(self) -> bool:
        return "prefix" not in self._parameters

    def key_value(self, row: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Prefix keys and values of the ``row``-th prefixed layer: two (heads_kv, P, d) tensors."""
        if not self.reparameterized:
            kv = self.prefix[row]  # (2, h, P, d)
        else:
            # Only this layer's rows of the output projection: the MLP never materialises the
            # other layers' prefixes, and a checkpointed layer recomputes its own.
            width = 2 * self.heads * self.head_dim
            h = torch.tanh(self.down(self.embedding))  # (P, H')
            w = self.up.weight[row * width : (row + 1) * width]  # (2·h·d, H')
            b = self.up.bias[row * width : (row + 1) * width]
            kv = F.linear(h, w, b).view(self.length, 2, self.heads, self.head_dim)  # (P, 2, h, d)
            kv = kv.permute(1, 2, 0, 3)  # (2, h, P, d)
        return kv[0], kv[1]

    @torch.no_grad()
    def fold(self) -> None:
        """Replace the MLP by the prefixes it currently produces (same outputs, fewer parameters)."""
        if not self.reparameterized:
            return
        prefix = torch.stack([torch.stack(self.key_value(i)) for i in range(self.n_layers)])  # (L,2,h,P,d)
        del self.embedding, self.down, self.up
        self.prefix = nn.Parameter(prefix.contiguous())

    def extra_repr(self) -> str:
        kind = "mlp" if self.reparameterized else "plain"
        return (
            f"layers={self.n_layers}, heads_kv={self.heads}, P={self.length}, head_dim={self.head_dim}, "
            f"{kind}, enabled={self.enabled}"
        )


class _Slot:
    """What a prefixed attention module needs at call time (a plain object: not a submodule)."""

    def __init__(self, row: int, inner: Callable, sdpa: bool, encoder: PrefixEncoder | None = None):
        self.row, self.inner, self.sdpa, self.encoder = row, inner, sdpa, encoder
        self.captured: tuple[torch.Tensor, torch.Tensor] | None = None


def prefix_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    **kwargs,
) -> tuple[torch.Tensor, Any]:
    """The ``ftlab_prefix`` attention function: prepend the layer's prefix, then run the real one.

    query (B, heads, T, d); key, value (B, heads_kv, S, d) after rotary embeddings and the cache;
    attention_mask None, boolean (True: attend) or additive, (B or 1, 1 or heads, T, S).
    """
    slot: _Slot = module.__dict__["_ftlab_prefix_slot"]
    if slot.encoder is None:  # capturing activations of real tokens to initialise the prefix
        slot.captured = (key[0].detach().clone(), value[0].detach().clone())  # (h, S, d) each
    elif slot.encoder.enabled:
        pk, pv = slot.encoder.key_value(slot.row)  # (h, P, d) each
        batch, n = key.size(0), pk.size(1)
        causal = kwargs.get("is_causal")
        causal = getattr(module, "is_causal", True) if causal is None else causal
        attention_mask = extend_mask(
            attention_mask, n, query.size(2), key.size(2), causal and slot.sdpa, query.device
        )
        if isinstance(
            bias := kwargs.get("position_bias"), torch.Tensor
        ):  # T5 adds it to the scores: none for prefixes
            kwargs["position_bias"] = torch.cat(
                [bias.new_zeros(*bias.shape[:-1], n), bias], dim=-1
            )  # (., h, T, P + S)
        key = torch.cat([pk.to(key.dtype).expand(batch, -1, -1, -1), key], dim=2)  # (B, h, P + S, d)
        value = torch.cat([pv.to(value.dtype).expand(batch, -1, -1, -1), value], dim=2)
    return slot.inner(module, query, key, value, attention_mask, **kwargs)


def extend_mask(
    mask: torch.Tensor | None, n: int, q_len: int, kv_len: int, causal: bool, device: torch.device
) -> torch.Tensor | None:
    """Widen a 4D attention mask by ``n`` always-visible prefix columns in front.

    A missing mask stays missing (every key visible) unless SDPA would have applied causality
    itself (``causal`` and more than one query): that mask is built here, aligned to the last key.
    """
    if mask is None:
        if not (causal and q_len > 1):
            return None
        q_pos = torch.arange(kv_len - q_len, kv_len, device=device)  # (T,) positions of the queries
        mask = (torch.arange(kv_len, device=device)[None, :] <= q_pos[:, None])[None, None]  # (1, 1, T, S)
    visible = True if mask.dtype == torch.bool else 0.0
    head = torch.full((*mask.shape[:-1], n), visible, dtype=mask.dtype, device=mask.device)  # (b, h, T, n)
    return torch.cat([head, mask], dim=-1)  # (b, h, T, n + S)


def _sdpa() -> Callable:
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    return sdpa_attention_forward


def _register() -> None:
    from transformers import AttentionInterface

    AttentionInterface.register(IMPLEMENTATION, prefix_attention)


def _inner_attention(module: nn.Module, implementation: str) -> Callable:
    """The attention function the module would call without the prefix."""
    if implementation == "sdpa":
        return _sdpa()
    eager = getattr(sys.modules[type(module).__module__], "eager_attention_forward", None)
    if eager is None:
        raise ValueError(f"prefix tuning cannot find the eager attention of {type(module).__name__}")
    return eager


def attention_modules(model: nn.Module, layers: LayerSelection = None) -> dict[str, nn.Module]:
    """The self-attention core of each chosen block (the module that calls the attention function:
    ``LlamaAttention``, ``GPT2Attention``, ``BertSelfAttention``...), by block name. An encoder-decoder
    has two stacks: both get prefixes in their self-attention (not in cross-attention)."""
    keep = select_layers(layers, num_layers(model))
    found = {b.name: model.get_submodule(b.core) for b in find_blocks(model) if b.core and b.index in keep}
    if not found:
        raise TargetError(f"prefix tuning found no self-attention modules in {type(model).__name__}")
    return found


class PrefixTuning(Method):
    """Trainable key/value prefixes in every chosen attention layer; the backbone stays frozen.

    Args:
        num_virtual_tokens: Prefix length P (> 0).
        layers: Which transformer blocks get a prefix: all (null), a list of indices, ``"a-b"``,
            ``"top:k"``, ``"bottom:k"``, ``"top_half"``, ``"bottom_half"``.
        reparameterize: Produce the prefixes with an MLP over a P × H table during training (the
            paper's trick); ``fold`` turns them into plain tensors afterwards.
        projection_dim: Hidden width of that MLP; null uses the model's hidden size.
        init: ``vocab`` starts each layer's prefix as the keys and values the frozen model computes
            for P random vocabulary tokens (the paper's "real words" initialisation); ``random``
            draws N(0, 1). Null: ``vocab`` for plain prefixes, ``random`` with the MLP.
    """

    def __init__(
        self,
        num_virtual_tokens: int = 20,
        layers: list[int] | str | None = None,
        reparameterize: bool = False,
        projection_dim: int | None = None,
        init: Literal["random", "vocab"] | None = None,
    ):
        if num_virtual_tokens <= 0:
            raise ValueError(f"num_virtual_tokens must be > 0, got {num_virtual_tokens}")
        if projection_dim is not None and projection_dim <= 0:
            raise ValueError(f"projection_dim must be > 0, got {projection_dim}")
        init = init or ("random" if reparameterize else "vocab")
        if reparameterize and init == "vocab":
            raise ValueError("init='vocab' sets plain prefixes; use init='random' with reparameterize")
        self.num_virtual_tokens, self.layers = num_virtual_tokens, layers
        self.reparameterize, self.projection_dim, self.init = reparameterize, projection_dim, init

    def apply(self, model: nn.Module) -> None:
        if hasattr(model, ATTR):
            raise ValueError("this model already has prefixes (PrefixTuning was applied twice)")
        modules = attention_modules(model, self.layers)
        implementation = model.config._attn_implementation
        if implementation not in SUPPORTED:
            supported = " and ".join(SUPPORTED)
            raise ValueError(f"prefix tuning supports {supported} attention, not {implementation!r}")
        if not all(hasattr(m, "config") for m in modules.values()):
            raise TargetError(_NO_INTERFACE.format(type(model).__name__))
        freeze(model)
        _register()
        prefixed = copy.deepcopy(model.config)  # only these modules see the custom implementation name
        prefixed._attn_implementation = IMPLEMENTATION
        slots, configs = [], {}
        for row, m in enumerate(modules.values()):
            slot = _Slot(row, _inner_attention(m, implementation), sdpa=implementation == "sdpa")
            m.__dict__["_ftlab_prefix_slot"] = slot  # a plain attribute: not a submodule or parameter
            configs[id(m)], m.config = m.config, prefixed
            slots.append(slot)
        # Run the frozen model once: it shows which modules really call the attention function (and,
        # for ``vocab``, captures the keys and values of real tokens to start the prefixes from).
        start = _real_token_prefix(model, slots, self.num_virtual_tokens if self.init == "vocab" else 1)
        shapes = {tuple(s.captured[0].shape[::2]) for s in slots if s.captured is not None}  # (heads_kv, d)
        if any(s.captured is None for s in slots) or len(shapes) != 1:
            for m in modules.values():
                m.config = configs[id(m)]
                del m.__dict__["_ftlab_prefix_slot"]
            if len(shapes) > 1:
                raise ValueError(
                    f"prefix tuning needs one key/value shape for all layers, got {sorted(shapes)}"
                )
            raise TargetError(_NO_INTERFACE.format(type(model).__name__))
        ((heads, head_dim),) = shapes
        start = (
            torch.stack([torch.stack(s.captured) for s in slots]).float() if self.init == "vocab" else None
        )
        for s in slots:
            s.captured = None

        weight = next(model.parameters())
        hidden = model.config.hidden_size
        proj = (self.projection_dim or hidden) if self.reparameterize else None
        encoder = PrefixEncoder((len(modules), heads, self.num_virtual_tokens, head_dim), hidden, proj)
        if start is not None:
            with torch.no_grad():
                encoder.prefix.copy_(start)
        encoder.to(device=weight.device, dtype=weight.dtype)
        model.add_module(ATTR, encoder)
        for slot in slots:
            slot.encoder = encoder

    def fold(self, model: nn.Module) -> None:
        """Turn MLP-produced prefixes into plain tensors; later saves load as ``reparameterize=False``."""
        prefix_module(model).fold()
        self.reparameterize, self.projection_dim, self.init = False, None, "random"

    def hparams(self) -> dict[str, Any]:
        return dict(
            num_virtual_tokens=self.num_virtual_tokens,
            layers=self.layers,
            reparameterize=self.reparameterize,
            projection_dim=self.projection_dim,
            init=self.init,
        )

    def num_parameters(self, model: nn.Module) -> int:
        """Plain: ``L·2·P·h_kv·d``. With the MLP: ``P·H + (H·H' + H') + (H'·L·2·h_kv·d + L·2·h_kv·d)``."""
        e = prefix_module(model)
        out = e.n_layers * 2 * e.heads * e.head_dim
        if not e.reparameterized:
            return out * e.length
        hidden, proj = e.embedding.size(1), e.down.out_features
        return e.length * hidden + hidden * proj + proj + proj * out + out

    def disabled(self, model: nn.Module) -> AbstractContextManager[None]:
        return disable_prefix(model)


def _real_token_prefix(model: nn.Module, slots: list[_Slot], n: int) -> None:
    """Run the frozen model on ``n`` random tokens; each slot captures its module's keys and values."""
    device = next(model.parameters()).device
    ids = torch.randint(0, model.config.vocab_size, (1, n), device=device)
    extra = {"decoder_input_ids": ids} if getattr(model.config, "is_encoder_decoder", False) else {}
    training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(input_ids=ids, use_cache=False, **extra)
    finally:
        model.train(training)


# ---------------------------------------------------------------------------------- functions
def prefix_module(model: nn.Module) -> PrefixEncoder:
    module = getattr(model, ATTR, None)
    if not isinstance(module, PrefixEncoder):
        raise ValueError("this model has no prefixes (apply PrefixTuning first)")
    return module


def disable_prefix(model: nn.Module) -> AbstractContextManager[None]:
    """Run the base model: no prefix inside the block."""
    return switched_off([prefix_module(model)])
