"""QLoRA: Efficient Finetuning of Quantized LLMs (Dettmers et al., 2023, arXiv:2305.14314).

The frozen base's linear maps are stored in 4 bits: blockwise (``blocksize`` values share one
absmax scale) NF4 or FP4 codes, the absmax scales themselves optionally quantized to 8 bits
("double quantization"). They are dequantized to the compute dtype on the fly, and LoRA trains
beside them:

    h = dequant(Q(W0)) x + s · B A x,     s = alpha / r

Route: this method quantizes an already loaded model inside ``apply(model)`` (bitsandbytes
``Linear4bit`` / ``Params4bit``), rather than asking transformers for a ``BitsAndBytesConfig``
at load time. Objectives call ``backbone.load(kind)`` and then ``method.apply(model)``; a
load-time config would make the backbone (or the objective) depend on the method, and would not
reach ftlab's presets, which are built from a config, not loaded. Quantizing in ``apply`` keeps
every objective and backbone unchanged and also works on a model that is already built (adapter
reloads, tests). The cost: the dense model is in host memory once before its layers are
replaced one by one (a GPU never holds the dense weights: Lightning moves the model after
``configure_model``). A model quantized at load time by transformers also works: its
``Linear4bit`` layers are kept as they are and LoRA goes on top.

The LoRA part is ``ftlab.peft.lora`` itself: ``LoRALinear`` wraps a ``Linear4bit`` and takes the
adapter dtype from its ``compute_dtype``.

Merge (``merge``): dequantize each 4-bit layer, add ``s · B A``, then re-quantize with the same
settings (``requantize=True``; adds a second rounding) or keep dense layers (what ``ftlab export``
writes).

CPU: bitsandbytes >= 0.45 runs 4-bit forward and backward on CPU. On CPUs with AVX512-BF16 an
eval-mode forward under ``no_grad`` (Lightning's sanity check) repacks the 4-bit weights in place,
after which LoRA gradients are silently zero; ``support_avx512bf16_for_cpu = False`` is set on
every ``Linear4bit`` here to keep the training layout. bitsandbytes' optimizers take the usual
YAML form (``optimizer: {class_path: bitsandbytes.optim.PagedAdamW8bit, init_args: {lr: 2e-4}}``).
On CPU they run: 8-bit state works, and "paged" falls back to ordinary (unpaged) memory with a
warning. Tensors under 4096 values keep 32-bit state (bitsandbytes' ``min_8bit_size``).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from ftlab.peft.layers import dense_weight, is_4bit, is_conv1d, linear_kinds
from ftlab.peft.lora import LoRA, lora_layers, unwrap
from ftlab.peft.lora import merge as lora_merge
from ftlab.peft.targets import find_targets, set_submodule

log = logging.getLogger("ftlab")

Dtype = Literal["float32", "bfloat16", "float16"]
PIP_HINT = "QLoRA needs bitsandbytes (a dependency of ftlab): pip install 'bitsandbytes>=0.45'"


class QuantizationError(ValueError):
    """A model or setting that cannot be quantized as asked."""


def bitsandbytes():
    """Import bitsandbytes, or fail with one line that says how to install it."""
    try:
        import bitsandbytes as bnb
    except ImportError as err:
        raise ImportError(PIP_HINT) from err
    return bnb


@dataclass
class QuantReport:
    """What ``quantize`` did: layers replaced and the bytes of their weights before and after."""

    layers: int
    bytes_before: int
    bytes_after: int

    @property
    def ratio(self) -> float:
        return self.bytes_before / max(self.bytes_after, 1)

    def __str__(self) -> str:
        if not self.layers:
            return "no dense linear layers left to quantize (the model is already 4-bit)"
        mib = 2**20
        return (
            f"{self.layers} linear layers to 4 bits: weights {self.bytes_before / mib:.2f} MiB -> "
            f"{self.bytes_after / mib:.2f} MiB ({self.ratio:.2f}x smaller)"
        )


class QLoRA(LoRA):
    """LoRA on a base whose linear layers are quantized to 4 bits (bitsandbytes).

    Args:
        rank: Rank r of the update ``B A`` (> 0).
        alpha: Scaling numerator: the update is multiplied by ``alpha / rank``.
        dropout: Dropout on the adapter's input (0 disables the op entirely).
        targets: Module-name patterns that get LoRA (default: every linear layer in the blocks, as
            in the paper).
        layers: Which transformer blocks get LoRA (null: all; indices, ``"a-b"``, ``"top:k"``...).
        rslora: Rank-stabilised scaling ``alpha / sqrt(rank)``.
        init: How A and B start (``kaiming``, ``gaussian``, ``pissa``, ``olora``; see
            ``ftlab.peft.lora_init``). PiSSA/OLoRA quantize the residual ``W0 - s·B A``.
        adapter_name: Name of the adapter this method creates.
        adapter_dtype: Adapter dtype; null uses the 4-bit layers' compute dtype.
        trainable: Extra module-name patterns to train fully (e.g. ``lm_head``).
        quant_type: 4-bit data type: ``nf4`` (normal float, the paper's) or ``fp4``.
        double_quant: Quantize the absmax scales too (about 0.37 bits per weight saved).
        compute_dtype: Dtype the 4-bit weights are dequantized to for each matmul; null takes the
            base weights' dtype.
        quant_storage: Dtype of the tensor that stores the packed codes (a float dtype lets FSDP
            shard it beside the other parameters).
        blocksize: Values per absmax scale (64 in the paper; 32..4096, a power of two).
        quantize: Module-name patterns to quantize (``all-linear``: every linear layer inside
            the transformer blocks, so heads stay dense).
        keep_dense: Module-name patterns never quantized, whatever ``quantize`` matches.
    """

    def __init__(
        self,
        rank: int = 16,
        alpha: float = 32.0,
        dropout: float = 0.0,
        targets: list[str] = ["all-linear"],  # noqa: B006 - jsonargparse needs a literal default
        layers: list[int] | str | None = None,
        rslora: bool = False,
        init: Literal["kaiming", "gaussian", "pissa", "olora"] = "kaiming",
        adapter_name: str = "default",
        adapter_dtype: Dtype | None = None,
        trainable: list[str] | None = None,
        quant_type: Literal["nf4", "fp4"] = "nf4",
        double_quant: bool = True,
        compute_dtype: Dtype | None = None,
        quant_storage: Literal["uint8", "bfloat16", "float16", "float32"] = "uint8",
        blocksize: int = 64,
        quantize: list[str] = ["all-linear"],  # noqa: B006
        keep_dense: list[str] = ["lm_head", "score", "classifier"],  # noqa: B006
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
        if quant_type not in ("nf4", "fp4"):
            raise ValueError(f"quant_type must be 'nf4' or 'fp4', got {quant_type!r}")
        if blocksize < 32 or blocksize > 4096 or blocksize & (blocksize - 1):
            raise ValueError(f"blocksize must be a power of two in 32..4096, got {blocksize}")
        self.quant_type, self.double_quant, self.blocksize = quant_type, double_quant, blocksize
        self.compute_dtype, self.quant_storage = compute_dtype, quant_storage
        self.quantize, self.keep_dense = list(quantize), list(keep_dense)
        self.report: QuantReport | None = None

    def apply(self, model: nn.Module) -> None:
        self.report = quantize(
            model,
            self.quantize,
            self.keep_dense,
            self.quant_type,
            self.double_quant,
            getattr(torch, self.compute_dtype) if self.compute_dtype else None,
            getattr(torch, self.quant_storage),
            self.blocksize,
        )
        log.info("QLoRA: %s", self.report)
        super().apply(model)

    def hparams(self) -> dict[str, Any]:
        return super().hparams() | dict(
            quant_type=self.quant_type,
            double_quant=self.double_quant,
            compute_dtype=self.compute_dtype,
            quant_storage=self.quant_storage,
            blocksize=self.blocksize,
            quantize=self.quantize,
            keep_dense=self.keep_dense,
        )

    def merge_and_unload(self, model: nn.Module) -> None:
        """Fold the adapter into dense weights and drop the wrappers: a plain transformers model."""
        merge(model, self.adapter_name, requantize=False)


# ---------------------------------------------------------------------------------- functions
def weight_bytes(module: nn.Module) -> int:
    """Bytes that hold ``module.weight``: the packed codes plus the quantization statistics."""
    w = module.weight
    n = w.numel() * w.element_size()
    qs = getattr(w, "quant_state", None)
    while qs is not None:  # absmax, code book, offset; then the same for the double-quantized absmax
        n += sum(t.numel() * t.element_size() for t in (qs.absmax, qs.code, qs.offset) if t is not None)
        qs = qs.state2
    return n


def linear_weight_bytes(model: nn.Module) -> int:
    """Bytes of every linear layer's weight in ``model`` (dense, 4-bit or GPT-2 ``Conv1D``)."""
    seen, total = set(), 0
    for m in model.modules():
        if isinstance(m, linear_kinds()) and id(m.weight) not in seen:
            seen.add(id(m.weight))
            total += weight_bytes(m)
    return total


def quantize(
    model: nn.Module,
    targets: Sequence[str] = ("all-linear",),
    keep_dense: Sequence[str] = (),
    quant_type: str = "nf4",
    double_quant: bool = True,
    compute_dtype: torch.dtype | None = None,
    quant_storage: torch.dtype = torch.uint8,
    blocksize: int = 64,
) -> QuantReport:
    """Replace the matching dense linear layers of ``model`` by frozen bitsandbytes ``Linear4bit``.

    Layers whose weight is shared (e.g. an LM head tied to the embeddings) stay dense: replacing
    them would untie them. Already quantized layers are kept (and made safe for CPU training).
    """
    bnb = bitsandbytes()
    existing = [m for m in model.modules() if is_4bit(m)]
    for m in existing:
        m.support_avx512bf16_for_cpu = False
    dense = [(n, m) for n, m in model.named_modules() if isinstance(m, linear_kinds()) and not is_4bit(m)]
    if not dense and not existing:
        kinds = sorted({type(m).__name__ for m in model.modules() if not list(m.children())})
        raise QuantizationError(
            f"QLoRA found no linear layers to quantize in {type(model).__name__} (leaf modules: "
            f"{', '.join(kinds)})"
        )
    chosen = {n for n, _ in find_targets(model, targets, kinds=linear_kinds())}
    # and what the model itself keeps in full precision (T5's ``wo``: its code casts to that weight's dtype)
    keep_dense = [*keep_dense, *(getattr(model, "_keep_in_fp32_modules", None) or [])]
    chosen -= {n for p in keep_dense for n, _ in _matching(model, p)}
    shared = _shared_weights(model)
    todo = []
    for name, module in dense:
        if name not in chosen:
            continue
        if id(module.weight) in shared:
            log.warning("QLoRA: %s shares its weight with another module (tied); it stays dense", name)
            continue
        todo.append((name, module))
    if not todo and existing:  # quantized at load time (transformers' BitsAndBytesConfig): keep it
        return QuantReport(0, 0, 0)
    if not todo:
        raise QuantizationError(
            f"QLoRA: quantize={list(targets)} minus keep_dense={list(keep_dense)} leaves no layer"
        )
    before = after = 0
    for name, module in todo:
        before += weight_bytes(module)
        q = _to_4bit(bnb, module, quant_type, double_quant, compute_dtype, quant_storage, blocksize)
        after += weight_bytes(q)
        set_submodule(model, name, q)
    return QuantReport(len(todo), before, after)


def _matching(model: nn.Module, pattern: str) -> list[tuple[str, nn.Module]]:
    try:
        return find_targets(model, pattern, kinds=(nn.Module,))
    except ValueError:  # a keep_dense name this model does not have (e.g. ``score`` on a causal LM)
        return []


def _shared_weights(model: nn.Module) -> set[int]:
    count: dict[int, int] = {}
    for _, p in model.named_parameters(remove_duplicate=False):
        count[id(p)] = count.get(id(p), 0) + 1
    return {i for i, c in count.items() if c > 1}


def _to_4bit(
    bnb,
    module: nn.Module,
    quant_type: str,
    double_quant: bool,
    compute_dtype: torch.dtype | None,
    quant_storage: torch.dtype,
    blocksize: int,
) -> nn.Module:
    conv1d = is_conv1d(module)
    w = module.weight.detach()
    w = w.T if conv1d else w  # (out, in): Linear4bit's layout
    out_f, in_f = w.shape
    q = bnb.nn.Linear4bit(
        in_f,
        out_f,
        bias=module.bias is not None,
        compute_dtype=compute_dtype or w.dtype,
        compress_statistics=double_quant,
        quant_type=quant_type,
        quant_storage=quant_storage,
        device="meta",
    )
    q.weight = bnb.nn.Params4bit(
        w.contiguous(),
        requires_grad=False,
        blocksize=blocksize,
        compress_statistics=double_quant,
        quant_type=quant_type,
        quant_storage=quant_storage,
        module=q,
    ).to(w.device)  # quantizes here
    if module.bias is not None:
        q.bias = nn.Parameter(module.bias.detach().clone(), requires_grad=False)
    q.support_avx512bf16_for_cpu = False  # DESIGN.md: eval-mode repacking breaks later training steps
    q.ftlab_conv1d = conv1d  # dequantize gives a Conv1D back, so the checkpoint layout is unchanged
    q.train(module.training)
    return q


def dequantize(model: nn.Module, dtype: torch.dtype | None = None) -> list[str]:
    """Replace every ``Linear4bit`` by a frozen dense layer (``nn.Linear``, or ``Conv1D`` where it
    was one) holding its dequantized weight in ``dtype`` (default: the dtype it was quantized from).

    Returns the names of the replaced modules.
    """
    names = []
    for name, m in list(model.named_modules()):
        if not is_4bit(m):
            continue
        w = dense_weight(m)  # (out, in)
        w = w.to(dtype or w.dtype)
        if getattr(m, "ftlab_conv1d", False):
            from transformers.pytorch_utils import Conv1D

            dense = Conv1D(m.out_features, m.in_features).to(device=w.device, dtype=w.dtype)
            dense.weight = nn.Parameter(w.T.contiguous(), requires_grad=False)
        else:
            dense = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None, device="meta")
            dense.weight = nn.Parameter(w, requires_grad=False)
        if m.bias is not None:
            dense.bias = nn.Parameter(m.bias.detach().to(w.dtype).clone(), requires_grad=False)
        dense.train(m.training)
        set_submodule(model, name, dense)
        names.append(name)
    return names


def merge(model: nn.Module, name: str | None = None, requantize: bool = False) -> None:
    """Fold the LoRA adapter into the base and remove the ``LoRALinear`` wrappers.

    Each 4-bit layer is dequantized, ``s · B A`` is added in the dequantized dtype, and the sum is
    re-quantized with the layer's own settings (``requantize=True``: a second rounding, so the result
    is close to, not equal to, the adapted model) or kept dense (``False``: equal to the adapted
    model up to float rounding).
    """
    settings = {}
    for n, m in model.named_modules():
        if is_4bit(m):
            w = m.weight
            settings[n.removesuffix(".base")] = dict(
                quant_type=w.quant_type,
                double_quant=w.compress_statistics,
                compute_dtype=m.compute_dtype,
                quant_storage=w.quant_storage,
                blocksize=w.blocksize,
            )
    dequantize(model)
    if any(True for _ in lora_layers(model)):
        lora_merge(model, name)
        unwrap(model)
    if requantize and settings:
        bnb = bitsandbytes()
        for n, kw in settings.items():
            set_submodule(model, n, _to_4bit(bnb, model.get_submodule(n), **kw))
