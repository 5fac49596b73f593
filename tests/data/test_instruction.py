import json

import pytest
import torch

from ftlab.data import DataError, InstructionData
from ftlab.data.instruction import IGNORE
from ftlab.data.synthetic import TASKS, corpus_documents, instruction_rows


def _write_jsonl(path, rows):
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


def test_synthetic_rows_are_deterministic_and_correct():
    a, b = instruction_rows(40, seed=3), instruction_rows(40, seed=3)
    assert a == b
    assert instruction_rows(40, seed=4) != a
    for row in a:
        if row["task"] == "reverse":
            assert row["output"] == row["input"][::-1]
        elif row["task"] == "upper":
            assert row["output"] == row["input"].upper()
        elif row["task"] == "add":
            x, y = map(int, row["input"].split(" + "))
            assert row["output"] == str(x + y)
        else:
            assert row["output"] == f"{row['input']} {row['input']}"
    assert {r["task"] for r in a} == set(TASKS)
    docs = corpus_documents(5, seed=0)
    assert len(docs) == 5 and all("###" not in d and "Instruction" not in d for d in docs)
    assert corpus_documents(5, seed=0) == docs


def test_prompt_masking_labels_are_ignore_exactly_on_prompt_and_padding():
    dm = InstructionData(
        template="alpaca_short", max_length=128, batch_size=4, synthetic_train_size=8, synthetic_val_size=4
    )
    dm.setup()
    tok = dm.tokenizer
    batch = next(iter(dm.val_dataloader()))
    for i in range(batch["input_ids"].size(0)):
        ids, labels, mask = batch["input_ids"][i], batch["labels"][i], batch["attention_mask"][i]
        n_prompt = int(batch["prompt_mask"][i].sum())
        n_real = int(mask.sum())
        assert (labels[:n_prompt] == IGNORE).all()
        assert (labels[n_real:] == IGNORE).all()
        assert torch.equal(labels[n_prompt:n_real], ids[n_prompt:n_real])
        assert ids[n_real - 1].item() == tok.eos_token_id
        response = tok.decode(ids[n_prompt:n_real], skip_special_tokens=True)
        assert response == batch["references"][i]
        prompt = tok.decode(batch["prompt_ids"][i], skip_special_tokens=True)
        assert prompt.endswith("### Response:\n")
    # prompts are left-padded for generation
    assert (batch["prompt_mask"][:, -1] == 1).all()


def test_train_on_prompt_keeps_prompt_labels():
    dm = InstructionData(
        template="alpaca", train_on_prompt=True, max_length=512, synthetic_train_size=4, synthetic_val_size=2
    )
    dm.setup()
    item = dm.splits["train"][0]
    assert item["labels"] == item["input_ids"]


def test_file_source_with_fields_system_and_history(tmp_path):
    rows = [
        {"q": "Say hi", "a": "hi", "sys": "Be brief.", "history": [["Who are you?", "A model."]]},
        {"q": "Count", "context": "1 2", "a": "3"},
    ]
    path = _write_jsonl(tmp_path / "d.jsonl", rows)
    dm = InstructionData(
        source=str(path),
        fields={"instruction": "q", "output": "a", "system": "sys", "input": "context"},
        val_fraction=0.5,
        max_length=512,
    )
    prompt, response = dm.prompt_and_response({**rows[0], "_where": "x"})
    assert prompt.startswith("Be brief.\n\n### Instruction:\nWho are you?\n\n### Response:\nA model.\n\n")
    assert prompt.endswith("### Instruction:\nSay hi\n\n### Response:\n") and response == "hi"
    prompt, _ = dm.prompt_and_response({**rows[1], "_where": "x"})
    assert "### Input:\n1 2\n\n" in prompt and prompt.startswith("Below is an instruction")
    dm.setup()
    assert len(dm.splits["train"]) == 1 and len(dm.splits["validation"]) == 1


def test_truncation_is_counted_not_dropped(caplog):
    # alpaca_short prompts of these 10 rows are 71-87 tokens, whole samples 76-94: at 89, four samples
    # lose the end of their response and every sample keeps some of it.
    dm = InstructionData(
        template="alpaca_short", max_length=89, synthetic_train_size=10, synthetic_val_size=3
    )
    with caplog.at_level("WARNING", logger="ftlab"):
        dm.setup()
    assert len(dm.splits["train"]) == 10
    assert sorted(len(it["input_ids"]) for it in dm.splits["train"])[-5:] == [88, 89, 89, 89, 89]
    assert "4 of 10 train samples truncated to max_length=89" in caplog.text
    assert "no target token" not in caplog.text


def test_malformed_jsonl_names_file_and_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"instruction": "a", "output": "b"}\n{"instruction": "c", "output": \n')
    with pytest.raises(DataError, match=r"bad.jsonl:2: malformed JSON"):
        InstructionData(source=str(path)).setup()


def test_malformed_json_names_line(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text('[\n {"instruction": "a", "output": "b"},\n {"instruction": oops}\n]')
    with pytest.raises(DataError, match=r"bad.json:3: malformed JSON"):
        InstructionData(source=str(path)).setup()


def test_missing_field_names_field_and_row(tmp_path):
    path = _write_jsonl(tmp_path / "d.jsonl", [{"instruction": "a", "output": "b"}, {"instruction": "c"}])
    with pytest.raises(DataError, match=r"d.jsonl:2: missing field 'output'"):
        InstructionData(source=str(path)).setup()


def test_empty_dataset_and_missing_path(tmp_path):
    path = tmp_path / "empty.jsonl"
    path.write_text("\n")
    with pytest.raises(DataError, match="is empty"):
        InstructionData(source=str(path)).setup()
    with pytest.raises(DataError, match="does not exist"):
        InstructionData(source=str(tmp_path / "nope.jsonl")).setup()


def test_bad_history_and_template():
    dm = InstructionData(template="alpaca")
    with pytest.raises(DataError, match="history"):
        dm.prompt_and_response({"instruction": "a", "output": "b", "history": ["x"], "_where": "f:1"})
    with pytest.raises(ValueError, match="unknown template"):
        InstructionData(template="vicuna")
