"""The callbacks ftlab sweep adds to every run: token and epoch budgets resolved to steps on padded and
packed data, samples and tokens counted, and per-example validation results whose means are the metrics."""

from __future__ import annotations

import json
import math

import lightning as L
import numpy as np
import pytest
import torch

from ftlab.data import ClassificationData, TextData
from ftlab.sweep.record import Budget, ExampleResults, steps_for_tokens


@pytest.fixture(scope="module")
def packed():
    """145 blocks of exactly 32 tokens, batch 4: 36 batches of 128 tokens, then one of 32 (4,640 in all)."""
    dm = TextData(
        source="synthetic",
        tokenizer="tiny-llama",
        packing=True,
        max_length=32,
        batch_size=4,
        synthetic_size=40,
    )
    dm.setup("fit")
    assert len(dm.splits["train"]) == 145 and {len(it["input_ids"]) for it in dm.splits["train"]} == {32}
    return dm


@pytest.fixture(scope="module")
def padded():
    """400 keyword sentences of 19 to 30 tokens, batch 16, padded per batch."""
    dm = ClassificationData(source="synthetic", tokenizer="tiny-llama", batch_size=16, max_length=48, seed=3)
    dm.setup("fit")
    return dm


@pytest.mark.parametrize(
    "tokens, accumulate, steps",
    [
        (128 * 3, 1, 3),  # three full batches
        (128 * 3 + 1, 1, 4),  # one token more needs a fourth
        (4640, 1, 37),  # exactly one epoch, the short last batch included
        (4641, 1, 38),  # into the second epoch
        (256 * 5, 2, 5),  # two batches per optimizer step
        (4640 + 256, 2, 20),  # an epoch is 18 steps of 256 and one of 32; then one more step
    ],
)
def test_token_budget_on_packed_data(packed, tokens, accumulate, steps):
    assert Budget(tokens=tokens).resolve(packed, accumulate=accumulate) == steps


def test_token_budget_on_padded_data_follows_the_runs_training_order(padded):
    # The training order computed here independently: a permutation per epoch seeded by seed + epoch.
    lengths = [len(it["input_ids"]) for it in padded.splits["train"]]

    def epoch_batches(epoch):
        order = torch.randperm(len(lengths), generator=torch.Generator().manual_seed(3 + epoch)).tolist()
        return [sum(lengths[i] for i in order[j : j + 16]) for j in range(0, len(order), 16)]

    first, second = epoch_batches(0), epoch_batches(1)
    assert len(first) == 25 and len(set(first)) > 1  # batches hold different token counts
    epoch = sum(first)
    for budget, steps in [
        (first[0], 1),
        (first[0] + 1, 2),
        (sum(first[:10]), 10),
        (epoch, 25),
        (epoch + second[0] + second[1], 27),
    ]:
        assert Budget(tokens=budget).resolve(padded) == steps, budget
    # Padding is not counted: the same budget in padded tokens would be reached sooner.
    batch = next(iter(padded.train_dataloader()))
    assert batch["attention_mask"].sum() < batch["input_ids"].numel()


def test_epoch_budget(packed):
    assert Budget(epochs=1).resolve(packed) == 37
    assert Budget(epochs=1.5).resolve(packed) == math.ceil(1.5 * 37)
    assert Budget(epochs=1.5).resolve(packed, accumulate=2) == math.ceil(1.5 * 19)


def test_steps_for_tokens_and_bad_budgets():
    assert steps_for_tokens(lambda e: [5, 5, 2], 13) == (4, 17)  # 12 in the first epoch, then 5 more
    with pytest.raises(ValueError, match="has none"):
        steps_for_tokens(lambda e: [0, 0], 1)
    with pytest.raises(ValueError, match="not both"):
        Budget(tokens=10, epochs=1)
    with pytest.raises(ValueError, match="positive"):
        Budget(tokens=0)


def test_fit_records_examples_and_budget_and_validates_at_the_end(tmp_path):
    from ftlab.models.backbone import Backbone
    from ftlab.objectives import SequenceClassifier
    from ftlab.peft import LoRA

    L.seed_everything(0)
    model = SequenceClassifier(
        Backbone("tiny-llama"),
        LoRA(rank=2, targets=["q_proj", "v_proj"]),
        optimizer=lambda p: torch.optim.AdamW(p, lr=3e-3),
    )
    dm = ClassificationData(source="synthetic", tokenizer="tiny-llama", batch_size=16, max_length=48, seed=3)
    budget = Budget(tokens=500)
    trainer = L.Trainer(
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        max_steps=100,
        val_check_interval=100,
        check_val_every_n_epoch=None,
        num_sanity_val_steps=0,
        default_root_dir=tmp_path,
        callbacks=[ExampleResults(), budget],
    )
    trainer.fit(model, dm)
    run = tmp_path / "version_0"  # without a logger, the run directory is the next free version_N

    # 500 tokens: two batches of ~16 x 24 tokens. The budget set the run length; the run validated at
    # its last step although val_check_interval is far beyond it.
    lengths = [len(it["input_ids"]) for it in dm.splits["train"]]
    order = torch.randperm(len(lengths), generator=torch.Generator().manual_seed(3)).tolist()
    seen = [lengths[i] for i in order[:32]]
    assert sum(seen[:16]) < 500 <= sum(seen)
    assert trainer.global_step == 2
    recorded = json.loads((run / "budget.json").read_text())
    assert recorded == {
        "steps": 2,
        "samples": 32,
        "tokens": sum(seen),
        "budget": "500 tokens",
        "max_steps": 2,
    }

    with np.load(run / "val_examples.npz", allow_pickle=False) as ex:
        assert int(ex["step"]) == 2 and len(ex["digest"].item()) == 40
        assert ex["accuracy"].shape == (64,)  # every validation example, in order
        np.testing.assert_array_equal(ex["label"], [it["label"] for it in dm.splits["validation"]])
        np.testing.assert_array_equal(ex["accuracy"], ex["pred"] == ex["label"])
        metrics = trainer.callback_metrics
        assert ex["accuracy"].mean() == pytest.approx(float(metrics["val/accuracy"]), abs=1e-6)
        assert ex["loss"].mean() == pytest.approx(float(metrics["val/loss"]), abs=1e-5)
        digest = ex["digest"].item()

    # The same validation examples give the same digest whatever the model; other examples do not.
    trainer.validate(model, dm, verbose=False)
    with np.load(run / "val_examples.npz", allow_pickle=False) as ex:
        assert ex["digest"].item() == digest
    other = ClassificationData(
        source="synthetic", tokenizer="tiny-llama", batch_size=16, max_length=48, seed=4
    )
    trainer.validate(model, other, verbose=False)
    with np.load(run / "val_examples.npz", allow_pickle=False) as ex:
        assert ex["digest"].item() != digest
