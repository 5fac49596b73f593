"""Prefix tuning beyond the invariant table: exactness against real cached tokens, masks, zero length,
gradient checkpointing, generation, the MLP and folding, objectives, bad input."""

from __future__ import annotations

import lightning as L
import pytest
import torch

from ftlab.models.backbone import Backbone
from ftlab.peft import PrefixTuning, TargetError
from ftlab.peft.io import load_adapter, save_adapter
from ftlab.peft.prefix import disable_prefix, extend_mask, prefix_module

SMALL_MINILM = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)
CPU = torch.device("cpu")


def greedy(model, ids, mask, **kwargs):
    kwargs = dict(max_new_tokens=5, do_sample=False, pad_token_id=256, **kwargs)
    return model.generate(input_ids=ids, attention_mask=mask, **kwargs)


def _model(name, attn):
    torch.manual_seed(0)
    return Backbone(name, pretrained=False, attn_implementation=attn).load("causal_lm").eval()


def _set_prefix(model, keys_values):
    """Plain prefixes from per-layer (k, v), each (heads, P, d)."""
    with torch.no_grad():
        prefix_module(model).prefix.copy_(torch.stack([torch.stack(kv) for kv in keys_values]))


def _zero_length(model):
    enc = prefix_module(model)
    enc.prefix = torch.nn.Parameter(enc.prefix[:, :, :, :0].detach().clone())
    enc.length = 0


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gpt2"])
def test_prefix_of_cached_real_tokens_equals_reading_those_tokens(name, attn):
    """A prefix holding the cached keys/values of tokens ``a`` makes the model read ``[a ; x]``:
    the check that the keys are placed after rotary embeddings and the mask is widened right."""
    model = _model(name, attn)
    n, t = 3, 6
    a, x = torch.randint(0, 256, (1, n)), torch.randint(0, 256, (2, t))
    mask = torch.ones_like(x)
    mask[0, :2] = 0  # left padding
    full = torch.cat([a.expand(2, -1), x], 1)
    full_mask = torch.cat([torch.ones(2, n, dtype=torch.long), mask], 1)
    expected = model(input_ids=full, attention_mask=full_mask).logits[:, n:]
    expected_no_mask = model(input_ids=full).logits[:, n:]
    cache = model(input_ids=a, use_cache=True).cache
    PrefixTuning(num_virtual_tokens=n).apply(model)
    _set_prefix(model, [(layer.keys[0], layer.values[0]) for layer in cache.layers])
    pos = torch.arange(n, n + t)[None]  # the real tokens sit after the prefix tokens, as in [a ; x]
    got = model(input_ids=x, attention_mask=mask, position_ids=pos).logits
    torch.testing.assert_close(got[1], expected[1], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got[0, 2:], expected[0, 2:], atol=1e-5, rtol=1e-5)
    # no mask at all: SDPA's implicit causal mask is rebuilt with the prefix columns visible
    got = model(input_ids=x, position_ids=pos).logits
    torch.testing.assert_close(got, expected_no_mask, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gpt2", "tiny-bert"])
def test_zero_length_prefix_and_disabled_prefix_are_the_base_model(name, attn, make_model, make_batch):
    model = _model(name, attn) if name != "tiny-bert" else make_model(name)
    ids = make_batch(model, length=8)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    base = [model(input_ids=ids)[0], model(input_ids=ids, attention_mask=mask)[0]]
    PrefixTuning(num_virtual_tokens=4).apply(model)
    out = model(input_ids=ids, attention_mask=mask)[0]
    assert out.shape == base[1].shape and (out - base[1]).abs().max() > 1e-4  # the prefix is read
    with disable_prefix(model):
        assert torch.equal(model(input_ids=ids)[0], base[0])
        assert torch.equal(model(input_ids=ids, attention_mask=mask)[0], base[1])
    _zero_length(model)  # the whole route (mask widening included) with nothing to prepend
    torch.testing.assert_close(model(input_ids=ids)[0], base[0], atol=1e-6, rtol=0)
    torch.testing.assert_close(model(input_ids=ids, attention_mask=mask)[0], base[1], atol=1e-6, rtol=0)


def test_extend_mask_shapes():
    bool_mask = torch.tensor([[False, True, True], [False, True, True]])[None, None]  # (1, 1, 2, 3)
    out = extend_mask(bool_mask, 2, 2, 3, causal=True, device=CPU)
    assert out.shape == (1, 1, 2, 5) and out[..., :2].all() and torch.equal(out[..., 2:], bool_mask)
    additive = torch.full((2, 1, 4, 4), -1e9)
    out = extend_mask(additive, 3, 4, 4, causal=False, device=CPU)
    assert out.shape == (2, 1, 4, 7) and (out[..., :3] == 0).all()
    assert extend_mask(None, 3, 4, 4, causal=False, device=CPU) is None
    assert extend_mask(None, 3, 1, 9, causal=True, device=CPU) is None  # one query sees all
    causal = extend_mask(None, 2, 2, 5, causal=True, device=CPU)  # 2 queries after 3 cached keys
    assert causal.tolist() == [[[[True, True, True, True, True, True, False], [True] * 7]]]


def test_layer_selection(make_model, make_batch):
    model = make_model("tiny-llama")
    method = PrefixTuning(num_virtual_tokens=2, layers="top:2")
    method.apply(model)
    assert method.num_parameters(model) == 2 * 2 * 2 * 128
    layers = model.model.layers
    prefixed = [i for i, layer in enumerate(layers) if "_ftlab_prefix_slot" in vars(layer.self_attn)]
    assert prefixed == [2, 3]
    assert model.config._attn_implementation == "sdpa"  # the model's own config is untouched
    assert model.model.layers[0].self_attn.config._attn_implementation == "sdpa"
    assert model.model.layers[3].self_attn.config._attn_implementation == "ftlab_prefix"


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gpt2"])
def test_gradient_checkpointing_gives_the_same_gradients(name, make_model, make_batch):
    ids = make_batch(make_model(name), length=10)
    grads = []
    for checkpointing in (False, True):
        model = make_model(name)
        PrefixTuning(num_virtual_tokens=3, reparameterize=True, projection_dim=8).apply(model)
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.train()
        calls = []
        attention = next(m for m in model.modules() if "_ftlab_prefix_slot" in vars(m))
        attention.register_forward_hook(lambda *a, calls=calls: calls.append(1))
        out = model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False)
        out.logits.pow(2).mean().backward()
        assert len(calls) == (2 if checkpointing else 1)  # checkpointed: the attention reruns in backward
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) == 5
    for n in grads[0]:
        assert grads[0][n].abs().sum() > 0, n
        torch.testing.assert_close(grads[1][n], grads[0][n], atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gpt2"])
def test_generation_with_prefix(name, make_model, make_batch):
    model = make_model(name)
    PrefixTuning(num_virtual_tokens=4, init="random").apply(model)
    ids = make_batch(model, batch=2, length=6)
    out = greedy(model, ids, torch.ones_like(ids), output_scores=True, return_dict_in_generate=True)
    for step, scores in enumerate(out.scores):  # cached steps = a full forward without cache
        full = model(input_ids=out.sequences[:, : 6 + step], use_cache=False).logits[:, -1]
        torch.testing.assert_close(scores, full, atol=1e-4, rtol=1e-4)
    with disable_prefix(model):
        base = greedy(model, ids, None, output_scores=True, return_dict_in_generate=True)
    assert (base.scores[0] - out.scores[0]).abs().max() > 1e-3
    mask = torch.ones_like(ids)
    mask[1, :2] = 0
    batch, alone = greedy(model, ids, mask), greedy(model, ids[1:, 2:], None)
    assert torch.equal(batch[1, 6:], alone[0, 4:])


def test_fold_keeps_outputs_and_saves_plain_prefixes(make_model, make_batch, tmp_path):
    model = make_model("tiny-llama")
    ids = make_batch(model)
    method = PrefixTuning(num_virtual_tokens=3, reparameterize=True, projection_dim=8)
    method.apply(model)
    before = model(input_ids=ids).logits
    mlp_count = method.num_parameters(model)
    method.fold(model)
    assert not prefix_module(model).reparameterized and method.hparams()["reparameterize"] is False
    assert method.num_parameters(model) == 4 * 2 * 4 * 3 * 32 < mlp_count
    assert [n for n, p in model.named_parameters() if p.requires_grad] == ["ftlab_prefix.prefix"]
    torch.testing.assert_close(model(input_ids=ids).logits, before, atol=1e-5, rtol=1e-5)

    fp = Backbone("tiny-llama", pretrained=False).fingerprint(model)
    path = save_adapter(tmp_path / "a", model, method, fp)
    fresh = make_model("tiny-llama")
    loaded, _ = load_adapter(path, fresh, fp)
    assert isinstance(loaded, PrefixTuning) and loaded.hparams() == method.hparams()
    assert torch.equal(fresh(input_ids=ids).logits, model(input_ids=ids).logits)


def test_vocab_init_holds_the_keys_of_real_tokens(make_model):
    model = make_model("tiny-llama")
    torch.manual_seed(5)
    ids = torch.randint(0, model.config.vocab_size, (1, 3))
    cache = model(input_ids=ids, use_cache=True).cache
    torch.manual_seed(5)  # the same tokens are drawn inside apply
    PrefixTuning(num_virtual_tokens=3, init="vocab").apply(model)
    prefix = prefix_module(model).prefix
    for i, layer in enumerate(cache.layers):
        torch.testing.assert_close(prefix[i, 0], layer.keys[0])
        torch.testing.assert_close(prefix[i, 1], layer.values[0])


@pytest.mark.parametrize(
    "backbone",
    [
        Backbone("tiny-llama", pretrained=False, gradient_checkpointing=True),
        Backbone("minilm", pretrained=False, config_overrides=SMALL_MINILM),
    ],
    ids=["decoder-checkpointed", "encoder"],
)
def test_sequence_classifier(backbone):
    from ftlab.objectives import SequenceClassifier

    L.seed_everything(0)
    model = SequenceClassifier(backbone, PrefixTuning(num_virtual_tokens=4), num_labels=2)
    model.configure_model()
    model.train()
    ids = torch.randint(5, 250, (3, 7))
    mask = torch.ones_like(ids)
    mask[0, 5:] = 0
    torch.nn.functional.cross_entropy(model(ids, mask), torch.tensor([0, 1, 1])).backward()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"model.ftlab_prefix.prefix", "head.1.weight", "head.1.bias"}
    grads = [p.grad for n, p in model.named_parameters() if n in trainable]
    assert all(g is not None and g.abs().sum() > 0 for g in grads)


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        (dict(num_virtual_tokens=0), ValueError, "num_virtual_tokens must be > 0, got 0"),
        (dict(num_virtual_tokens=-1), ValueError, "num_virtual_tokens must be > 0, got -1"),
        (dict(reparameterize=True, init="vocab"), ValueError, "use init='random' with reparameterize"),
        (dict(projection_dim=0), ValueError, "projection_dim must be > 0"),
    ],
)
def test_bad_arguments(kwargs, error, message):
    with pytest.raises(error, match=message):
        PrefixTuning(**kwargs)


@pytest.mark.parametrize("layers", [[4], [0, -5], "2-7"])
def test_layer_out_of_range(layers, make_model):
    with pytest.raises(TargetError, match="out of range: the model has 4 layers"):
        PrefixTuning(layers=layers).apply(make_model("tiny-llama"))


def test_unsupported_attention_and_applied_twice(make_model):
    model = make_model("tiny-llama")
    model.config._attn_implementation = "flex_attention"
    with pytest.raises(ValueError, match="supports sdpa and eager attention, not 'flex_attention'"):
        PrefixTuning().apply(model)
    model = make_model("tiny-llama")
    PrefixTuning(num_virtual_tokens=2).apply(model)
    with pytest.raises(ValueError, match="applied twice"):
        PrefixTuning(num_virtual_tokens=2).apply(model)
