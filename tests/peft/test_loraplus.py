"""LoRA+: B's learning rate is ``lr_ratio`` times A's, through the protocol's parameter groups."""

from __future__ import annotations

import pytest
import torch

from ftlab.models.backbone import Backbone
from ftlab.objectives import SequenceClassifier
from ftlab.peft import LoRA, LoRAPlus


def _optimizer(method):
    model = SequenceClassifier(
        Backbone(pretrained=False), method, num_labels=2, optimizer=lambda p: torch.optim.AdamW(p, lr=1e-3)
    )
    model.configure_model()
    kind = {
        id(p): "lora_A" if ".lora_A." in n else "lora_B" if ".lora_B." in n else n.split(".")[0]
        for n, p in model.named_parameters()
    }
    lrs: dict[str, set[float]] = {}
    for group in model.configure_optimizers().param_groups:
        for p in group["params"]:
            lrs.setdefault(kind[id(p)], set()).add(group["lr"])
    return {k: v.pop() for k, v in lrs.items() if len(v) == 1}  # a kind split over two rates drops out


def test_b_learns_lr_ratio_times_faster_and_heads_at_the_base_rate():
    lrs = _optimizer(LoRAPlus(lr_ratio=8, rank=2, targets=["q_proj"]))
    assert lrs == {"lora_A": pytest.approx(1e-3), "lora_B": pytest.approx(8e-3), "head": pytest.approx(1e-3)}
    assert _optimizer(LoRA(rank=2, targets=["q_proj"])) == {"lora_A": 1e-3, "lora_B": 1e-3, "head": 1e-3}


def test_ratio_must_be_positive():
    with pytest.raises(ValueError, match="lr_ratio must be > 0"):
        LoRAPlus(lr_ratio=0)
