"""One switch for every method: the frozen base back, and whether that really is the base."""

import pytest
import torch

from ftlab.peft import Adapter, Full, LoRA, PrefixTuning, PromptTuning
from ftlab.peft.disable import base_model, can_disable, has_switch

SWITCHABLE = [
    ("lora", lambda: LoRA(rank=2, targets=["q_proj", "v_proj"])),
    ("adapter", lambda: Adapter(bottleneck_size=4)),
    ("prefix", lambda: PrefixTuning()),
    ("prompt", lambda: PromptTuning()),
]


def _perturb(model):
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.5)


@pytest.mark.parametrize("name,method", SWITCHABLE, ids=[n for n, _ in SWITCHABLE])
def test_switching_the_method_off_gives_the_base_output(name, method, make_model, make_batch):
    base = make_model("tiny-llama")
    model = make_model("tiny-llama")
    x = make_batch(model)
    with torch.no_grad():
        expected = base(input_ids=x).logits
    method().apply(model)
    _perturb(model)
    assert has_switch(model) and can_disable(model)
    with torch.no_grad():
        adapted = model(input_ids=x).logits
        with base_model(model):
            off = model(input_ids=x).logits
        again = model(input_ids=x).logits
    assert torch.allclose(off, expected, atol=1e-5)
    assert not torch.allclose(adapted, expected, atol=1e-3)
    assert torch.allclose(again, adapted)  # restored after the block


def test_methods_that_train_the_base_cannot_give_it_back(make_model):
    full = make_model("tiny-llama")
    Full().apply(full)
    assert not has_switch(full) and not can_disable(full)
    with pytest.raises(ValueError, match="no method modules to switch off"):
        with base_model(full):
            pass
    extra = make_model("tiny-llama")
    LoRA(rank=2, trainable=["lm_head"]).apply(extra)  # the LM head itself trains: off is not the base
    assert has_switch(extra) and not can_disable(extra)
