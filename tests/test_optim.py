from functools import partial

import lightning as L
import pytest
import torch

from ftlab.data import InstructionData
from ftlab.models.backbone import Backbone
from ftlab.objectives import CausalLM
from ftlab.optim import WarmupLinear
from ftlab.peft import LoRA


class RecordLR(L.Callback):
    def __init__(self):
        self.lrs: list[float] = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.lrs.append(optimizer.param_groups[0]["lr"])


@pytest.mark.parametrize("warmup", [0.25, 3])
def test_warmup_linear_takes_the_run_length_from_the_trainer(tmp_path, warmup):
    L.seed_everything(0)
    model = CausalLM(
        Backbone(pretrained=False),
        LoRA(rank=2, targets=["q_proj"]),
        optimizer=partial(torch.optim.SGD, lr=1.0),
        scheduler=partial(WarmupLinear, warmup=warmup),
        exact_match=False,
    )
    data = InstructionData(
        template="alpaca_short",
        max_length=96,
        batch_size=4,
        synthetic_train_size=16,
        synthetic_val_size=4,
        tokenizer="tiny-llama",
    )
    lrs = RecordLR()
    L.Trainer(
        accelerator="cpu",
        max_steps=12,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        callbacks=[lrs],
        default_root_dir=tmp_path,
    ).fit(model, data)
    # 12 steps, 3 of warmup: (s+1)/4 rising, then (12-s)/9 falling towards 0 at the end
    expected = [(s + 1) / 4 if s < 3 else (12 - s) / 9 for s in range(12)]
    assert lrs.lrs == pytest.approx(expected)


def test_set_total_steps_reapplies_the_current_rate():
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=2.0)
    sched = WarmupLinear(opt, warmup=0.1)
    sched.set_total_steps(100)  # 10 warmup steps: step 0 runs at 1/11 of the rate
    assert opt.param_groups[0]["lr"] == pytest.approx(2.0 / 11) and sched.get_last_lr() == pytest.approx(
        [2.0 / 11]
    )
