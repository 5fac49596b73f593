"""KTO, ORPO and SimPO end to end on the synthetic preference task; KTO's reference stays the frozen base."""

import lightning as L
import pytest
import torch

from ftlab.data import DataError, PreferenceData, UnpairedPreferenceData
from ftlab.models.backbone import Backbone
from ftlab.objectives import DPO, KTO, ORPO, SimPO
from ftlab.peft import Full, LoRA
from ftlab.preference_logps import response_labels, sequence_logps

LORA = {"rank": 8, "alpha": 16, "targets": ["q_proj", "k_proj", "v_proj", "o_proj"]}


def _fit(model, dm, tmp_path, steps):
    L.Trainer(
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        max_steps=steps,
        default_root_dir=tmp_path,
    ).fit(model, dm)


def _gap(model, batch) -> torch.Tensor:
    """Per pair: length-averaged log π(chosen) − log π(rejected) on held-out pairs, (B,)."""
    model.eval()
    with torch.no_grad():
        chosen, rejected = sequence_logps(
            model.model, batch["input_ids"], batch["attention_mask"], response_labels(batch), average=True
        ).chunk(2)
    return chosen - rejected


@pytest.mark.parametrize("objective", [KTO, ORPO, SimPO], ids=lambda c: c.__name__)
def test_training_raises_the_chosen_over_rejected_margin(objective, tmp_path):
    L.seed_everything(0)
    pairs = PreferenceData(synthetic_size=256, batch_size=16, max_length=64)
    pairs.setup()
    held_out = next(iter(pairs.val_dataloader()))
    unpaired = UnpairedPreferenceData(synthetic_size=256, batch_size=16, max_length=64)
    dm = unpaired if objective is KTO else pairs
    model = objective(Backbone(), LoRA(**LORA), optimizer=lambda p: torch.optim.AdamW(p, lr=3e-3))
    model.configure_model()
    before = _gap(model, held_out)
    _fit(model, dm, tmp_path, steps=12)
    after = _gap(model, held_out)
    # The base prefers the rude answer on most pairs (gap median -0.46 nats per token at seed 0). Mean rise
    # of the gap over the held-out pairs after 12 steps, seeds 0-7 (experiments/rl_test_calibration): KTO
    # 0.12-0.35, ORPO 0.01-0.44 (its SFT term lifts both answers' shared words), SimPO 0.18-0.55. No
    # sampling: another CPU's rounding moves a run far less than another seed does.
    gain = after - before
    assert gain.mean() > 0.0, (before.tolist(), after.tolist())


def test_kto_reference_is_the_frozen_base_and_full_fine_tuning_precomputes_it(tmp_path):
    L.seed_everything(0)
    dm = UnpairedPreferenceData(synthetic_size=64, batch_size=16, max_length=48)
    dm.setup()
    batch = next(iter(dm._loader("train", shuffle=False)))
    model = KTO(Backbone(pretrained=False), LoRA(rank=2), optimizer=lambda p: torch.optim.AdamW(p, lr=1e-2))
    model.configure_model()
    assert model.ref.mode == "base"
    args = (batch["input_ids"], batch["attention_mask"], batch["labels"])
    before = model.ref(model.model, *args)
    _fit(model, dm, tmp_path, steps=3)
    assert torch.allclose(model.ref(model.model, *args), before, atol=1e-5)  # the reference did not move
    with torch.no_grad():
        assert not torch.allclose(sequence_logps(model.model, *args), before, atol=1e-3)  # the policy did
    full = KTO(Backbone(pretrained=False), Full(), optimizer=lambda p: torch.optim.AdamW(p, lr=1e-3))
    full.configure_model()
    with torch.no_grad():
        base = sequence_logps(full.model, *args)
    _fit(full, dm, tmp_path, steps=10)  # into the second epoch: other batches, the same sequences
    assert full.ref.mode == "precomputed" and full.ref.updated
    assert torch.allclose(
        full.ref(full.model, *args), base, atol=1e-4
    )  # the base's, computed before training
    with torch.no_grad():
        assert not torch.allclose(sequence_logps(full.model, *args), base, atol=1e-3)


def test_reference_free_objectives_need_no_switch_and_bad_input_is_clear(tmp_path):
    L.seed_everything(0)
    dm = PreferenceData(synthetic_size=32, batch_size=8, max_length=48)
    for objective in (ORPO, SimPO):
        model = objective(
            Backbone(pretrained=False), Full(), optimizer=lambda p: torch.optim.AdamW(p, lr=1e-3)
        )
        _fit(model, dm, tmp_path, steps=1)  # full fine-tuning: no reference to keep
        assert model.ref is None
    with pytest.raises(ValueError, match="KTO needs batches of labelled single responses"):
        _fit(KTO(Backbone(pretrained=False), LoRA(rank=2)), dm, tmp_path, steps=1)
    with pytest.raises(ValueError, match="beta must be > 0"):
        SimPO(beta=0)
    with pytest.raises(ValueError, match="lam must be >= 0"):
        ORPO(lam=-1)
    with pytest.raises(ValueError, match="desirable_weight and undesirable_weight must be > 0"):
        KTO(undesirable_weight=0)
    with pytest.raises(ValueError, match="reference: base needs a method that can be switched off"):
        DPO(Backbone(pretrained=False), Full(), reference="base").configure_model()


def test_kto_refuses_data_with_one_label(tmp_path):
    import json

    path = tmp_path / "thumbs_up.jsonl"
    path.write_text(
        "\n".join(
            json.dumps({"prompt": "p", "completion": f"fine answer {i}", "label": True}) for i in range(8)
        )
    )
    model = KTO(Backbone(pretrained=False), LoRA(rank=2))
    with pytest.raises(DataError, match="all 8 training examples are desirable"):
        _fit(model, UnpairedPreferenceData(source=str(path), val_fraction=0), tmp_path, steps=1)
