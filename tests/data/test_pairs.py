import json
from pathlib import Path

import pytest
import torch
from conftest import nli_tsv

from ftlab.data import DataError, PairData
from ftlab.data.pairs import read_sts, text_id

SHARED = Path(__file__).parents[2] / ".." / "shared" / "data"

# Real STS-B quirks: no header, tab-separated, quotes that are not CSV quoting, and some rows with
# two extra licence columns.
STS_ROWS = [
    "main-captions\tMSRvid\t2012test\t0001\t5.000\tA plane is taking off.\tAn air plane is taking off.",
    'main-news\theadlines\t2013\t0002\t1.400\tHe said "no" to them.\t"Yes," she said, \'maybe\'.',
    "main-forums\tanswer-answer\t2016\t0008\t3\tIt depends on the school.\tIt really "
    "depends.\tStackExchange: a\tStackExchange: b",
    "main-captions\tMSRvid\t2012test\t0004\t0.000\tA man plays a flute.\tA dog runs.",
]


def _sts_folder(tmp_path, train=STS_ROWS, dev=STS_ROWS[:2], test=STS_ROWS[2:]):
    for name, rows in (("train", train), ("dev", dev), ("test", test)):
        (tmp_path / f"sts-{name}.csv").write_text("\n".join(rows) + "\n", encoding="utf-8")
    return str(tmp_path)


def test_sts_files_read_with_extra_columns_and_raw_quotes(tmp_path):
    rows = read_sts(Path(_sts_folder(tmp_path)) / "sts-train.csv")
    assert [r["score"] for r in rows] == ["5.000", "1.400", "3", "0.000"]
    assert (
        rows[1]["sentence1"] == 'He said "no" to them.'
        and rows[1]["sentence2"] == "\"Yes,\" she said, 'maybe'."
    )
    assert rows[2]["sentence2"] == "It really depends." and rows[2]["_where"].endswith("sts-train.csv:3")


def test_sts_folder_gives_three_splits_and_scaled_scores(tmp_path):
    dm = PairData(source=_sts_folder(tmp_path), batch_size=4, max_length=64)
    dm.setup("fit")
    dm.setup("test")  # the test file is read when testing
    assert {k: len(v) for k, v in dm.splits.items()} == {"train": 4, "validation": 2, "test": 2}
    batch = next(iter(dm.train_dataloader()))
    assert batch["roles"] == ["anchor", "positive"] and batch["input_ids"].size(0) == 8
    assert sorted(batch["score"].tolist()) == pytest.approx([0.0, 0.28, 0.6, 1.0])


def test_sts_score_outside_range_names_file_line_and_field(tmp_path):
    bad = STS_ROWS[:2] + ["main-news\theadlines\t2013\t0009\t5.2\ta b\tc d"]
    with pytest.raises(
        DataError, match=r"sts-train.csv:3: field 'score' = 5.2 is outside score_range \[0, 5\]"
    ):
        PairData(source=_sts_folder(tmp_path, train=bad)).setup()
    bad = STS_ROWS[:1] + ["main-news\theadlines\t2013\t0009\thigh\ta b\tc d"]
    with pytest.raises(DataError, match=r"sts-train.csv:2: field 'score' = 'high' is not a number"):
        PairData(source=_sts_folder(tmp_path, train=bad)).setup()


def test_sts_short_row_names_file_and_line(tmp_path):
    bad = STS_ROWS[:1] + ["main-news\theadlines\t2013\t0009\t2.0\tonly one sentence"]
    with pytest.raises(DataError, match=r"sts-train.csv:2: 6 tab-separated fields"):
        PairData(source=_sts_folder(tmp_path, train=bad)).setup()


def test_records_with_field_mapping_and_custom_score_range(tmp_path):
    path = tmp_path / "pairs.jsonl"
    path.write_text(
        "\n".join(json.dumps({"a": f"text {i}", "b": f"other {i}", "y": i / 10}) for i in range(10))
    )
    dm = PairData(
        source=str(path),
        fields={"sentence1": "a", "sentence2": "b", "score": "y"},
        score_range=[0, 1],
        val_fraction=0.2,
        batch_size=8,
    )
    dm.setup()
    assert len(dm.splits["train"]) == 8 and len(dm.splits["validation"]) == 2
    batch = next(iter(dm.val_dataloader()))
    assert torch.all((batch["score"] >= 0) & (batch["score"] <= 1))


def test_missing_column_names_file_line_and_field(tmp_path):
    path = tmp_path / "triplets.csv"
    path.write_text("anchor,positive,negative\na,b,c\nd,,f\n")
    dm = PairData(source=str(path))
    dm.setup()  # an empty csv cell is an empty string, not a missing field
    path.write_text("anchor,negative\na,c\n")
    with pytest.raises(DataError, match=r"triplets.csv:2: missing field 'positive'"):
        PairData(source=str(path)).setup()
    path = tmp_path / "scored.jsonl"
    path.write_text('{"sentence1": "a", "sentence2": "b", "score": 1}\n{"sentence1": "a", "score": 2}\n')
    with pytest.raises(DataError, match=r"scored.jsonl:2: missing field 'sentence2'"):
        PairData(source=str(path)).setup()


def test_mixed_pairs_and_triplets_are_an_error(tmp_path):
    path = tmp_path / "mixed.jsonl"
    rows = [{"anchor": "a", "positive": "b", "negative": "c"}, {"anchor": "d", "positive": "e"}] * 3
    path.write_text("\n".join(json.dumps(r) for r in rows))
    with pytest.raises(DataError, match=r"mixed.jsonl:2: the train split mixes"):
        PairData(source=str(path), val_fraction=0).setup()


def test_nli_rows_become_triplets(tmp_path, caplog):
    path = tmp_path / "nli.tsv"
    path.write_text(
        "premise\thypothesis\tlabel\n"
        "A man sleeps .\tA person rests .\tentailment\n"
        "A man sleeps .\tA man runs .\tcontradiction\n"
        "A man sleeps .\tA man dreams .\tneutral\n"
        "A man sleeps .\tSomeone is asleep .\tentailment\n"
        "Kids play .\tChildren play .\tentailment\n"  # no contradiction: skipped
    )
    dm = PairData(source=str(path), val_fraction=0, batch_size=4)
    with caplog.at_level("INFO", logger="ftlab"):
        rows = dm.raw_rows("train")
    assert [r["texts"] for r in rows] == [
        ["A man sleeps .", "A person rests .", "A man runs ."],
        ["A man sleeps .", "Someone is asleep .", "A man runs ."],
    ]
    assert "1 of 2 premises lack" in caplog.text
    dm.setup()
    batch = next(iter(dm.train_dataloader()))
    assert batch["roles"] == ["anchor", "positive", "negative"] and batch["input_ids"].size(0) == 6
    ids = batch["text_ids"].view(3, 2)
    assert ids[0, 0] == ids[0, 1] == text_id("A man sleeps .")  # duplicate anchors share an id
    path.write_text("premise\thypothesis\tlabel\nA\tB\tmaybe\n")
    with pytest.raises(DataError, match=r"nli.tsv:2: field 'label' = 'maybe'"):
        PairData(source=str(path), val_fraction=0).setup()


def test_mix_source_gives_a_batch_of_each_source_per_step(tmp_path):
    # 64 graded pairs in batches of 8 (8 steps) beside 6 NLI triplets in batches of 3 (2, cycled)
    dm = PairData(
        synthetic_task="scored",
        synthetic_size=64,
        batch_size=8,
        max_length=32,
        mix_source=nli_tsv(tmp_path / "nli.tsv", 6),
        mix_format="nli",
        mix_batch_size=3,
    )
    dm.setup("fit")
    steps = [batch for batch, _, _ in dm.train_dataloader()]
    assert len(steps) == 8
    assert all(b["main"]["score"].shape == (8,) and b["main"]["input_ids"].size(0) == 16 for b in steps)
    assert all(
        b["mix"]["roles"] == ["anchor", "positive", "negative"] and b["mix"]["input_ids"].size(0) == 9
        for b in steps
    )
    anchors = torch.cat([b["mix"]["text_ids"][:3] for b in steps])  # (24,): 6 premises, each 4 times
    assert sorted(anchors.unique(return_counts=True)[1].tolist()) == [4] * 6
    assert dm.val_dataloader().dataset is dm.splits["validation"]  # validation: the main source only
    with pytest.raises(ValueError, match="mix_batch_size must be > 0"):
        PairData(mix_source="x.tsv", mix_batch_size=0)


def test_synthetic_tasks_are_deterministic_and_learnable_in_shape():
    a, b = (
        PairData(synthetic_task="scored", synthetic_size=50),
        PairData(synthetic_task="scored", synthetic_size=50),
    )
    assert a.synthetic_rows("train") == b.synthetic_rows("train")
    rows = a.synthetic_rows("train")
    for row in rows:
        shared = set(row["sentence1"].split()) & set(row["sentence2"].split())
        assert len(shared) == row["score"]
    triplets = PairData(synthetic_task="triplets", synthetic_size=20)
    triplets.setup()
    batch = next(iter(triplets.train_dataloader()))
    assert batch["roles"] == ["anchor", "positive", "negative"] and "score" not in batch
    # role-major layout: rows [0, B) anchors, [B, 2B) positives, [2B, 3B) negatives
    B = batch["input_ids"].size(0) // 3
    first = triplets.tokenizer.decode(batch["input_ids"][B], skip_special_tokens=True)
    assert first in {it for r in triplets.synthetic_rows("train") for it in [r["positive"]]}


def test_truncation_is_counted(caplog):
    dm = PairData(max_length=12, synthetic_size=20)
    with caplog.at_level("INFO", logger="ftlab"):
        dm.setup()
    assert all(len(ids) <= 12 for it in dm.splits["train"] for ids in it["ids"])
    assert "20 of 20 train samples truncated to max_length=12" in caplog.text


def test_bad_arguments():
    with pytest.raises(ValueError, match="score_range"):
        PairData(score_range=[5, 0])
    with pytest.raises(ValueError, match="unknown keys"):
        PairData(fields={"query": "q"})


@pytest.mark.skipif(not (SHARED / "stsbenchmark").exists(), reason="needs ../shared/data/stsbenchmark")
def test_real_stsb_counts_and_nine_column_rows():
    counts = {n: len(read_sts(SHARED / "stsbenchmark" / f"sts-{n}.csv")) for n in ("train", "dev", "test")}
    assert counts == {"train": 5749, "dev": 1500, "test": 1379}
    scores = [float(r["score"]) for r in read_sts(SHARED / "stsbenchmark" / "sts-test.csv")]
    assert min(scores) == 0.0 and max(scores) == 5.0
