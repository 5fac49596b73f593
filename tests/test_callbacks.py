import json

import lightning as L
import pytest
import torch

from ftlab.callbacks import (
    NonFiniteLossError,
    ParameterTable,
    RunSummary,
    StopOnNonFinite,
    Throughput,
    WritePredictions,
    parameter_table,
)
from ftlab.data import InstructionData
from ftlab.models.backbone import Backbone
from ftlab.objectives import CausalLM
from ftlab.peft import LoRA


class Blowup(L.LightningModule):
    """Loss turns NaN at ``bad_step``; otherwise a tiny regression."""

    def __init__(self, bad_step: int):
        super().__init__()
        self.lin = torch.nn.Linear(2, 1)
        self.bad_step = bad_step

    def training_step(self, batch, i):
        loss = self.lin(batch).pow(2).mean()
        return loss * float("nan") if self.global_step == self.bad_step else loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def train_dataloader(self):
        return torch.utils.data.DataLoader(torch.randn(64, 2), batch_size=4)


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
    ckpt = L.pytorch.callbacks.ModelCheckpoint(dirpath=tmp_path, filename="last-good", every_n_train_steps=2)
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=10,
        logger=False,
        enable_progress_bar=False,
        callbacks=[ckpt, StopOnNonFinite()],
        default_root_dir=tmp_path,
    )
    with pytest.raises(NonFiniteLossError, match=r"train/loss is nan at step 6 \(batch 5\)"):
        trainer.fit(Blowup(bad_step=5))
    saved = torch.load(tmp_path / "last-good.ckpt", weights_only=True)
    assert saved["global_step"] == 4
    assert all(torch.isfinite(v).all() for v in saved["state_dict"].values())


def test_parameter_table_counts():
    model = Backbone(pretrained=False).load("causal_lm")
    LoRA(rank=4, targets=["q_proj"]).apply(model)
    table, numbers = parameter_table(model)
    assert numbers["params/trainable"] == 4 * (128 + 128) * 4  # r (in + out) x 4 layers
    assert numbers["params/total"] == sum(p.numel() for p in model.parameters())
    assert "model.layers.*.self_attn.q_proj.lora_A.default" in table
    assert abs(numbers["params/trainable_pct"] - 100 * 4096 / numbers["params/total"]) < 1e-9


def test_summary_throughput_and_predictions(tmp_path):
    L.seed_everything(0)
    model = CausalLM(Backbone(pretrained=False), LoRA(rank=2), max_new_tokens=4)
    dm = InstructionData(
        template="alpaca_short", max_length=96, batch_size=4, synthetic_train_size=32, synthetic_val_size=4
    )
    perf = Throughput(log_every_n_steps=1)
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=4,
        logger=L.pytorch.loggers.CSVLogger(tmp_path, name=""),
        enable_progress_bar=False,
        enable_checkpointing=False,
        limit_val_batches=1,
        val_check_interval=2,
        callbacks=[ParameterTable(), perf, RunSummary(), WritePredictions()],
    )
    trainer.fit(model, dm)
    summary = json.loads((tmp_path / "version_0" / "summary.json").read_text())
    assert summary["objective"] == "CausalLM" and summary["method"] == "LoRA" and summary["steps"] == 4
    assert summary["params/trainable"] == 2 * 256 * 2 * 4  # q and v, 4 layers
    assert summary["perf/tokens_per_s"] > 0 and summary["perf/peak_mem_gib"] > 0
    assert "val/exact_match" in summary["metrics"]
    assert len(perf.step_times) == 3  # first step (warm-up) not counted
    trainer.predict(model, dm)
    rows = [
        json.loads(line) for line in (tmp_path / "version_0" / "predictions.jsonl").read_text().splitlines()
    ]
    assert len(rows) == 4 and set(rows[0]) == {"prompt", "generated", "reference"}
