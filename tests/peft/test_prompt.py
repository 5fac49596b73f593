"""Prompt tuning beyond the invariant table: shapes and masks the frozen model sees, initialisation,
generation, objectives, bad input."""

from __future__ import annotations

import lightning as L
import pytest
import torch

from ftlab.losses.lm import masked_lm_loss
from ftlab.models.backbone import Backbone
from ftlab.models.tokenizer import byte_tokenizer
from ftlab.peft import PromptTuning
from ftlab.peft.prompt import prompt_module

SMALL_MINILM = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)


def greedy(model, ids, mask, **kwargs):
    kwargs = dict(max_new_tokens=5, do_sample=False, pad_token_id=256, **kwargs)
    return model.generate(input_ids=ids, attention_mask=mask, **kwargs)


def _inner_inputs(model):
    """Record the keyword arguments the model's trunk receives."""
    seen = {}
    trunk = model.base_model
    trunk.register_forward_pre_hook(lambda m, a, kw: seen.update(kw), with_kwargs=True)
    return seen


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gpt2"])
def test_decoder_sees_prompt_then_input_and_outputs_line_up(name, make_model, make_batch):
    model = make_model(name)
    ids = make_batch(model, batch=2, length=9)
    mask = torch.ones_like(ids)
    mask[0, :3] = 0  # left padding
    base = model(input_ids=ids, attention_mask=mask).logits
    PromptTuning(num_virtual_tokens=5).apply(model)
    seen = _inner_inputs(model)
    labels = ids.clone()
    labels[:, :4] = -100
    out = model(input_ids=ids, attention_mask=mask, labels=labels, use_cache=False)

    hidden = model.config.hidden_size
    assert seen.get("input_ids") is None and seen["inputs_embeds"].shape == (2, 14, hidden)
    torch.testing.assert_close(seen["inputs_embeds"][:, :5], prompt_module(model).embedding.expand(2, -1, -1))
    torch.testing.assert_close(seen["inputs_embeds"][:, 5:], model.get_input_embeddings()(ids))
    assert torch.equal(seen["attention_mask"], torch.cat([torch.ones(2, 5, dtype=torch.long), mask], 1))
    assert out.logits.shape == base.shape == (2, 9, model.config.vocab_size)
    assert (out.logits - base).abs().max() > 1e-3  # the prompt is read: the input positions change
    # labels grew by 5 × -100: the model's own loss equals ftlab's loss on the cut logits
    torch.testing.assert_close(out.loss, masked_lm_loss(out.logits, labels))


def test_position_ids_and_token_types_are_extended(make_model, make_batch):
    model = make_model("tiny-bert")
    ids = make_batch(model, length=6)
    PromptTuning(num_virtual_tokens=3).apply(model)
    seen = {}
    model.embeddings.register_forward_pre_hook(lambda m, a, kw: seen.update(kw), with_kwargs=True)
    out = model(
        input_ids=ids,
        token_type_ids=torch.ones_like(ids),
        position_ids=torch.arange(6)[None],
        attention_mask=torch.ones_like(ids),
        output_hidden_states=True,
    )
    assert torch.equal(seen["position_ids"], torch.arange(9)[None])
    assert torch.equal(seen["token_type_ids"], torch.tensor([[0] * 3 + [1] * 6] * 2))
    assert out.last_hidden_state.shape == (2, 6, 32)
    assert all(h.shape == (2, 6, 32) for h in out.hidden_states)


def test_initialisations(make_model):
    model = make_model("tiny-llama")
    table = model.get_input_embeddings().weight
    text = "Sort:"  # 5 byte tokens
    PromptTuning(num_virtual_tokens=12, init_text=text, tokenizer="tiny-llama").apply(model)
    ids = byte_tokenizer()(text, add_special_tokens=False)["input_ids"]
    assert torch.equal(prompt_module(model).embedding, table[(ids * 3)[:12]])

    model = make_model("tiny-llama")
    method = PromptTuning(init_text=text, tokenizer="tiny-llama")
    method.apply(model)
    assert method.num_virtual_tokens == 5 and prompt_module(model).num_virtual_tokens == 5

    model = make_model("tiny-llama")
    PromptTuning(num_virtual_tokens=6, init="vocab").apply(model)
    rows = prompt_module(model).embedding
    assert all(any(torch.equal(r, t) for t in model.get_input_embeddings().weight) for r in rows)

    model = make_model("tiny-llama")
    PromptTuning(num_virtual_tokens=6, init="random").apply(model)
    assert prompt_module(model).num_virtual_tokens == 6
    assert PromptTuning().hparams()["num_virtual_tokens"] is None  # resolved only when applied


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gpt2"])
def test_generation_reuses_the_prompt_from_the_cache(name, make_model, make_batch):
    model = make_model(name)
    PromptTuning(num_virtual_tokens=4).apply(model)
    with torch.no_grad():
        prompt_module(model).embedding.mul_(3.0)  # a prompt that matters
    ids = make_batch(model, batch=2, length=6)
    out = greedy(model, ids, torch.ones_like(ids), output_scores=True, return_dict_in_generate=True)
    # each cached step's scores equal a full forward without cache over the sequence so far
    for step, scores in enumerate(out.scores):
        seq = out.sequences[:, : 6 + step]
        full = model(input_ids=seq, use_cache=False).logits[:, -1]
        torch.testing.assert_close(scores, full, atol=1e-4, rtol=1e-4)

    # a left-padded prompt generates what the same prompt alone does
    mask = torch.ones_like(ids)
    mask[1, :2] = 0
    batch, alone = greedy(model, ids, mask), greedy(model, ids[1:, 2:], mask[1:, 2:])
    assert torch.equal(batch[1, 6:], alone[0, 4:])


@pytest.mark.parametrize(
    "backbone",
    [
        Backbone("tiny-llama", pretrained=False),
        Backbone("minilm", pretrained=False, config_overrides=SMALL_MINILM),
    ],
    ids=["decoder", "encoder"],
)
def test_sequence_classifier_pools_the_real_tokens(backbone):
    from ftlab.objectives import SequenceClassifier

    L.seed_everything(0)
    model = SequenceClassifier(backbone, PromptTuning(num_virtual_tokens=4), num_labels=2)
    model.configure_model()
    ids = torch.randint(5, 250, (3, 7))
    mask = torch.ones_like(ids)
    mask[0, 5:] = 0
    logits = model(ids, mask)
    assert logits.shape == (3, 2)
    torch.nn.functional.cross_entropy(logits, torch.tensor([0, 1, 1])).backward()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"model.ftlab_prompt.embedding", "head.1.weight", "head.1.bias"}
    assert all(p.grad is not None for n, p in model.named_parameters() if n in trainable)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(num_virtual_tokens=0), "num_virtual_tokens must be > 0, got 0"),
        (dict(num_virtual_tokens=-3), "num_virtual_tokens must be > 0, got -3"),
        (dict(init="text"), "init='text' needs init_text"),
        (dict(init="vocab", init_text="hi"), "init_text is only used with init='text'"),
    ],
)
def test_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        PromptTuning(**kwargs)


def test_init_text_longer_than_the_prompt(make_model):
    with pytest.raises(ValueError, match="init_text is 11 tokens long but num_virtual_tokens is 4"):
        method = PromptTuning(num_virtual_tokens=4, init_text="hello world", tokenizer="tiny-llama")
        method.apply(make_model("tiny-llama"))


def test_init_text_needs_a_tokenizer(make_model):
    with pytest.raises(ValueError, match="needs a tokenizer"):
        PromptTuning(init_text="hello").apply(make_model("tiny-llama"))


def test_applied_twice(make_model):
    model = make_model("tiny-llama")
    PromptTuning(num_virtual_tokens=2).apply(model)
    with pytest.raises(ValueError, match="applied twice"):
        PromptTuning(num_virtual_tokens=2).apply(model)
