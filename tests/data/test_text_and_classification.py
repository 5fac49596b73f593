import pytest
import torch

from ftlab.data import ClassificationData, DataError, TextData
from ftlab.data.instruction import IGNORE


def test_text_packing_makes_full_blocks():
    dm = TextData(max_length=32, packing=True, synthetic_size=50, batch_size=4)
    dm.setup()
    blocks = dm.splits["train"]
    assert all(len(it["input_ids"]) == 32 for it in blocks)
    encoded = [
        t
        for r in dm.split_rows()["train"]
        for t in dm.tokenizer(r["text"])["input_ids"] + [dm.tokenizer.eos_token_id]
    ]
    assert [t for it in blocks for t in it["input_ids"]] == encoded[
        : len(encoded) // 32 * 32
    ]  # only the tail dropped
    batch = next(iter(dm.train_dataloader()))
    assert batch["input_ids"].shape == (4, 32) and int(batch["attention_mask"].sum()) >= 3 * 32


def test_text_packing_keeps_a_stream_shorter_than_one_block():
    dm = TextData(max_length=4096, packing=True, synthetic_size=20, val_fraction=0.1, batch_size=4)
    dm.setup()
    assert len(dm.splits["train"]) == 1 and 0 < len(dm.splits["train"][0]["input_ids"]) < 4096


def test_text_without_packing_masks_padding():
    dm = TextData(max_length=512, synthetic_size=20, batch_size=8)
    dm.setup()
    batch = next(iter(dm.train_dataloader()))
    assert torch.equal(batch["labels"] == IGNORE, batch["attention_mask"] == 0)


def test_classification_tsv_folder_with_dev_split(tmp_path):
    (tmp_path / "train.tsv").write_text('sentence\tlabel\nit \'s "good" \t1\nbad one\t0\nfine\t1\n')
    (tmp_path / "dev.tsv").write_text("sentence\tlabel\nnot good\t0\n")
    dm = ClassificationData(source=str(tmp_path), max_length=64, batch_size=2)
    assert dm.num_labels == 2
    assert len(dm.splits["train"]) == 3 and len(dm.splits["validation"]) == 1
    batch = next(iter(dm.val_dataloader()))
    assert batch["labels"].tolist() == [0]
    text = dm.tokenizer.decode(dm.splits["train"][0]["input_ids"], skip_special_tokens=True)
    assert text == 'it \'s "good" '  # raw quotes kept (tsv read without quoting)


def test_classification_label_names_and_unknown_label(tmp_path):
    (tmp_path / "train.csv").write_text("text,y\nhello,pos\nbye,neg\n")
    (tmp_path / "dev.csv").write_text("text,y\nhm,neutral\n")
    dm = ClassificationData(source=str(tmp_path), text_field="text", label_field="y", labels=["neg", "pos"])
    with pytest.raises(DataError, match=r"dev.csv:2: label 'neutral' is not one of \['neg', 'pos'\]"):
        dm.setup()


def test_classification_missing_column_and_ragged_row(tmp_path):
    (tmp_path / "train.csv").write_text("text,label\nhello,1\n")
    with pytest.raises(DataError, match=r"train.csv:2: missing field 'sentence'"):
        ClassificationData(source=str(tmp_path)).setup()
    (tmp_path / "train.csv").write_text("text,label\nhello,1,extra\n")
    with pytest.raises(DataError, match=r"train.csv:2: 3 columns but the header"):
        ClassificationData(source=str(tmp_path), text_field="text").setup()


def test_bad_sizes():
    with pytest.raises(ValueError, match="max_length"):
        TextData(max_length=0)
    with pytest.raises(ValueError, match="batch_size"):
        ClassificationData(batch_size=0)


def test_unlabelled_test_file_is_read_only_for_testing(tmp_path):
    (tmp_path / "train.tsv").write_text("sentence\tlabel\ngood\t1\nbad\t0\n")
    (tmp_path / "dev.tsv").write_text("sentence\tlabel\nfine\t1\n")
    (tmp_path / "test.tsv").write_text("index\tsentence\n0\tunknown\n")  # GLUE: no labels
    dm = ClassificationData(source=str(tmp_path))
    dm.setup("fit")
    assert set(dm.splits) == {"train", "validation"}
    with pytest.raises(DataError, match=r"test.tsv:2: missing field 'label'"):
        dm.setup("test")
