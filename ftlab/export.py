"""``ftlab export``: fold a trained adapter into its base and write a plain transformers model.

    ftlab export --config configs/lora.yaml --adapter runs/lora/adapter --out merged/
    ftlab export --config configs/qlora.yaml --adapter runs/qlora/adapter --out merged/ --dtype bfloat16

The base comes from the run's YAML (``model.init_args.backbone``; without ``--config``, the base
named in the adapter file). The adapter is applied to a fresh base exactly as in training and
folded in by the method's own ``merge_and_unload`` (LoRA: ``W0 + s·B A``; QLoRA:
``dequant(Q(W0)) + s·B A``, kept dense; DoRA, IA³: their merged weights; Full: the saved tensors
are the weights), and the model and its tokenizer are written with ``save_pretrained``. A method
that cannot be folded (prompt, prefix, bottleneck adapters) is one clear error.
``AutoModelForCausalLM.from_pretrained(out)`` then gives the adapted model's logits (for QLoRA
those of the 4-bit model, which the adapter was trained against).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Literal

log = logging.getLogger("ftlab")


class ExportError(ValueError):
    """An adapter or base that cannot be exported as a plain model."""


def backbone_from_config(path: str | Path):
    """The ``Backbone`` a run YAML (LightningCLI form) names under ``model.init_args.backbone``."""
    import yaml

    from ftlab.models.backbone import Backbone

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"config {path} does not exist")
    cfg = yaml.safe_load(path.read_text()) or {}
    spec = ((cfg.get("model") or {}).get("init_args") or {}).get("backbone") or {}
    if isinstance(spec, dict) and "init_args" in spec:  # written with a class_path
        spec = spec["init_args"]
    return Backbone(**spec)


def merge_into_base(model, method) -> None:
    """Fold ``method`` (already applied and loaded on ``model``) into the base weights, in place."""
    from ftlab.peft.method import MethodError

    try:
        method.merge_and_unload(model)
    except MethodError as err:
        raise ExportError(str(err)) from None


#: Written into every export: what it was made from, and the mark that ``--out`` may replace it.
MARKER = "ftlab_export.json"


def check_out(out: Path, adapter: Path, overwrite: bool) -> None:
    """``out`` may be new, empty, a previous export, or anything with ``overwrite`` -- but never the
    adapter's own folder or one that holds it (a run directory): replacing it would delete the adapter."""
    if out.resolve() == adapter.resolve() or out.resolve() in adapter.resolve().parents:
        raise ExportError(f"--out {out} holds the adapter {adapter}: write the export to another folder")
    if out.is_file():
        raise ExportError(f"--out {out} is a file; give a folder for the exported model")
    if out.is_dir() and any(out.iterdir()) and not (out / MARKER).exists() and not overwrite:
        raise ExportError(
            f"--out {out} is a folder with other files in it (not an earlier export); choose an empty "
            "or new folder, or pass --overwrite to replace it"
        )


def model_kind(objective: str, adapter: Path) -> str:
    """The kind of plain model (``causal_lm``, ``seq2seq_lm``) the adapter's objective trains: its
    ``export_kind``. Files that name no objective are causal LMs."""
    import importlib

    if not objective:
        return "causal_lm"
    module, _, name = objective.rpartition(".")
    cls = getattr(importlib.import_module(module), name, None) if module.startswith("ftlab.") else None
    kind = getattr(cls, "export_kind", None)
    if kind is None:
        raise ExportError(
            f"{adapter} was trained by {objective}, which has no plain-model form to export "
            "(export writes the models of CausalLM and Seq2SeqLM adapters)"
        )
    return kind


def export(
    adapter: str | Path,
    out: str | Path,
    backbone=None,
    dtype: str | None = None,
    overwrite: bool = False,
) -> Path:
    """Write ``backbone`` + ``adapter`` merged to ``out`` (model and tokenizer); returns ``out``.

    ``out`` is replaced only if it is new, empty or an earlier export, unless ``overwrite``.
    """
    import json

    import torch

    from ftlab.models.backbone import Backbone
    from ftlab.peft import io

    adapter, out = Path(adapter), Path(out)
    if not adapter.is_dir():
        raise ExportError(f"--adapter {adapter}: no such adapter folder")
    check_out(out, adapter, overwrite)
    peft_format = (adapter / io.PEFT_CONFIG).exists()
    meta: dict[str, Any] = {}
    kind = "causal_lm"
    if not peft_format:
        meta, _ = io.read_adapter(adapter)
        kind = model_kind(meta.get("extra", {}).get("objective", ""), adapter)
    if backbone is None:
        name = meta.get("base", {}).get("name_or_path")
        if not name:
            raise ExportError("say which base to load: --config <run yaml>")
        backbone = Backbone(name_or_path=name)
    if _random_init(backbone):
        raise ExportError(
            f"backbone {backbone.name_or_path!r} is randomly initialised (pretrained: false or "
            "config_overrides): "
            "its weights cannot be rebuilt, so the export would not match the trained model"
        )
    model = backbone.load(kind)
    if peft_format:
        method = io.load_peft_adapter(adapter, model)
    else:
        method, extra = io.load_adapter(adapter, model, backbone.fingerprint(model))
        if extra:
            raise ExportError(
                f"{adapter} holds objective heads ({', '.join(sorted(extra))[:80]}): not a causal LM adapter"
            )
    merge_into_base(model, method)
    model.eval()
    if dtype:
        model.to(getattr(torch, dtype))
    with io.atomic_dir(out) as tmp:
        model.save_pretrained(tmp)
        backbone.tokenizer().save_pretrained(tmp)
        (tmp / MARKER).write_text(
            json.dumps({"adapter": str(adapter), "base": backbone.name_or_path, "dtype": dtype}, indent=2)
        )
    log.info("exported %s merged into %s to %s", adapter, backbone.name_or_path, out)
    return Path(out)


def _random_init(backbone) -> bool:
    preset_random = backbone.name_or_path == "tiny-gpt2" or (
        backbone.name_or_path == "tiny-llama" and bool(backbone.config_overrides)
    )
    return not backbone.pretrained or preset_random


def main(argv: list[str] | None = None) -> None:
    """``ftlab export`` entry point (registered in ``ftlab.cli.EXTRA_COMMANDS``)."""
    from jsonargparse import ArgumentParser

    parser = ArgumentParser(prog="ftlab export", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--config",
        type=str | None,
        default=None,
        help="Run YAML whose model.init_args.backbone is the base (default: the adapter's base).",
    )
    parser.add_argument(
        "--adapter", type=str, required=True, help="Adapter directory (ftlab or PEFT format)."
    )
    parser.add_argument("--out", type=str, required=True, help="Output directory for save_pretrained.")
    parser.add_argument(
        "--dtype",
        type=Literal["float32", "bfloat16", "float16"] | None,
        default=None,
        help="Dtype of the written weights (default: the base's).",
    )
    parser.add_argument(
        "--overwrite",
        type=bool,
        default=False,
        help="Replace --out even if it holds files that are not an earlier export.",
    )
    args = parser.parse_args(argv)
    backbone = backbone_from_config(args.config) if args.config else None
    path = export(args.adapter, args.out, backbone, args.dtype, args.overwrite)
    print(f"ftlab: merged model written to {path}")
