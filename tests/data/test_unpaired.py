"""Unpaired preference data for KTO: labelled rows, conversion from pairs, mismatched rows, one-label "
"errors."""

import json

import pytest

from ftlab.data import DataError, UnpairedPreferenceData
from ftlab.data.unpaired import pairs_to_unpaired, parse_label

IGNORE = -100


def _jsonl(path, rows):
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return str(path)


def test_pairs_become_a_desirable_and_an_undesirable_example():
    pairs = [{"prompt": "p1", "chosen": "good one", "rejected": "bad one", "_where": "f:1"}]
    assert pairs_to_unpaired(pairs) == [
        {"prompt": "p1", "completion": "good one", "label": True, "_where": "f:1"},
        {"prompt": "p1", "completion": "bad one", "label": False, "_where": "f:1"},
    ]
    dm = UnpairedPreferenceData(synthetic_size=40, val_fraction=0, max_length=64)
    dm.setup()
    assert dm.counts["train"] == {"desirable": 40, "undesirable": 40} and len(dm.splits["train"]) == 80


def test_unpaired_rows_labels_and_batches(tmp_path):
    rows = [
        {"prompt": "Say hi.", "completion": "hi there", "label": True},
        {"prompt": "Say hi.", "completion": "go away", "label": "bad"},
        {"prompt": "Count.", "completion": "one two", "label": 1},
    ]
    dm = UnpairedPreferenceData(
        source=_jsonl(tmp_path / "u.jsonl", rows), val_fraction=0, batch_size=3, max_length=64, seed=0
    )
    dm.setup()
    assert dm.counts["train"] == {"desirable": 2, "undesirable": 1}
    batch = dm.collate(dm.splits["train"], "train")
    tok = dm.tokenizer
    ids, labels, good = batch["input_ids"], batch["labels"], batch["desirable"]
    assert (
        ids.shape == labels.shape == batch["attention_mask"].shape and good.dtype.is_floating_point is False
    )
    for i in range(3):  # labels cover " <completion></s>" and nothing of the prompt
        counted = labels[i][labels[i] != IGNORE]
        assert counted[-1].item() == tok.eos_token_id
        assert tok.decode(counted[:-1]) in {" hi there", " go away", " one two"}
    # mismatched rows: prompt i with the completion of example i + 1 of the split (cyclically)
    kl = batch["kl_input_ids"]
    texts = [
        tok.decode(kl[i][batch["kl_attention_mask"][i].bool()], skip_special_tokens=True) for i in range(3)
    ]
    completions = [tok.decode(labels[i][labels[i] != IGNORE][:-1]) for i in range(3)]
    prompts = [
        t[: -len(c)]
        for t, c in zip(
            [
                tok.decode(ids[i][batch["attention_mask"][i].bool()], skip_special_tokens=True)
                for i in range(3)
            ],
            completions,
        )
    ]
    assert texts == [prompts[i] + completions[(i + 1) % 3] for i in range(3)]


def test_one_label_only_and_bad_labels_are_clear_errors(tmp_path):
    rows = [{"prompt": "p", "completion": f"answer {i}", "label": True} for i in range(6)]
    with pytest.raises(
        DataError,
        match="all 6 training examples are desirable; KTO learns from desirable and "
        "undesirable examples together",
    ):
        UnpairedPreferenceData(source=_jsonl(tmp_path / "u.jsonl", rows), val_fraction=0).setup()
    rows[2]["label"] = "maybe"
    with pytest.raises(DataError, match=r"u2.jsonl:3: field 'label' = 'maybe' is not a label"):
        UnpairedPreferenceData(source=_jsonl(tmp_path / "u2.jsonl", rows), val_fraction=0).setup()
    assert parse_label("Undesirable", "x") is False and parse_label(1.0, "x") is True
    with pytest.raises(DataError, match="field 'label'"):
        parse_label(2, "x")
