import lightning as L
import pytest
import torch

from ftlab.data import InstructionData
from ftlab.models.backbone import Backbone
from ftlab.objectives import CausalLM
from ftlab.peft import IA3, Adapter, DoRA, LoRA, PrefixTuning, PromptTuning, io


def _trainer(tmp_path, **kw):
    return L.Trainer(
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
        **kw,
    )


def _data(**kw):
    return InstructionData(
        template="alpaca_short",
        max_length=96,
        batch_size=8,
        synthetic_train_size=64,
        synthetic_val_size=8,
        tokenizer="tiny-llama",
        **kw,
    )


def test_training_lowers_loss_and_only_lora_trains(tmp_path):
    L.seed_everything(0)
    model = CausalLM(
        Backbone(pretrained=False),
        LoRA(rank=4, targets=["q_proj", "v_proj"]),
        optimizer=lambda p: torch.optim.AdamW(p, lr=1e-2),
        exact_match=False,
    )
    dm = _data()
    dm.setup()
    batch = next(iter(dm.train_dataloader()))
    model.configure_model()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with torch.no_grad():
        loss0 = model._loss(batch).item()
    _trainer(tmp_path, max_steps=15).fit(model, dm)
    with torch.no_grad():
        loss1 = model._loss(batch).item()
    assert loss1 < loss0 - 0.3
    for n, p in model.named_parameters():
        changed = not torch.equal(before[n], p.detach())
        assert changed == ("lora_" in n), n


def test_exact_match_is_logged_and_generation_respects_left_padding(tmp_path):
    L.seed_everything(0)
    model = CausalLM(Backbone(pretrained=False), LoRA(rank=2))
    dm = _data()
    trainer = _trainer(tmp_path)
    metrics = trainer.validate(model, dm)[0]
    assert 0.0 <= metrics["val/exact_match"] <= 1.0 and metrics["val/loss"] > 0
    # a left-padded prompt generates the same continuation as the same prompt alone
    dm.setup()
    batch = next(iter(dm.val_dataloader()))
    full = model.generate(batch["prompt_ids"], batch["prompt_mask"], max_new_tokens=5)
    i = int(batch["prompt_mask"].sum(1).argmin())
    n = int(batch["prompt_mask"][i].sum())
    alone = model.generate(
        batch["prompt_ids"][i : i + 1, -n:], batch["prompt_mask"][i : i + 1, -n:], max_new_tokens=5
    )
    assert alone[0] == full[i]


def test_adapter_saved_by_fit_reloads_with_same_outputs(tmp_path):
    from ftlab.callbacks import SaveAdapter

    L.seed_everything(0)
    model = CausalLM(
        Backbone(pretrained=False),
        LoRA(rank=4),
        optimizer=lambda p: torch.optim.AdamW(p, lr=1e-2),
        exact_match=False,
    )
    trainer = L.Trainer(
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        max_steps=3,
        default_root_dir=tmp_path,
        callbacks=[SaveAdapter()],
    )
    trainer.fit(model, _data())
    path = tmp_path / "version_0" / "adapter"  # with no logger, the run still gets a directory of its own
    assert (path / io.WEIGHTS).exists() and (path / io.CONFIG).exists()
    # a fresh model built from the same (random, seeded) base loads the adapter
    L.seed_everything(0)
    fresh = CausalLM(Backbone(pretrained=False), adapter=str(path))
    fresh.configure_model()
    fresh.model.load_state_dict(
        {k: v for k, v in model.model.state_dict().items() if "lora_" not in k}, strict=False
    )
    x = torch.randint(0, 256, (2, 12))
    with torch.no_grad():
        assert torch.allclose(model(x), fresh(x), atol=1e-6)
    assert isinstance(fresh.method, LoRA) and fresh.method.rank == 4


def test_max_length_beyond_positions_is_an_error():
    model = CausalLM(Backbone(pretrained=False), LoRA(rank=2), max_length=4096)
    with pytest.raises(ValueError, match="exceeds tiny-llama's 512 positions"):
        model.configure_model()


def test_checkpoint_keeps_only_trainable_tensors():
    model = CausalLM(Backbone(pretrained=True), LoRA(rank=2))
    model.configure_model()
    ckpt = {"state_dict": model.state_dict()}
    model.on_save_checkpoint(ckpt)
    assert ckpt["state_dict"] and all("lora_" in k for k in ckpt["state_dict"])


@pytest.mark.parametrize(
    "method",
    [
        lambda: LoRA(rank=4, targets=["q_proj", "v_proj"]),
        lambda: DoRA(rank=4, targets=["q_proj", "v_proj"]),
        lambda: IA3(),
        lambda: PromptTuning(num_virtual_tokens=8),
        lambda: PrefixTuning(num_virtual_tokens=8),
        lambda: Adapter(placement="houlsby"),
    ],
    ids=["lora", "dora", "ia3", "prompt", "prefix", "adapter"],
)
def test_every_method_trains_under_causal_lm_and_generates(method, tmp_path):
    """The objective knows no method: a few steps lower the loss of a fixed batch, only the method's
    tensors change, and validation generates with the method in place."""
    L.seed_everything(0)
    model = CausalLM(
        Backbone(pretrained=False),
        method(),
        optimizer=lambda p: torch.optim.AdamW(p, lr=1e-2),
        max_new_tokens=4,
    )
    dm = _data()
    dm.setup()
    batch = next(iter(dm.train_dataloader()))
    model.configure_model()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with torch.no_grad():
        loss0 = model._loss(batch).item()
    trainer = _trainer(tmp_path, max_steps=8, limit_val_batches=1)
    trainer.fit(model, dm)
    with torch.no_grad():
        assert model._loss(batch).item() < loss0
    changed = {n for n, p in model.named_parameters() if not torch.equal(before[n], p.detach())}
    assert changed == {n for n, p in model.named_parameters() if p.requires_grad} and changed
    assert "val/exact_match" in trainer.callback_metrics
