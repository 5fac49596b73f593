"""Bottleneck adapters beyond the invariant table (tests/peft/test_invariants.py): placement, layer
selection, dtype, objectives, bad input."""

from __future__ import annotations

import lightning as L
import pytest
import torch

from ftlab.models.backbone import Backbone
from ftlab.peft import Adapter, TargetError
from ftlab.peft.adapter import BottleneckAdapter

SMALL_MINILM = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)

HIDDEN = {"tiny-llama": 128, "tiny-gpt2": 64, "tiny-bert": 32}
LAYERS = {"tiny-llama": 4, "tiny-gpt2": 2, "tiny-bert": 2}
WRAPPED = {  # (attention, feed-forward) output projections of block 0
    "tiny-llama": ("model.layers.0.self_attn.o_proj", "model.layers.0.mlp.down_proj"),
    "tiny-gpt2": ("transformer.h.0.attn.c_proj", "transformer.h.0.mlp.c_proj"),
    "tiny-bert": ("encoder.layer.0.attention.output.dense", "encoder.layer.0.output.dense"),
}


def output(model, ids):
    with torch.no_grad():
        return model(input_ids=ids)[0]


def perturb(model, seed=123):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=gen) * 0.05)


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gpt2", "tiny-bert"])
@pytest.mark.parametrize("placement", ["houlsby", "pfeiffer"])
def test_placement_wraps_the_output_projections(name, placement, make_model):
    model = make_model(name)
    Adapter(placement=placement).apply(model)
    modules = dict(model.named_modules())
    attn, ffn = WRAPPED[name]
    assert isinstance(modules[ffn], BottleneckAdapter)
    assert isinstance(modules[attn], BottleneckAdapter) == (placement == "houlsby")


def test_layer_selection_places_adapters_in_those_blocks(make_model):
    model = make_model("tiny-llama")
    Adapter(placement="houlsby", layers="1-2").apply(model)
    names = [n for n, m in model.named_modules() if isinstance(m, BottleneckAdapter)]
    assert names == [
        "model.layers.1.self_attn.o_proj",
        "model.layers.1.mlp.down_proj",
        "model.layers.2.self_attn.o_proj",
        "model.layers.2.mlp.down_proj",
    ]


def test_adapter_runs_in_the_base_dtype(make_model, make_batch):
    model = make_model("tiny-llama").to(torch.bfloat16)
    Adapter().apply(model)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert output(model, make_batch(model)).dtype == torch.bfloat16


@pytest.mark.parametrize(
    "backbone",
    [
        Backbone("tiny-gpt2", pretrained=False),
        Backbone("minilm", pretrained=False, config_overrides=SMALL_MINILM),
    ],
    ids=["decoder", "encoder"],
)
def test_sequence_classifier(backbone):
    from ftlab.objectives import SequenceClassifier

    L.seed_everything(0)
    model = SequenceClassifier(backbone, Adapter(placement="houlsby", reduction_factor=4), num_labels=2)
    model.configure_model()
    ids = torch.randint(5, 250, (3, 7))
    torch.nn.functional.cross_entropy(model(ids, torch.ones_like(ids)), torch.tensor([0, 1, 1])).backward()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert {n for n in trainable if not n.startswith("head.")} and all(
        n.startswith("head.") or ".up." in n or ".down." in n for n in trainable
    )
    assert all(p.grad is not None for n, p in model.named_parameters() if n in trainable)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(reduction_factor=0), "reduction_factor must be > 0, got 0"),
        (dict(bottleneck_size=-2), "bottleneck_size must be > 0, got -2"),
        (dict(placement="after_everything"), "placement must be 'houlsby' or 'pfeiffer'"),
        (dict(activation="softplus"), "activation must be one of"),
    ],
)
def test_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Adapter(**kwargs)


def test_reduction_factor_larger_than_hidden(make_model):
    with pytest.raises(ValueError, match="reduction_factor 64 is larger than the hidden size 32"):
        Adapter(reduction_factor=64).apply(make_model("tiny-bert"))


@pytest.mark.parametrize("layers", [[2], [-3], "top:3", "1-5"])
def test_layer_out_of_range(layers, make_model):
    with pytest.raises(TargetError, match="the model has 2 layers|k must be in 1..2"):
        Adapter(layers=layers).apply(make_model("tiny-gpt2"))


def test_an_exotic_model_needs_the_override_it_is_told_about():
    class Block(torch.nn.Module):  # no module that says "attention": its structure cannot be guessed
        def __init__(self):
            super().__init__()
            self.mixer = torch.nn.Linear(4, 4)
            self.dense_4h_to_h = torch.nn.Linear(4, 4)

    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.config = type("Config", (), {"hidden_size": 4, "num_hidden_layers": 2})()
            self.layers = torch.nn.ModuleList([Block(), Block()])

    with pytest.raises(
        TargetError,
        match="cannot find the attention_output projection of block layers.0 in Model; "
        "name it with Adapter's attention_output argument",
    ):
        Adapter(placement="houlsby", reduction_factor=2).apply(Model())
    model = Model()
    Adapter(placement="houlsby", reduction_factor=2, attention_output=["mixer"]).apply(model)
    wrapped = [n for n, m in model.named_modules() if isinstance(m, BottleneckAdapter)]
    assert wrapped == ["layers.0.mixer", "layers.0.dense_4h_to_h", "layers.1.mixer", "layers.1.dense_4h_to_h"]


def test_applied_twice(make_model):
    model = make_model("tiny-llama")
    Adapter().apply(model)
    with pytest.raises(ValueError, match="applied twice"):
        Adapter().apply(model)
