"""Padding-free packing: bins, rows, positions, labels, loaders, and the accumulation-window counts."""

import random
from collections import Counter
from types import SimpleNamespace

import pytest
import torch

from ftlab.data import InstructionData, Seq2SeqData, TextData
from ftlab.data.packing import best_fit_decreasing, collate_packed, pack
from ftlab.losses.lm import IGNORE, count_targets


def test_best_fit_decreasing_packs_every_index_once_within_capacity_and_nearly_optimally():
    rng = random.Random(0)
    lengths = [rng.randint(1, 100) for _ in range(300)]
    bins = best_fit_decreasing(lengths, 128, seed=3)
    assert sorted(i for b in bins for i in b) == list(range(300))
    assert all(sum(lengths[i] for i in b) <= 128 for b in bins)
    lower = -(-sum(lengths) // 128)  # no packing can use fewer bins
    assert lower <= len(bins) <= 11 / 9 * lower + 1  # best-fit decreasing's worst-case bound
    assert best_fit_decreasing(lengths, 128, seed=3) == bins  # deterministic for a seed
    ties = [5] * 7 + [3] * 5
    by_seed = {tuple(map(tuple, best_fit_decreasing(ties, 16, seed=s))) for s in range(6)}
    assert len(by_seed) > 1  # the seed orders equal lengths
    with pytest.raises(ValueError, match="1..128"):
        best_fit_decreasing([129], 128)


@pytest.fixture(scope="module")
def instruction_data():
    def make(packing: bool):
        dm = InstructionData(
            template="alpaca_short",
            max_length=192,
            batch_size=3,
            synthetic_train_size=24,
            synthetic_val_size=4,
            packing=packing,
        )
        dm.setup("fit")
        return dm

    return make(False), make(True)


def test_packed_rows_hold_every_sample_once_with_positions_and_labels_restarting(instruction_data):
    plain, packed = instruction_data
    rows = packed.splits["train"]
    assert len(rows) < len(plain.splits["train"])
    assert all(sum(len(it["input_ids"]) for it in r) <= 192 for r in rows)
    assert Counter(tuple(it["input_ids"]) for r in rows for it in r) == Counter(
        tuple(it["input_ids"]) for it in plain.splits["train"]
    )
    batch = collate_packed(rows[:3], pad_id=256)
    ids, pos, labels = batch["input_ids"], batch["position_ids"], batch["labels"]
    mask = batch["attention_mask"]
    assert ids.shape == pos.shape == labels.shape == mask.shape
    for r, row in enumerate(rows[:3]):
        at = 0
        for it in row:
            n = len(it["input_ids"])
            assert ids[r, at : at + n].tolist() == it["input_ids"]
            assert pos[r, at : at + n].tolist() == list(range(n))  # positions restart per sample
            assert labels[r, at].item() == IGNORE  # never predicted from the previous sample
            assert labels[r, at + 1 : at + n].tolist() == it["labels"][1:]
            at += n
        assert mask[r, :at].all() and not mask[r, at:].any() and (labels[r, at:] == IGNORE).all()
        assert pos[r, at:].tolist() == list(range(ids.size(1) - at))  # the tail is a sequence of its own
    assert batch["packing_efficiency"] == pytest.approx(float(mask.float().mean()))
    # the loss counts the same tokens packed as unpacked
    unpacked = plain.collate([it for r in rows[:3] for it in r], "train")
    assert count_targets(labels) == count_targets(unpacked["labels"])


def test_packed_loader_batches_rows_and_validation_stays_unpacked(instruction_data):
    _, packed = instruction_data
    train = next(iter(packed.train_dataloader()))
    assert train["input_ids"].size(0) == 3 and "position_ids" in train  # batch_size counts rows
    val = next(iter(packed.val_dataloader()))
    assert "position_ids" not in val and {"prompt_ids", "prompt_mask", "references"} <= set(val)


def test_text_packs_whole_documents_or_a_stream_and_seq2seq_refuses():
    samples = TextData(max_length=64, packing="samples", synthetic_size=40, batch_size=4)
    samples.setup("fit")
    rows = samples.splits["train"]
    assert isinstance(rows[0], list) and all(sum(len(it["input_ids"]) for it in r) <= 64 for r in rows)
    batch = next(iter(samples.train_dataloader()))
    assert batch["position_ids"][0, 0] == 0 and (batch["labels"] != IGNORE).any()
    stream = TextData(max_length=64, packing=True, synthetic_size=40, batch_size=4)
    stream.setup("fit")
    assert all(len(it["input_ids"]) == 64 for it in stream.splits["train"])
    with pytest.raises(ValueError, match="packing must be"):
        TextData(packing="rows")
    with pytest.raises(ValueError, match="Seq2SeqData cannot pack: T5 and BART take no position_ids"):
        Seq2SeqData(tokenizer="tiny-t5", packing=True)


def test_training_loader_tells_each_batch_the_tokens_of_its_accumulation_window(instruction_data):
    plain, _ = instruction_data
    plain.batch_size = 2
    trainer = SimpleNamespace(
        distributed_sampler_kwargs=None, fit_loop=None, accumulate_grad_batches=3, num_training_batches=5
    )  # 24 samples / 2 = 12 batches; Lightning runs 5
    plain.trainer = trainer
    try:
        batches = list(plain.train_dataloader())
    finally:
        plain.trainer, plain.batch_size = None, 3
    counts = [count_targets(b["labels"]) for b in batches]
    windows = [b["targets_in_step"] for b in batches]
    assert len(set(counts)) > 1  # batches differ in size: a mean of batch means would weigh them wrongly
    # the 5th batch closes the epoch's last (short) accumulation window
    assert windows[:5] == [sum(counts[:3])] * 3 + [sum(counts[3:5])] * 2
    packed_rows = pack([{"input_ids": [1] * n} for n in (3, 4, 5)], 8)
    assert sorted(len(r) for r in packed_rows) == [1, 2]
    assert torch.equal(collate_packed(packed_rows, 0)["position_ids"][0][:1], torch.tensor([0]))
