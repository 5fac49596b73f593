"""LoRA initialisations: what each puts in A and B, and what PiSSA/OLoRA leave in the base."""

from __future__ import annotations

import pytest
import torch

from ftlab.peft import LoRA, QLoRA
from ftlab.peft.layers import dense_weight
from ftlab.peft.lora import lora_layers
from ftlab.peft.lora_init import INITS, register


def _layers(make_model, init: str, rank: int = 4, **kw):
    model = make_model("tiny-llama")
    w0 = {
        n: m.weight.detach().clone() for n, m in model.named_modules() if n.endswith(("q_proj", "down_proj"))
    }
    (QLoRA if kw.pop("qlora", False) else LoRA)(
        rank=rank, init=init, targets=["q_proj", "down_proj"], **kw
    ).apply(model)
    return [(w0[n], m) for n, m in model.named_modules() if n in w0 and m in set(lora_layers(model))]


def test_pissa_moves_the_top_singular_components_into_the_adapter(make_model):
    for w0, m in _layers(make_model, "pissa"):
        u, s, vh = torch.linalg.svd(w0, full_matrices=False)
        top = (u[:, :4] * s[:4]) @ vh[:4]  # the best rank-4 approximation of W0
        torch.testing.assert_close(m.delta_weight("default"), top, atol=1e-4, rtol=1e-4)
        rest = torch.linalg.svdvals(m.base.weight)
        torch.testing.assert_close(rest[: len(s) - 4], s[4:], atol=1e-4, rtol=1e-4)  # the base keeps the rest
        a, b = m.lora_A["default"], m.lora_B["default"]
        torch.testing.assert_close(a.norm(dim=1), b.norm(dim=0), atol=1e-4, rtol=1e-4)  # split evenly


def test_olora_puts_an_orthonormal_basis_in_b(make_model):
    for w0, m in _layers(make_model, "olora", alpha=4):  # s = 1
        b = m.lora_B["default"]
        torch.testing.assert_close(b.T @ b, torch.eye(4), atol=1e-5, rtol=0)
        torch.testing.assert_close(m.base.weight + m.delta_weight("default"), w0, atol=1e-5, rtol=0)


def test_gaussian_and_kaiming_leave_b_zero_and_the_base_alone(make_model):
    for init in ("gaussian", "kaiming"):
        for w0, m in _layers(make_model, init, rank=16):
            assert torch.equal(m.base.weight, w0) and not m.lora_B["default"].any()
            assert m.lora_A["default"].std() > 0
    gauss = [m.lora_A["default"].std().item() for _, m in _layers(make_model, "gaussian", rank=16)]
    assert all(abs(s - 1 / 16) < 0.01 for s in gauss)


def test_pissa_on_a_4bit_base_quantizes_the_residual(make_model):
    for w0, m in _layers(make_model, "pissa", qlora=True):
        assert type(m.base).__name__ == "Linear4bit"
        residual = dense_weight(m.base)  # what the 4-bit layer now holds, dequantized
        error = (residual + m.delta_weight("default") - w0).norm() / w0.norm()
        assert error < 0.15  # 4-bit rounding of the residual, nothing lost beyond it


def test_rank_larger_than_the_weight_is_an_error(make_model):
    with pytest.raises(ValueError, match="rank 200 exceeds the rank of a"):
        _layers(make_model, "pissa", rank=200)


def test_a_registered_init_is_a_lora_option(make_model):
    @register("ones_a")
    def ones_a(layer, name):
        torch.nn.init.ones_(layer.lora_A[name])
        torch.nn.init.zeros_(layer.lora_B[name])

    try:
        assert all(bool((m.lora_A["default"] == 1).all()) for _, m in _layers(make_model, "ones_a"))
    finally:
        del INITS["ones_a"]
