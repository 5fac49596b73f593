import lightning as L
import pytest
import torch
from transformers import BertConfig

from ftlab.data import PreferenceData
from ftlab.models.backbone import Backbone
from ftlab.objectives import RewardModel
from ftlab.peft import LoRA


def _fit(model, dm, tmp_path, steps):
    L.Trainer(
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        max_steps=steps,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        default_root_dir=tmp_path,
    ).fit(model, dm)
    return L.Trainer(
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    ).validate(model, dm, verbose=False)[0]


def test_lora_reward_model_learns_preferences_and_only_adapter_and_head_train(tmp_path):
    L.seed_everything(0)
    model = RewardModel(
        Backbone(pretrained=False),
        LoRA(rank=4, targets=["q_proj", "v_proj"]),
        optimizer=lambda p: torch.optim.AdamW(p, lr=3e-3),
    )
    metrics = _fit(model, PreferenceData(synthetic_size=320, batch_size=16, max_length=64), tmp_path, 15)
    assert model.pooling == "last"
    assert metrics["val/reward_acc"] >= 0.9 and metrics["val/reward_margin"] > 0, metrics
    assert metrics["val/loss"] < 0.5
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any(n.startswith("head.") for n in trainable)
    assert all("lora_" in n or n.startswith("head.") for n in trainable)


def test_reward_head_is_saved_and_restored_with_the_adapter(tmp_path):
    L.seed_everything(0)
    model = RewardModel(Backbone(pretrained=False), LoRA(rank=2))
    model.configure_model()
    torch.nn.init.normal_(model.head[1].weight)
    torch.nn.init.constant_(model.head[1].bias, 0.25)
    for name, p in model.model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p)
    path = model.save_adapter(tmp_path / "adapter")
    L.seed_everything(0)  # the same random base
    loaded = RewardModel(Backbone(pretrained=False), adapter=str(path))
    loaded.configure_model()
    assert torch.equal(loaded.head[1].weight, model.head[1].weight)
    assert loaded.head[1].bias.item() == pytest.approx(0.25) and loaded.head[1].weight.requires_grad
    L.seed_everything(0)
    fresh = RewardModel(Backbone(pretrained=False), LoRA(rank=2))
    fresh.configure_model()
    x = torch.randint(0, 256, (3, 11))
    mask = torch.ones_like(x)
    for m in (model, loaded, fresh):
        m.eval()
    with torch.no_grad():
        assert torch.allclose(model(x, mask), loaded(x, mask), atol=1e-5)
        assert not torch.allclose(model(x, mask), fresh(x, mask), atol=1e-3)  # the head and adapter matter


def test_reward_reads_the_last_real_token_whatever_the_padding(tmp_path):
    torch.manual_seed(0)
    model = RewardModel(Backbone(pretrained=False))
    model.configure_model()
    model.eval()
    short, long = torch.randint(3, 250, (1, 4)), torch.randint(3, 250, (1, 10))
    ids = torch.full((2, 10), 256)
    ids[0, :4], ids[1] = short, long
    mask = torch.tensor([[1] * 4 + [0] * 6, [1] * 10])
    with torch.no_grad():
        assert model(short, torch.ones_like(short))[0].item() == pytest.approx(
            model(ids, mask)[0].item(), abs=1e-5
        )
    # an encoder pools (mean) instead
    BertConfig(
        hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, vocab_size=300
    ).save_pretrained(tmp_path / "bert")
    encoder = RewardModel(Backbone(str(tmp_path / "bert"), pretrained=False))
    encoder.configure_model()
    encoder.eval()
    with torch.no_grad():
        assert encoder.pooling == "mean"
        assert encoder(short, torch.ones_like(short))[0].item() == pytest.approx(
            encoder(ids, mask)[0].item(), abs=1e-5
        )


def test_margins_from_config_and_batch_raise_the_loss():
    model = RewardModel(Backbone(pretrained=False), margin=1.0)
    chosen, rejected = torch.tensor([1.0, 0.5]), torch.tensor([0.0, 0.0])
    plain = RewardModel(Backbone(pretrained=False))
    batch = {"margin": torch.tensor([0.0, 2.0])}
    assert model._loss({}, chosen, rejected) > plain._loss({}, chosen, rejected)
    assert model._loss(batch, chosen, rejected) > model._loss({}, chosen, rejected)
