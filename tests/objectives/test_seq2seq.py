"""Seq2SeqLM and Seq2SeqData: source -> target batches, the loss, training, generation, exact match."""

import lightning as L
import torch

from ftlab.data import Seq2SeqData
from ftlab.models.backbone import Backbone
from ftlab.objectives import Seq2SeqLM
from ftlab.peft import LoRA


def _data(**kw):
    return Seq2SeqData(
        tokenizer="tiny-t5",
        template="alpaca_short",
        max_length=96,
        batch_size=8,
        synthetic_train_size=64,
        synthetic_val_size=8,
        **kw,
    )


def test_batches_are_source_and_target():
    dm = _data()
    dm.setup()
    tok = dm.tokenizer
    train, val = next(iter(dm.train_dataloader())), next(iter(dm.val_dataloader()))
    assert set(train) == {"input_ids", "attention_mask", "labels"}
    row = train["labels"][0][train["labels"][0] != -100].tolist()
    assert row[-1] == tok.eos_token_id  # the target ends in eos and is all learnt
    source = tok.decode(train["input_ids"][0][train["attention_mask"][0].bool()], skip_special_tokens=True)
    assert source.startswith("### Instruction:") and source.rstrip().endswith("### Response:")
    assert torch.equal(val["prompt_ids"], val["input_ids"]) and len(val["references"]) == 8
    assert tok.decode(row[:-1]) in {it["reference"] for it in dm.splits["train"]}


def test_loss_is_the_models_own_and_training_lowers_it(tmp_path):
    L.seed_everything(0)
    model = Seq2SeqLM(
        Backbone("tiny-t5"),
        LoRA(rank=8, targets=["attention"]),
        optimizer=lambda p: torch.optim.AdamW(p, lr=5e-3),
        max_new_tokens=8,
    )
    dm = _data()
    dm.setup()
    batch = next(iter(dm.train_dataloader()))
    model.configure_model()
    model.eval()  # T5's dropout would make two forwards differ
    with torch.no_grad():
        loss0 = model._loss(batch)
        theirs = model.model(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]
        ).loss
    torch.testing.assert_close(loss0, theirs, atol=1e-5, rtol=1e-5)
    trainer = L.Trainer(
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        max_steps=12,
        limit_val_batches=1,
        default_root_dir=tmp_path,
    )
    trainer.fit(model, dm)
    with torch.no_grad():
        assert model._loss(batch) < loss0 - 0.5
    assert 0.0 <= float(trainer.callback_metrics["val/exact_match"]) <= 1.0  # generation ran
    rows = trainer.predict(model, dm)[0]
    assert len(rows) == 8 and set(rows[0]) == {"prompt", "generated", "reference"}
