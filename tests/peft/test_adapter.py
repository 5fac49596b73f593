"""Bottleneck adapters: the invariant table (unchanged at init, gradients and counts, save/load,
disabling), placement, layer selection, objectives, bad input."""

from __future__ import annotations

import lightning as L
import pytest
import torch

from ftlab.callbacks import parameter_table
from ftlab.models.backbone import Backbone
from ftlab.peft import Adapter, TargetError, count_parameters
from ftlab.peft.adapter import BottleneckAdapter, adapter_layers, disable_adapters, find_sublayers
from ftlab.peft.io import load_adapter, save_adapter

SMALL_MINILM = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)

HIDDEN = {"tiny-llama": 128, "tiny-gpt2": 64, "tiny-bert": 32}
LAYERS = {"tiny-llama": 4, "tiny-gpt2": 2, "tiny-bert": 2}
WRAPPED = {  # (attention, feed-forward) output projections of block 0
    "tiny-llama": ("model.layers.0.self_attn.o_proj", "model.layers.0.mlp.down_proj"),
    "tiny-gpt2": ("transformer.h.0.attn.c_proj", "transformer.h.0.mlp.c_proj"),
    "tiny-bert": ("encoder.layer.0.attention.output.dense", "encoder.layer.0.output.dense"),
}


def per_adapter(hidden: int, b: int) -> int:
    return 2 * hidden * b + b + hidden


CASES = [  # (id, model, method, adapters, bottleneck)
    ("llama-pfeiffer", "tiny-llama", lambda: Adapter(), 4, 8),
    ("llama-houlsby-top2-gelu", "tiny-llama",
     lambda: Adapter(placement="houlsby", reduction_factor=4, layers="top:2", activation="gelu"), 4, 32),
    ("gpt2-houlsby", "tiny-gpt2", lambda: Adapter(placement="houlsby", bottleneck_size=5), 4, 5),
    ("gpt2-pfeiffer-last", "tiny-gpt2", lambda: Adapter(reduction_factor=2, layers=[-1]), 1, 32),
    ("bert-houlsby", "tiny-bert", lambda: Adapter(placement="houlsby", reduction_factor=8), 4, 4),
    ("bert-pfeiffer-explicit", "tiny-bert", lambda: Adapter(reduction_factor=32, layers=[0]), 1, 1),
]


def cases(fn):
    return pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])(fn)


def output(model, ids):
    with torch.no_grad():
        return model(input_ids=ids)[0]


def perturb(model, seed=123):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=gen) * 0.05)


@cases
def test_apply_leaves_outputs_exactly_unchanged(case, make_model, make_batch):
    _, name, method, _, _ = case
    model = make_model(name)
    ids = make_batch(model)
    before = output(model, ids)
    method().apply(model)
    assert torch.equal(output(model, ids), before)


@cases
def test_only_adapters_train_and_count_matches_formula(case, make_model, make_batch):
    _, name, make, n_adapters, b = case
    model = make_model(name)
    total = sum(p.numel() for p in model.parameters())
    method = make()
    method.apply(model)
    perturb(model)  # up = 0 would give down a zero gradient
    model.train()
    sum(v.float().pow(2).mean() for v in model(input_ids=make_batch(model)).values()
        if isinstance(v, torch.Tensor)).backward()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert {n for n, p in model.named_parameters() if p.grad is not None} == trainable
    assert all(n.endswith((".down.weight", ".down.bias", ".up.weight", ".up.bias")) for n in trainable)
    assert all(p.grad.abs().sum() > 0 for n, p in model.named_parameters() if n in trainable)
    formula = n_adapters * per_adapter(HIDDEN[name], b)
    assert len(list(adapter_layers(model))) == n_adapters
    assert method.num_parameters(model) == formula
    assert count_parameters(model) == (formula, total + formula)
    assert ".down.weight" in parameter_table(model)[0]


@cases
def test_disable_adapters_gives_base_output(case, make_model, make_batch):
    _, name, method, _, _ = case
    model = make_model(name)
    ids = make_batch(model)
    base = output(model, ids)
    method().apply(model)
    perturb(model)
    adapted = output(model, ids)
    assert (adapted - base).abs().max() > 1e-4
    with disable_adapters(model):
        assert torch.equal(output(model, ids), base)
    assert torch.equal(output(model, ids), adapted)
    with pytest.raises(ZeroDivisionError), disable_adapters(model):
        1 / 0
    assert all(m.enabled for m in adapter_layers(model))


@cases
def test_save_load_round_trip(case, make_model, make_batch, tmp_path):
    _, name, make, _, _ = case
    model = make_model(name)
    ids = make_batch(model)
    method = make()
    method.apply(model)
    perturb(model)
    fp = {"name_or_path": name, "digest": "x"}
    path = save_adapter(tmp_path / "a", model, method, fp)
    fresh = make_model(name)
    loaded, _ = load_adapter(path, fresh, fp)
    assert type(loaded) is Adapter and loaded.hparams() == method.hparams()
    assert torch.equal(output(fresh, ids), output(model, ids))
    for (n, p), (n2, p2) in zip(model.named_parameters(), fresh.named_parameters()):
        assert n == n2 and p.requires_grad == p2.requires_grad and torch.equal(p, p2), n


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gpt2", "tiny-bert"])
@pytest.mark.parametrize("placement", ["houlsby", "pfeiffer"])
def test_placement_wraps_the_output_projections(name, placement, make_model):
    model = make_model(name)
    Adapter(placement=placement).apply(model)
    modules = dict(model.named_modules())
    attn, ffn = WRAPPED[name]
    assert isinstance(modules[ffn], BottleneckAdapter)
    assert isinstance(modules[attn], BottleneckAdapter) == (placement == "houlsby")
    family = {"tiny-llama": "llama", "tiny-gpt2": "gpt2", "tiny-bert": "bert"}[name]
    assert find_sublayers(make_model(name))[0] == family


def test_layer_selection_places_adapters_in_those_blocks(make_model):
    model = make_model("tiny-llama")
    Adapter(placement="houlsby", layers="1-2").apply(model)
    names = [n for n, m in model.named_modules() if isinstance(m, BottleneckAdapter)]
    assert names == ["model.layers.1.self_attn.o_proj", "model.layers.1.mlp.down_proj",
                     "model.layers.2.self_attn.o_proj", "model.layers.2.mlp.down_proj"]


def test_adapter_runs_in_the_base_dtype(make_model, make_batch):
    model = make_model("tiny-llama").to(torch.bfloat16)
    Adapter().apply(model)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert output(model, make_batch(model)).dtype == torch.bfloat16


@pytest.mark.parametrize("backbone", [
    Backbone("tiny-gpt2", pretrained=False),
    Backbone("minilm", pretrained=False,
             config_overrides=SMALL_MINILM),
], ids=["decoder", "encoder"])
def test_sequence_classifier(backbone):
    from ftlab.objectives import SequenceClassifier

    L.seed_everything(0)
    model = SequenceClassifier(backbone, Adapter(placement="houlsby", reduction_factor=4), num_labels=2)
    model.configure_model()
    ids = torch.randint(5, 250, (3, 7))
    torch.nn.functional.cross_entropy(model(ids, torch.ones_like(ids)), torch.tensor([0, 1, 1])).backward()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert {n for n in trainable if not n.startswith("head.")} and all(
        n.startswith("head.") or ".up." in n or ".down." in n for n in trainable)
    assert all(p.grad is not None for n, p in model.named_parameters() if n in trainable)


def test_causal_lm_trains_the_adapters(tmp_path):
    from ftlab.data import InstructionData
    from ftlab.objectives import CausalLM

    L.seed_everything(0)
    model = CausalLM(Backbone(pretrained=False), Adapter(placement="houlsby"),
                     optimizer=lambda p: torch.optim.AdamW(p, lr=1e-2), exact_match=False)
    dm = InstructionData(template="alpaca_short", max_length=96, batch_size=8, synthetic_train_size=32,
                         synthetic_val_size=4, tokenizer="tiny-llama")
    dm.setup()
    batch = next(iter(dm.train_dataloader()))
    model.configure_model()
    with torch.no_grad():
        loss0 = model._loss(batch).item()
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, max_steps=8,
                        limit_val_batches=0, default_root_dir=tmp_path)
    trainer.fit(model, dm)
    with torch.no_grad():
        assert model._loss(batch).item() < loss0


@pytest.mark.parametrize("kwargs, message", [
    (dict(reduction_factor=0), "reduction_factor must be > 0, got 0"),
    (dict(bottleneck_size=-2), "bottleneck_size must be > 0, got -2"),
    (dict(placement="after_everything"), "placement must be 'houlsby' or 'pfeiffer'"),
    (dict(activation="softplus"), "activation must be one of"),
])
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


def test_unknown_architecture_names_what_was_expected():
    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.attention = torch.nn.Linear(4, 4)
            self.dense_4h_to_h = torch.nn.Linear(4, 4)

    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.config = type("Config", (), {"hidden_size": 4, "num_hidden_layers": 2})()
            self.layers = torch.nn.ModuleList([Block(), Block()])

    with pytest.raises(TargetError) as err:
        Adapter(reduction_factor=2).apply(Model())
    message = str(err.value)
    assert "does not know the block structure of Model" in message
    assert "'self_attn.o_proj' + 'mlp.down_proj'" in message and "'attn.c_proj'" in message
    assert "'attention.output.dense' + 'output.dense'" in message


def test_applied_twice(make_model):
    model = make_model("tiny-llama")
    Adapter().apply(model)
    with pytest.raises(ValueError, match="applied twice"):
        Adapter().apply(model)
