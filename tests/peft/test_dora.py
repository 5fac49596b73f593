"""DoRA beyond the invariant table: the update rule by hand, exact unmerge, the detached norm."""

from __future__ import annotations

import torch
from torch import nn

from ftlab.peft import DoRA
from ftlab.peft.dora import DoRALinear


def _layer(seed: int = 0, bias: bool = True, dropout: float = 0.0) -> tuple[nn.Module, DoRALinear]:
    torch.manual_seed(seed)
    model = nn.Sequential()
    model.add_module("proj", nn.Linear(12, 10, bias=bias))
    DoRA(rank=3, alpha=6, dropout=dropout, targets=["proj"]).apply(model)
    layer = model.proj
    with torch.no_grad():  # a trained-looking adapter: B != 0, magnitudes away from the norms
        layer.lora_B["default"].normal_(0, 0.3)
        layer.lora_magnitude["default"].mul_(torch.linspace(0.5, 1.5, 10))
    return model, layer


def test_forward_is_magnitude_times_normalised_direction():
    for bias in (True, False):
        model, layer = _layer(bias=bias)
        w0, a, b = layer.base.weight, layer.lora_A["default"], layer.lora_B["default"]
        v = w0 + 2.0 * b @ a  # W0 + s·B A, s = alpha / r = 2
        w = layer.lora_magnitude["default"][:, None] * v / v.norm(dim=1, keepdim=True)  # (out, in)
        x = torch.randn(5, 12)
        expected = x @ w.T + (layer.base.bias if bias else 0)
        torch.testing.assert_close(model(x), expected, atol=1e-5, rtol=1e-5)


def test_dropout_in_eval_mode_is_the_plain_rule():
    plain, _ = _layer(seed=1)
    with_dropout, _ = _layer(seed=1, dropout=0.3)
    x = torch.randn(4, 12)
    torch.testing.assert_close(with_dropout.eval()(x), plain.eval()(x), atol=1e-6, rtol=0)


def test_merge_writes_the_adapted_weight_and_unmerge_restores_w0():
    model, layer = _layer()
    x = torch.randn(4, 12)
    adapted, w0 = model(x).detach(), layer.base.weight.detach().clone()
    layer.merge()
    torch.testing.assert_close(layer.base(x), adapted, atol=1e-5, rtol=1e-5)  # the base alone is W'
    torch.testing.assert_close(model(x), adapted, atol=1e-5, rtol=1e-5)
    layer.unmerge()
    torch.testing.assert_close(layer.base.weight, w0, atol=1e-6, rtol=0)


def test_the_norm_gets_no_gradient():
    """The paper's memory-saving choice: ‖W0 + s·B A‖ is a constant in backward, so the gradient of
    B is that of ``m/‖·‖ ⊙ s·B A x`` alone."""
    model, layer = _layer()
    x = torch.randn(6, 12)
    model(x).pow(2).sum().backward()
    got = layer.lora_B["default"].grad.clone()
    a, b, m = (
        layer.lora_A["default"].detach(),
        layer.lora_B["default"].detach(),
        layer.lora_magnitude["default"].detach(),
    )
    v = layer.base.weight + 2.0 * b @ a
    scale = (m / v.norm(dim=1)).detach()
    b_ = b.clone().requires_grad_(True)
    y = layer.base(x) + (scale - 1) * (x @ layer.base.weight.T) + scale * 2.0 * (x @ a.T @ b_.T)
    y.pow(2).sum().backward()
    torch.testing.assert_close(got, b_.grad, atol=1e-5, rtol=1e-5)
