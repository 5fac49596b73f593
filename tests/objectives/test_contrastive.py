import math

import lightning as L
import pytest
import torch
from transformers import BertConfig

from ftlab.data import PairData
from ftlab.models.backbone import Backbone
from ftlab.objectives import Contrastive
from ftlab.objectives.contrastive import recall_at_k, triplet_accuracy
from ftlab.peft import Full, LoRA


def _trainer(tmp_path, steps):
    return L.Trainer(
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        max_steps=steps,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        default_root_dir=tmp_path,
    )


def _validate(model, dm, tmp_path):
    trainer = L.Trainer(
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    return trainer.validate(model, dm, verbose=False)[0]


def _tiny_bert_backbone(tmp_path) -> Backbone:
    BertConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, vocab_size=300
    ).save_pretrained(tmp_path / "tiny-bert")
    return Backbone(str(tmp_path / "tiny-bert"), pretrained=False)


@pytest.mark.parametrize(
    "backbone,pooling", [("tiny-llama", "last"), ("tiny-llama", "mean"), ("bert", "mean"), ("bert", "cls")]
)
def test_pooling_ignores_padding(backbone, pooling, tmp_path):
    torch.manual_seed(0)
    bb = _tiny_bert_backbone(tmp_path) if backbone == "bert" else Backbone(pretrained=False)
    model = Contrastive(bb, pooling=pooling)
    model.configure_model()
    model.eval()
    short, long = torch.randint(3, 250, (1, 5)), torch.randint(3, 250, (1, 9))
    batch = torch.full((2, 9), 0)
    batch[0, :5], batch[1] = short, long
    mask = torch.tensor([[1] * 5 + [0] * 4, [1] * 9])
    with torch.no_grad():
        alone = model(short, torch.ones_like(short))
        padded = model(batch, mask)
    assert torch.allclose(alone[0], padded[0], atol=1e-5)
    assert padded.norm(dim=-1).sub(1).abs().max() < 1e-5  # L2-normalised


def test_auto_pooling_is_last_for_decoders_and_mean_for_encoders(tmp_path):
    decoder, encoder = Contrastive(Backbone(pretrained=False)), Contrastive(_tiny_bert_backbone(tmp_path))
    decoder.configure_model(), encoder.configure_model()
    assert decoder.pooling == "last" and encoder.pooling == "mean"


def _lora():
    return LoRA(rank=8, targets=["q_proj", "k_proj", "v_proj", "o_proj"])


def test_lora_infonce_learns_retrieval_and_saves_the_temperature(tmp_path):
    # ftlab's pretrained tiny-llama: a random one first collapses every embedding onto one direction
    dm = PairData(synthetic_task="triplets", synthetic_size=320, batch_size=16, max_length=48)
    L.seed_everything(0)
    before = _validate(Contrastive(Backbone(), _lora(), pooling="mean", recall_k=[1, 3]), dm, tmp_path)
    L.seed_everything(0)
    model = Contrastive(
        Backbone(),
        _lora(),
        pooling="mean",
        learn_temperature=True,
        symmetric=True,
        recall_k=[1, 3],
        optimizer=lambda p: torch.optim.AdamW(p, lr=3e-3),
    )
    _trainer(tmp_path, 20).fit(model, dm)
    after = _validate(model, dm, tmp_path)
    assert after["val/loss"] < before["val/loss"] - 0.5, (before, after)
    assert after["val/recall@1"] > before["val/recall@1"] + 0.1, (before, after)
    assert 0 <= after["val/recall@1"] <= after["val/recall@3"] <= 1
    assert after["val/triplet_accuracy"] >= before["val/triplet_accuracy"], (before, after)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert "temperature.log_scale" in trainable and all(
        "lora_" in n or n.startswith("temperature") for n in trainable
    )
    assert model.tau().item() != pytest.approx(0.05)  # it moved
    path = model.save_adapter(tmp_path / "adapter")
    loaded = Contrastive(Backbone(), adapter=str(path), pooling="mean", learn_temperature=True)
    loaded.configure_model()
    assert loaded.tau().item() == pytest.approx(model.tau().item())
    model.eval(), loaded.eval()
    x = torch.randint(3, 250, (2, 7))
    with torch.no_grad():
        assert torch.allclose(model(x, torch.ones_like(x)), loaded(x, torch.ones_like(x)), atol=1e-5)


def test_full_cosent_raises_spearman_on_graded_pairs(tmp_path):
    dm = PairData(synthetic_task="scored", synthetic_size=320, batch_size=32, max_length=48)
    L.seed_everything(0)
    before = _validate(Contrastive(Backbone(), Full(), pooling="mean"), dm, tmp_path)
    L.seed_everything(0)
    model = Contrastive(Backbone(), Full(), pooling="mean", optimizer=lambda p: torch.optim.AdamW(p, lr=3e-3))
    _trainer(tmp_path, 20).fit(model, dm)
    after = _validate(model, dm, tmp_path)
    assert -1 <= before["val/spearman"] <= 1 and after["val/spearman"] > before["val/spearman"] + 0.08, (
        before,
        after,
    )
    assert "val/recall@1" not in after


def test_mixed_sources_train_on_the_sum_of_their_losses(tmp_path):
    # STS-style graded pairs (cosine regression under loss=auto) with NLI triplets (InfoNCE)
    lines = ["premise\thypothesis\tlabel"] + [
        f"Man {i} sleeps .\t{h}\t{label}"
        for i in range(8)
        for h, label in ((f"Person {i} rests .", "entailment"), (f"Dog {i} runs .", "contradiction"))
    ]
    (tmp_path / "nli.tsv").write_text("\n".join(lines) + "\n")
    dm = PairData(
        synthetic_task="scored",
        synthetic_size=64,
        batch_size=16,
        max_length=32,
        mix_source=str(tmp_path / "nli.tsv"),
        mix_format="nli",
        mix_batch_size=4,
    )
    model = Contrastive(
        Backbone(), _lora(), loss="auto", graded_loss="cosine", pooling="mean", mix_weight=0.25
    )
    trainer = _trainer(tmp_path, 2)
    trainer.fit(model, dm)
    m = trainer.callback_metrics
    assert m["train/loss_main"] > 0 and m["train/loss_mix"] > 0
    assert m["train/loss"].item() == pytest.approx(
        (m["train/loss_main"] + 0.25 * m["train/loss_mix"]).item(), rel=1e-6
    )
    with pytest.raises(ValueError, match="unknown graded_loss"):
        Contrastive(graded_loss="triplet")
    with pytest.raises(ValueError, match="mix_weight must be >= 0"):
        Contrastive(mix_weight=-1.0)


def test_graded_losses_need_scores():
    model = Contrastive(Backbone(pretrained=False), loss="cosent")
    batch = {
        "input_ids": torch.zeros(4, 3, dtype=torch.long),
        "roles": ["anchor", "positive"],
        "text_ids": torch.arange(4),
    }
    with pytest.raises(ValueError, match="needs graded pairs"):
        model.compute_loss(batch, [torch.randn(2, 8), torch.randn(2, 8)])
    with pytest.raises(ValueError, match="unknown loss"):
        Contrastive(loss="triplet")


def test_recall_at_k_by_hand_counts_any_copy_of_the_target():
    q = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.7, 0.7]])
    c = torch.tensor([[1.0, 0.1], [0.1, 1.0], [-1.0, 0.0]])
    ids = torch.tensor([10, 11, 12])
    assert recall_at_k(q, c, torch.tensor([10, 12, 11]), ids, 1).item() == pytest.approx(1 / 3)
    assert recall_at_k(q, c, torch.tensor([10, 12, 11]), ids, 2).item() == pytest.approx(2 / 3)
    assert recall_at_k(q, c, torch.tensor([10, 12, 11]), ids, 10).item() == 1.0


def test_infonce_on_a_triplet_batch_by_hand():
    # The batch holds anchors, positives, hard negatives (role-major); logits = cos / τ, τ = 0.5.
    # Hard negative 2 is the same text as positive 1: for row 1 it is the right answer again, for
    # row 2 a copy of a column already counted. Both leave it out.
    model = Contrastive(Backbone(pretrained=False), loss="infonce", temperature=0.5)
    a = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    p = torch.tensor([[1.0, 0.0], [0.6, 0.8]])
    n = torch.tensor([[-1.0, 0.0], [1.0, 0.0]])
    batch = {"text_ids": torch.tensor([10, 11, 20, 21, 30, 20]), "roles": ["anchor", "positive", "negative"]}
    row1 = math.log(math.exp(2.0) + math.exp(1.2) + math.exp(-2.0)) - 2.0  # [p1, p2, n1]: cos 1, .6, -1
    row2 = math.log(math.exp(0.0) + math.exp(1.6) + math.exp(0.0)) - 1.6  # [p1, p2, n1]: cos 0, .8, 0
    assert model.compute_loss(batch, [a, p, n]).item() == pytest.approx((row1 + row2) / 2, abs=1e-6)
    # with every text distinct, n2 joins both rows: cos 1 for row 1, 0 for row 2
    batch["text_ids"] = torch.arange(6)
    row1 = math.log(math.exp(2.0) + math.exp(1.2) + math.exp(-2.0) + math.exp(2.0)) - 2.0
    row2 = math.log(math.exp(0.0) + math.exp(1.6) + math.exp(0.0) + math.exp(0.0)) - 1.6
    assert model.compute_loss(batch, [a, p, n]).item() == pytest.approx((row1 + row2) / 2, abs=1e-6)


def test_triplet_accuracy_by_hand():
    a = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]])
    p = torch.tensor([[0.9, 0.1], [1.0, 0.0], [0.6, 0.8]])
    n = torch.tensor([[0.0, 1.0], [0.0, 2.0], [0.6, 0.8]])
    # row 1 closer to its positive; row 2 closer to its negative; row 3 a tie, which is not a win
    assert triplet_accuracy(a, p, n).item() == pytest.approx(1 / 3)


def test_cli_links_the_minilm_tokenizer_into_the_contrastive_config(monkeypatch):
    from pathlib import Path

    from ftlab.cli import FtlabCLI
    from ftlab.objectives._base import Objective

    monkeypatch.chdir(Path(__file__).parents[2])
    cli = FtlabCLI(
        Objective,
        subclass_mode_model=True,
        subclass_mode_data=True,
        run=False,
        args=["--config", "configs/contrastive.yaml", "--trainer.logger=false"],
    )
    assert (
        cli.datamodule.tokenizer_name == "minilm" and cli.model.max_length == cli.datamodule.max_length == 64
    )
    # the recipe chosen in experiments/contrastive: cosine regression on STS-B, InfoNCE on SNLI at 0.02
    assert isinstance(cli.model, Contrastive) and cli.model.loss_name == "auto"
    assert (cli.model.graded_loss, cli.model.mix_weight) == ("cosine", 0.02)
    assert cli.datamodule.mix_source.endswith("snli_dev_test/dev.tsv") and cli.datamodule.mix_format == "nli"


# ---------------------------------------------------------------- in-batch negatives under DDP
def _local_and_global(model: Contrastive, ref: Contrastive, rank: int, world: int, roles: int, scored: bool):
    """Rank ``rank``'s loss with gathering and its DDP-averaged gradient, and one process's loss and
    gradient on the concatenated batch; a linear map stands in for the encoder."""
    torch.manual_seed(0)  # the same encoder and global batch on every rank
    encoder = torch.nn.Linear(6, 4)
    feats = torch.randn(5, roles, 6)  # 5 rows in all: rank 0 holds 3, rank 1 holds 2
    ids = torch.arange(5 * roles).view(5, roles)
    ids[4, 1] = ids[0, 1]  # one positive text on both ranks: not a negative of either anchor
    score = torch.tensor([0.9, 0.1, 0.5, 0.7, 0.3])

    def run(m: Contrastive, rows: list[int]):
        encoder.zero_grad()
        embs = [encoder(feats[rows, r]) for r in range(roles)]  # [(b, 4)] * roles
        batch = {"text_ids": ids[rows].T.reshape(-1), "roles": ["anchor", "positive", "negative"][:roles]}
        if scored:
            batch["score"] = score[rows]
        loss = m.compute_loss(batch, embs)
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in encoder.parameters()]

    loss, grads = run(model, [[0, 1, 2], [3, 4]][rank])
    for g in grads:  # what DDP does to parameter gradients
        torch.distributed.all_reduce(g)
        g /= world
    return (loss, grads), run(ref, list(range(5)))


def _ddp_worker(rank: int, world: int, store: str) -> None:
    torch.distributed.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        cases = [
            ({"loss": "infonce", "temperature": 0.1, "symmetric": True}, 3, False),  # hard negatives too
            ({"loss": "cosent"}, 2, True),
        ]
        for kwargs, roles, scored in cases:
            gathered = Contrastive(Backbone(pretrained=False), **kwargs)
            one = Contrastive(Backbone(pretrained=False), gather_across_processes=False, **kwargs)
            (loss, grads), (ref_loss, ref_grads) = _local_and_global(
                gathered, one, rank, world, roles, scored
            )
            assert torch.allclose(loss, ref_loss, atol=1e-6), (kwargs, rank, loss, ref_loss)
            for g, r in zip(grads, ref_grads):
                assert torch.allclose(g, r, atol=1e-6), (kwargs, rank, g, r)
            # the switch off: each process sees its local batch only, a different loss
            local, _ = _local_and_global(one, one, rank, world, roles, scored)
            assert (local[0] - ref_loss).abs() > 1e-3, (kwargs, rank)
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.distributed
def test_gathered_loss_and_gradient_equal_one_process_with_the_concatenated_batch(tmp_path):
    # Two gloo processes with unequal local batches (3 and 2 rows), a positive shared across them.
    torch.multiprocessing.spawn(_ddp_worker, args=(2, str(tmp_path / "store")), nprocs=2)
