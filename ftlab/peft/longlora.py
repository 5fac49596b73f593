"""LongLoRA: Efficient Fine-tuning of Long-Context Large Language Models (Chen et al., 2023,
arXiv:2309.12307).

LoRA (``h = W0 x + (alpha/r) B A x`` on the attention projections) plus two changes that make
long-context fine-tuning cheap and work:

- **S²-Attn** (shifted sparse attention), in training only: the sequence is cut into groups of
  ``G = group_size`` tokens and each token attends causally within its group. Half of the heads
  use groups shifted by ``G/2``, so information flows across group boundaries:

      heads [0, H - H/2):   groups [0, G), [G, 2G), ...
      heads [H - H/2, H):   groups [0, G/2), [G/2, 3G/2), ..., [T - G/2, T)

  Attention costs ``T·G`` instead of ``T²``. At inference (``model.eval()``) attention is full
  causal attention, so the fine-tuned model is an ordinary model.
- **LoRA+**: the embeddings and normalization layers also train (each switchable).

Causality: the paper's reference code rolls the shifted heads by ``G/2``, which puts the first
``G/2`` tokens in one group with the last ``G/2`` tokens and lets them see the future. Here the
first and last half groups of the shifted heads are groups of their own, so no token ever sees a
later one.

Route: S²-Attn is an attention function registered in transformers' ``AttentionInterface`` under
the name ``ftlab_s2attn`` (with SDPA's mask function), and the model is switched to it with
``set_attn_implementation``. Any model whose attention dispatches through that interface (Llama,
Mistral, Qwen2, ...) uses it with no copied modeling code. Each attention module carries its own
settings (``module.ftlab_s2attn``); in eval mode, when decoding with a cache, or on a module without
settings, the function is plain SDPA. ``disable_s2attn`` puts the original implementation back
(``ftlab export`` does it, so exported models load with their usual attention).

Lengths: a training sequence that is not a multiple of ``G`` is padded at the end inside the
attention function (``pad_to_group``, exact: causal attention never looks at later positions, and
the padded outputs are dropped); with ``pad_to_group: false`` it is an error. A group larger than
the sequence is an error.
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from ftlab.peft.blocks import find_blocks
from ftlab.peft.lora import LoRA
from ftlab.peft.method import MethodError

NAME = "ftlab_s2attn"


@dataclass
class S2Settings:
    group_size: int
    shift: bool = True
    pad_to_group: bool = True
    original: str = "sdpa"  # the implementation to put back on ``disable_s2attn``


class LongLoRA(LoRA):
    """LoRA with shifted sparse attention in training and trainable embeddings and norms.

    Args:
        rank: Rank r of the update ``B A`` (> 0).
        alpha: Scaling numerator: the update is multiplied by ``alpha / rank``.
        dropout: Dropout on the adapter's input (0 disables the op entirely).
        targets: Module-name patterns to adapt; ``attention`` (the default, the paper's choice) is every
            projection of each block's self-attention, whatever the model calls them.
        layers: Which transformer blocks get LoRA (null: all; indices, ``"a-b"``, ``"top:k"``...).
        rslora: Rank-stabilised scaling ``alpha / sqrt(rank)``.
        init: How A and B start (``kaiming``, ``gaussian``, ``pissa``, ``olora``; see
            ``ftlab.peft.lora_init``).
        adapter_name: Name of the adapter this method creates.
        adapter_dtype: Adapter dtype; null uses the base layer's dtype.
        trainable: Extra module-name patterns to train fully.
        group_size: Tokens per attention group in training (the paper: 1/4 of the context length).
        shift: Shift half of the heads by half a group (false: plain block-local attention).
        pad_to_group: Pad a sequence that is not a multiple of ``group_size`` inside attention
            (exact for causal attention); false makes it an error.
        train_embeddings: Also train the input embeddings (and a head tied to them).
        train_norms: Also train every normalization layer.
    """

    def __init__(
        self,
        rank: int = 8,
        alpha: float = 16.0,
        dropout: float = 0.0,
        targets: list[str] = ["attention"],  # noqa: B006
        layers: list[int] | str | None = None,
        rslora: bool = False,
        init: Literal["kaiming", "gaussian", "pissa", "olora"] = "kaiming",
        adapter_name: str = "default",
        adapter_dtype: Literal["float32", "bfloat16", "float16"] | None = None,
        trainable: list[str] | None = None,
        group_size: int = 2048,
        shift: bool = True,
        pad_to_group: bool = True,
        train_embeddings: bool = True,
        train_norms: bool = True,
    ):
        super().__init__(
            rank=rank,
            alpha=alpha,
            dropout=dropout,
            targets=targets,
            layers=layers,
            rslora=rslora,
            init=init,
            adapter_name=adapter_name,
            adapter_dtype=adapter_dtype,
            trainable=trainable,
        )
        if group_size < 2:
            raise ValueError(f"group_size must be >= 2, got {group_size}")
        self.group_size, self.shift, self.pad_to_group = group_size, shift, pad_to_group
        self.train_embeddings, self.train_norms = train_embeddings, train_norms

    def apply(self, model: nn.Module) -> None:
        s2_modules(model)  # a model that cannot take S²-Attn is refused before anything changes
        super().apply(model)
        for m in self._unfrozen(model):
            m.requires_grad_(True)
        enable_s2attn(model, self.group_size, self.shift, self.pad_to_group)

    def hparams(self) -> dict[str, Any]:
        return super().hparams() | dict(
            group_size=self.group_size,
            shift=self.shift,
            pad_to_group=self.pad_to_group,
            train_embeddings=self.train_embeddings,
            train_norms=self.train_norms,
        )

    def num_parameters(self, model: nn.Module) -> int:
        """LoRA's ``r · (in + out)`` per adapted layer, plus the embeddings and norms it unfreezes."""
        unfrozen = {id(p): p.numel() for m in self._unfrozen(model) for p in m.parameters()}
        return super().num_parameters(model) + sum(unfrozen.values())

    def _unfrozen(self, model: nn.Module) -> list[nn.Module]:
        return ([model.get_input_embeddings()] if self.train_embeddings else []) + (
            norm_layers(model) if self.train_norms else []
        )

    def disabled(self, model: nn.Module) -> AbstractContextManager[None]:
        trained = [
            name
            for name, on in (("train_embeddings", self.train_embeddings), ("train_norms", self.train_norms))
            if on
        ]
        if trained:
            raise MethodError(
                f"LongLoRA with {' and '.join(trained)} trains the base itself, so switching the "
                "adapters off does not give the frozen base; set them false for a reference policy"
            )
        return super().disabled(model)

    def merge_and_unload(self, model: nn.Module) -> None:
        """Fold LoRA into the weights, drop the wrappers and restore the original attention."""
        super().merge_and_unload(model)
        disable_s2attn(model)


# ---------------------------------------------------------------------------------- functions
def norm_layers(model: nn.Module) -> list[nn.Module]:
    """LayerNorm, RMSNorm and friends (by class name, so every model family's own class counts)."""
    return [
        m
        for m in model.modules()
        if "norm" in type(m).__name__.lower() and any(True for _ in m.parameters(False))
    ]


def attention_modules(model: nn.Module) -> list[nn.Module]:
    """Each block's self-attention core: the module that calls the attention function."""
    return [model.get_submodule(b.core) for b in find_blocks(model) if b.core]


def s2_modules(model: nn.Module) -> list[nn.Module]:
    """The attention modules S²-Attn takes over; a clear error for a model that cannot take it."""
    name = type(model).__name__
    if getattr(model.config, "is_encoder_decoder", False):
        raise ValueError(
            f"LongLoRA: S²-Attn is for decoder-only models and {name} is an encoder-decoder; "
            "use LoRA (or QLoRA) for long inputs there"
        )
    modules = attention_modules(model)
    if not modules:
        raise ValueError(f"LongLoRA: no self-attention found in {name}; use LoRA")
    bidirectional = sorted({type(m).__name__ for m in modules if not getattr(m, "is_causal", False)})
    if bidirectional:
        raise ValueError(
            f"LongLoRA: S²-Attn is causal, but {', '.join(bidirectional)} attends both ways; "
            "use LoRA on encoders"
        )
    if getattr(model.config, "attn_logit_softcapping", None):
        raise ValueError(
            f"LongLoRA: {name} soft-caps its attention logits, which S²-Attn (built on SDPA) cannot; use LoRA"
        )
    return modules


def register() -> None:
    """Put S²-Attn in transformers' attention registry (idempotent), with SDPA's mask function."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(NAME, s2_attention_forward)
    if NAME not in ALL_MASK_ATTENTION_FUNCTIONS:
        AttentionMaskInterface.register(NAME, sdpa_mask)


def enable_s2attn(model: nn.Module, group_size: int, shift: bool = True, pad_to_group: bool = True) -> None:
    """Switch ``model`` to S²-Attn (in training mode; eval mode stays full attention)."""
    modules = s2_modules(model)
    config = model.config
    original = config._attn_implementation
    if original == NAME:  # applied before: keep what was there first
        original = modules[0].ftlab_s2attn.original if hasattr(modules[0], "ftlab_s2attn") else "sdpa"
    register()
    model.set_attn_implementation(NAME)
    if config._attn_implementation != NAME:
        raise ValueError(
            f"LongLoRA: {type(model).__name__} does not let transformers switch its attention function "
            "(it does not dispatch through AttentionInterface)"
        )
    settings = S2Settings(group_size, shift, pad_to_group, original)
    for m in modules:
        m.ftlab_s2attn = settings
    if not all(_dispatches(model, modules)):
        disable_s2attn(model)
        raise ValueError(
            f"LongLoRA: {type(model).__name__}'s attention does not go through transformers' "
            "AttentionInterface, "
            "so S²-Attn cannot replace it; use LoRA"
        )


def _dispatches(model: nn.Module, modules: list[nn.Module]) -> list[bool]:
    """Whether each module's attention went through ``s2_attention_forward`` in a one-token forward."""
    param = next(model.parameters())
    if param.device.type == "meta":  # nothing to run yet: trust the switch
        return [True] * len(modules)
    seen: set[int] = set()
    for m in modules:
        m.ftlab_s2attn_seen = seen
    training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(input_ids=torch.zeros(1, 1, dtype=torch.long, device=param.device), use_cache=False)
    finally:
        model.train(training)
        for m in modules:
            del m.ftlab_s2attn_seen
    return [id(m) in seen for m in modules]


def disable_s2attn(model: nn.Module) -> None:
    """Restore the attention implementation the model had before ``enable_s2attn``."""
    modules = [m for m in attention_modules(model) if hasattr(m, "ftlab_s2attn")]
    if not modules:
        return
    original = modules[0].ftlab_s2attn.original
    for m in modules:
        del m.ftlab_s2attn
    model.set_attn_implementation(original)


def s2_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """The registered attention function: S²-Attn in training, SDPA otherwise.

    ``query`` (B, H, T, D), ``key``/``value`` (B, H_kv, T, D); returns (B, T, H, D) as transformers expects.
    """
    from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward

    settings: S2Settings | None = getattr(module, "ftlab_s2attn", None)
    if (seen := getattr(module, "ftlab_s2attn_seen", None)) is not None:  # enable_s2attn checks dispatch
        seen.add(id(module))
    if settings is None or not module.training or query.shape[2] != key.shape[2]:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    groups = getattr(module, "num_key_value_groups", 1)
    key, value = repeat_kv(key, groups), repeat_kv(value, groups)  # (B, H, T, D)
    out = shifted_sparse_attention(
        query,
        key,
        value,
        settings.group_size,
        settings.shift,
        attention_mask,
        dropout,
        scaling,
        settings.pad_to_group,
    )  # (B, H, T, D)
    return out.transpose(1, 2).contiguous(), None


def shifted_sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    group_size: int,
    shift: bool = True,
    attention_mask: torch.Tensor | None = None,
    dropout: float = 0.0,
    scale: float | None = None,
    pad_to_group: bool = True,
) -> torch.Tensor:
    """S²-Attn on ``q``, ``k``, ``v`` (B, H, T, D) -> (B, H, T, D); causal within each group.

    ``attention_mask``: None (pure causal) or a 4D mask (B or 1, 1, T, T) that already includes
    causality, boolean (True = attend) or additive float, as transformers' SDPA mask function makes.
    """
    B, H, T, D = q.shape
    G = group_size
    if G > T:
        raise ValueError(
            f"S²-Attn: group_size {G} is larger than the sequence ({T} tokens); use a group_size <= {T}"
        )
    if T % G:
        if not pad_to_group:
            raise ValueError(
                f"S²-Attn: sequence length {T} is not a multiple of group_size {G} (pad_to_group is off)"
            )
        q, k, v, attention_mask = _pad_to(G * -(-T // G), q, k, v, attention_mask)
    n_shift = H // 2 if shift else 0
    parts = [
        _local_attention(
            q[:, : H - n_shift],
            k[:, : H - n_shift],
            v[:, : H - n_shift],
            attention_mask,
            G,
            0,
            dropout,
            scale,
        )
    ]
    if n_shift:
        s = slice(H - n_shift, H)
        parts.append(_local_attention(q[:, s], k[:, s], v[:, s], attention_mask, G, G // 2, dropout, scale))
    return torch.cat(parts, dim=1)[:, :, :T]  # (B, H, T, D)


def _pad_to(length: int, q, k, v, mask):
    extra = length - q.shape[2]
    q, k, v = (F.pad(t, (0, 0, 0, extra)) for t in (q, k, v))  # zeros after the last token
    if mask is not None:
        T = mask.shape[-1]
        allowed = torch.eye(length, dtype=torch.bool, device=mask.device)  # pad tokens see only themselves
        if mask.dtype == torch.bool:
            new = allowed.expand(*mask.shape[:2], length, length).clone()
        else:
            blocked = torch.finfo(mask.dtype).min
            new = (
                torch.where(allowed, 0.0, blocked)
                .to(mask.dtype)
                .expand(*mask.shape[:2], length, length)
                .clone()
            )
        new[..., :T, :T] = mask
        mask = new
    return q, k, v, mask


def _local_attention(q, k, v, mask, G: int, offset: int, dropout: float, scale: float | None) -> torch.Tensor:
    """Causal attention within [0, offset), then groups of G from ``offset``, then the rest; (B, h, T, D)."""
    B, h, T, _ = q.shape
    n = (T - offset) // G  # full groups
    lo, hi = offset, offset + n * G
    outs = []
    if lo:  # the leading half group of the shifted heads
        outs.append(_sdpa(q[:, :, :lo], k[:, :, :lo], v[:, :, :lo], _block(mask, 0, lo), dropout, scale))
    if n:  # full groups: one SDPA call, groups as extra batch rows

        def grouped(t):  # (B, h, n·G, D) -> (B·n, h, G, D)
            D = t.shape[-1]
            return t[:, :, lo:hi].reshape(B, h, n, G, D).transpose(1, 2).reshape(B * n, h, G, D)

        m = None
        if mask is not None:
            m = torch.stack(
                [_block(mask, lo + i * G, lo + (i + 1) * G) for i in range(n)], dim=1
            )  # (B|1, n, 1, G, G)
            m = m.expand(B, *m.shape[1:]).reshape(B * n, *m.shape[2:])
        o = _sdpa(grouped(q), grouped(k), grouped(v), m, dropout, scale)  # (B·n, h, G, D)
        outs.append(o.reshape(B, n, h, G, -1).transpose(1, 2).reshape(B, h, n * G, -1))
    if hi < T:  # the trailing half group
        outs.append(_sdpa(q[:, :, hi:], k[:, :, hi:], v[:, :, hi:], _block(mask, hi, T), dropout, scale))
    return torch.cat(outs, dim=2)


def _block(mask: torch.Tensor | None, a: int, b: int) -> torch.Tensor | None:
    return None if mask is None else mask[:, :, a:b, a:b]


def _sdpa(q, k, v, mask, dropout: float, scale: float | None) -> torch.Tensor:
    # No mask: is_causal lets SDPA pick its flash kernel. A mask from transformers is already causal.
    return F.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, dropout_p=dropout, scale=scale, is_causal=mask is None
    )
