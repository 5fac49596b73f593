"""IA³ beyond the invariant table: which side of each layer is scaled, folding by hand, bad input."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from ftlab.peft import IA3
from ftlab.peft.ia3 import IA3Linear


def test_keys_values_scaled_on_outputs_and_the_feedforward_projection_on_inputs(make_model):
    model = make_model("tiny-llama")
    IA3().apply(model)
    scaled = {n.rsplit(".", 1)[-1]: m for n, m in model.named_modules() if isinstance(m, IA3Linear)}
    assert set(scaled) == {"k_proj", "v_proj", "down_proj"}
    assert not scaled["k_proj"].on_input and scaled["down_proj"].on_input
    assert scaled["down_proj"].ia3_l.shape == (384,) and scaled["v_proj"].ia3_l.shape == (128,)


@pytest.mark.parametrize("on_input", [False, True])
def test_rule_and_fold_by_hand(on_input):
    torch.manual_seed(0)
    base = nn.Linear(6, 4)
    layer = IA3Linear(base, on_input)
    with torch.no_grad():
        layer.ia3_l.uniform_(0.5, 1.5)
    x, scale = torch.randn(3, 6), layer.ia3_l.detach()
    expected = base(x * scale) if on_input else base(x) * scale
    torch.testing.assert_close(layer(x), expected)
    folded = layer.fold()
    torch.testing.assert_close(folded(x), expected, atol=1e-6, rtol=1e-6)


def test_feedforward_must_be_a_target():
    with pytest.raises(ValueError, match=r"feedforward \['mlp'\] must also be in targets"):
        IA3(targets=["k_proj"], feedforward=["mlp"])
