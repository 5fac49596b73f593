"""DPO end to end on the synthetic preference task; the reference is the frozen base, never updated."""

import lightning as L
import pytest
import torch

from ftlab.data import PreferenceData
from ftlab.losses.lm import IGNORE
from ftlab.models.backbone import Backbone
from ftlab.objectives import DPO
from ftlab.peft import Full, LoRA
from ftlab.preference_logps import response_labels


def _trainer(tmp_path, **kw):
    return L.Trainer(
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        default_root_dir=tmp_path,
        **kw,
    )


def _data(**kw):
    return PreferenceData(synthetic_size=256, batch_size=16, max_length=64, **kw)


def _base_logps(backbone: Backbone, batch, labels) -> torch.Tensor:
    """log-probs of the batch under a freshly loaded copy of the base (what the reference must equal)."""
    torch.manual_seed(0)
    fresh = DPO(backbone, LoRA(rank=2))
    fresh.configure_model()
    fresh.eval()
    with torch.no_grad():
        return fresh.logps(batch["input_ids"], batch["attention_mask"], labels)


def test_lora_dpo_learns_preferences_and_the_reference_stays_the_frozen_base(tmp_path):
    L.seed_everything(0)
    model = DPO(
        Backbone(),
        LoRA(rank=8, targets=["q_proj", "k_proj", "v_proj", "o_proj"]),
        optimizer=lambda p: torch.optim.AdamW(p, lr=3e-3),
        beta=0.1,
    )
    dm = _data()
    dm.setup()
    batch = next(iter(dm.val_dataloader()))
    labels = response_labels(batch)
    model.configure_model()
    assert model.reference == "base"
    ref_before = model.reference_logps(batch, labels)
    assert torch.allclose(ref_before, _base_logps(Backbone(), batch, labels), atol=1e-5)
    before = _trainer(tmp_path).validate(model, dm, verbose=False)[0]
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    _trainer(tmp_path, max_steps=25, limit_val_batches=0).fit(model, dm)
    after = _trainer(tmp_path).validate(model, dm, verbose=False)[0]

    assert before["val/reward_margin"] == pytest.approx(0.0, abs=1e-5)  # the policy starts as the reference
    assert after["val/reward_margin"] > 1.0 and after["val/reward_acc"] >= 0.9, after
    gap = lambda m: m["val/logps_chosen"] - m["val/logps_rejected"]  # noqa: E731
    assert gap(after) > gap(before) + 10.0  # chosen log-prob rose relative to rejected
    assert after["val/loss"] < 0.5 * before["val/loss"]
    # the reference did not move; the policy did, through LoRA only
    ref_after = model.reference_logps(batch, labels)
    assert torch.allclose(ref_after, ref_before, atol=1e-5)
    with torch.no_grad():
        policy = model.logps(batch["input_ids"], batch["attention_mask"], labels)
    assert not torch.allclose(policy, ref_before, atol=1e-2)
    for n, p in model.named_parameters():
        assert (not torch.equal(params[n], p.detach())) == ("lora_" in n), n


def test_full_fine_tuning_precomputes_the_reference_once(tmp_path):
    L.seed_everything(0)
    model = DPO(Backbone(pretrained=False), Full(), optimizer=lambda p: torch.optim.AdamW(p, lr=1e-3))
    dm = PreferenceData(synthetic_size=64, batch_size=16, max_length=48)
    _trainer(tmp_path, max_steps=4, limit_val_batches=1).fit(model, dm)
    assert model.reference == "precomputed"
    # an entry per distinct sequence of the training and validation pairs, after the model was updated
    assert 0 < len(model.ref.cache) <= 2 * (len(dm.splits["train"]) + len(dm.splits["validation"]))
    for loader in (dm.val_dataloader(), dm._loader("train", shuffle=False)):
        for b in loader:
            model.reference_logps(b, response_labels(b))  # precomputed, so no error
    batch = next(iter(dm.val_dataloader()))
    labels = response_labels(batch)
    L.seed_everything(0)  # the same random base
    assert torch.allclose(
        model.reference_logps(batch, labels),
        _base_logps(Backbone(pretrained=False), batch, labels),
        atol=1e-4,
    )
    unseen = {k: v.clone() for k, v in batch.items()}
    unseen["input_ids"][0, 3] = 7  # a pair that was never precomputed
    with pytest.raises(RuntimeError, match="no precomputed reference"):
        model.reference_logps(unseen, response_labels(unseen))
    with pytest.raises(ValueError, match="reference: base needs a method that can be switched off"):
        DPO(Backbone(pretrained=False), Full(), reference="base").configure_model()


def test_response_labels_skip_the_shared_prompt_and_padding():
    pad = 256
    chosen = [[257, 10, 11, 12, 13, 258], [257, 20, 21, 22, 258, pad]]
    rejected = [[257, 10, 11, 30, 258, pad], [257, 20, 21, 22, 23, 258]]
    ids = torch.tensor(chosen + rejected)
    batch = {"input_ids": ids, "attention_mask": (ids != pad).long()}
    labels = response_labels(batch)
    I = IGNORE  # noqa: E741
    assert labels.tolist() == [
        [I, I, I, 12, 13, 258],
        [I, I, I, I, 258, I],
        [I, I, I, 30, 258, I],
        [I, I, I, I, 23, 258],
    ]
    assert torch.equal(response_labels({**batch, "labels": ids}), ids)  # explicit labels win


def test_ipo_and_bad_arguments():
    model = DPO(Backbone(pretrained=False), LoRA(rank=2), loss_type="ipo")
    model.configure_model()
    ids = torch.tensor([[257, 1, 2, 3], [257, 1, 5, 6]])
    labels = torch.tensor([[IGNORE, 1, 2, 3], [IGNORE, IGNORE, 5, 6]])
    with torch.no_grad():
        mean = model.logps(ids, torch.ones_like(ids), labels, average=True)
        total = model.logps(ids, torch.ones_like(ids), labels)
    assert torch.allclose(mean, total / torch.tensor([3.0, 2.0]))  # IPO averages over response tokens
    with pytest.raises(ValueError, match="beta must be > 0"):
        DPO(beta=0)
    with pytest.raises(ValueError, match="unknown loss_type"):
        DPO(loss_type="hinge")
