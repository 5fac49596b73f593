"""Shared fixtures: tiny seeded models built in-process from configs (no network, no weight files).

Models come back in ``eval()`` mode so dropout never makes two forwards differ; a test that trains
switches to ``train()`` itself. Each fixture builds a fresh model, so tests may mutate it freely;
``make_model`` builds more (e.g. a second, identical "fresh base" for save/load round trips).
"""

from __future__ import annotations

import os

# huggingface_hub reads this once at import time: set it before anything imports it.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# Tiny models gain nothing from intra-op threads, and on a busy 2-core machine OpenMP's spinning
# threads made these tests ~7x slower. Subprocesses (CLI runs) inherit the setting.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest
import torch

torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
#: Where ``make_model`` puts models: ``FTLAB_TEST_DEVICE=cuda`` runs the model-level tests on a GPU
#: (benchmarks/gpu_check.sh does, for the QLoRA tests); CPU otherwise.
DEVICE = torch.device(os.environ.get("FTLAB_TEST_DEVICE", "cpu"))


def nli_tsv(path, premises: int) -> str:
    """Write an SNLI-style TSV at ``path``: each premise with an entailed and a contradicted hypothesis."""
    lines = ["premise\thypothesis\tlabel"]
    for i in range(premises):
        lines += [
            f"Man {i} sleeps .\tPerson {i} rests .\tentailment",
            f"Man {i} sleeps .\tMan {i} runs .\tcontradiction",
        ]
    path.write_text("\n".join(lines) + "\n")
    return str(path)


TINY_BERT = dict(
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=2,
    intermediate_size=64,
    vocab_size=100,
)


def _build(name: str, seed: int = 0, **config_overrides) -> torch.nn.Module:
    torch.manual_seed(seed)
    if name == "tiny-bert":
        from transformers import AutoModel, BertConfig

        model = AutoModel.from_config(BertConfig(**{**TINY_BERT, **config_overrides}))
    else:
        from ftlab.models.backbone import Backbone

        backbone = Backbone(name, pretrained=False, config_overrides=config_overrides or None)
        model = backbone.load("causal_lm")
    return model.to(DEVICE).eval()


@pytest.fixture(autouse=True)
def _no_wandb(monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "disabled")


@pytest.fixture
def make_model():
    """``make_model(name, seed=0, **config_overrides)``: ``tiny-llama``, ``tiny-gpt2`` or ``tiny-bert``.

    The same name, seed and overrides always give the same weights.
    """
    return _build


@pytest.fixture
def tiny_llama():
    """4-layer byte-level Llama (hidden 128), random init from seed 0."""
    return _build("tiny-llama")


@pytest.fixture
def tiny_gpt2():
    """2-layer byte-level GPT-2 (hidden 64, Conv1D c_attn/c_proj/c_fc), random init from seed 0."""
    return _build("tiny-gpt2")


@pytest.fixture
def tiny_bert():
    """2-layer BERT encoder (hidden 32, 2 heads, vocab 100), random init from seed 0."""
    return _build("tiny-bert")


@pytest.fixture
def make_batch():
    """``make_batch(model, batch=2, length=12, seed=1)``: random ``input_ids`` in the model's vocabulary,
    on the model's device."""

    def make(model: torch.nn.Module, batch: int = 2, length: int = 12, seed: int = 1) -> torch.Tensor:
        gen = torch.Generator().manual_seed(seed)
        ids = torch.randint(0, model.config.vocab_size, (batch, length), generator=gen)
        return ids.to(next(model.parameters()).device)

    return make
