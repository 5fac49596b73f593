import json

import pytest

from ftlab.data import DataError, PromptData
from ftlab.data.prompts import synthetic_prompts


def test_synthetic_prompts_stop_where_the_answer_would_start():
    prompts = synthetic_prompts(40, seed=0)
    assert prompts == synthetic_prompts(40, seed=0) and prompts != synthetic_prompts(40, seed=1)
    assert all(p.strip() and not p.endswith(" ") for p in prompts)
    assert any(p.endswith((" backwards is", " becomes")) for p in prompts)
    assert not any("{" in p for p in prompts)


def test_batches_are_left_padded_and_long_prompts_keep_their_end(caplog):
    dm = PromptData(batch_size=4, synthetic_size=16, max_length=12)
    dm.setup()
    batch = next(iter(dm.val_dataloader()))
    ids, mask = batch["input_ids"], batch["attention_mask"]
    assert ids.shape == mask.shape and ids.size(0) == 4 and len(batch["prompts"]) == 4
    assert (mask[:, -1] == 1).all()  # left padding: every prompt ends at the right edge
    bos = dm.tokenizer.bos_token_id
    first_real = mask.argmax(1)
    assert all(ids[i, first_real[i]].item() == bos for i in range(4))
    long = dm.encode({"prompt": "x" * 30 + "the end"})
    assert long["truncated"] and len(long["input_ids"]) == 12 and long["input_ids"][0] == bos
    assert dm.tokenizer.decode(long["input_ids"][1:]).endswith("the end")
    assert "truncated to max_length=12" in caplog.text


def test_text_json_and_sharegpt_sources(tmp_path):
    txt = tmp_path / "prompts.txt"
    txt.write_text("first prompt\n\n  \nsecond prompt\n")
    val = tmp_path / "val.txt"
    val.write_text("held out\n")
    dm = PromptData(source=str(txt), val_source=str(val), batch_size=2, max_length=32)
    dm.setup()
    assert [it["prompt"] for it in dm.splits["train"]] == ["first prompt", "second prompt"]
    assert [it["prompt"] for it in dm.splits["validation"]] == ["held out"]
    rows = [{"question": "What is up?"}, {"question": [{"from": "human", "value": "Hi"}]}]
    jsonl = tmp_path / "p.jsonl"
    jsonl.write_text("\n".join(json.dumps(r) for r in rows))
    dm = PromptData(source=str(jsonl), field="question", val_fraction=0.0, max_length=32)
    dm.setup()
    assert [it["prompt"] for it in dm.splits["train"]] == ["What is up?", "\n\nHuman: Hi\n\nAssistant:"]


def test_empty_prompt_sets_and_blank_prompts_are_errors(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    with pytest.raises(DataError, match="no prompts in .*empty.txt: the prompt set is empty"):
        PromptData(source=str(empty)).setup()
    with pytest.raises(DataError, match="the prompt set is empty"):
        PromptData(synthetic_size=0).setup()
    blank = tmp_path / "blank.jsonl"
    blank.write_text('{"prompt": "ok"}\n{"prompt": "  "}\n')
    with pytest.raises(DataError, match=r"blank.jsonl:2: field 'prompt' is empty"):
        PromptData(source=str(blank)).setup()
    missing = tmp_path / "missing.jsonl"
    missing.write_text('{"text": "ok"}\n')
    with pytest.raises(DataError, match=r"missing.jsonl:1: missing field 'prompt'"):
        PromptData(source=str(missing)).setup()


def test_instruction_prompts_are_the_embedded_task_and_validate_on_new_words():
    from ftlab.data import InstructionData
    from ftlab.rewards import instruction_answer

    dm = PromptData(synthetic_task="instructions", synthetic_size=64, max_length=96)
    dm.setup()
    val = [it["prompt"] for it in dm.splits["validation"]]
    assert all(p.startswith("### Instruction:\n") and p.endswith("### Response:\n") for p in val)
    assert all(instruction_answer(p) is not None for p in val)
    sft = InstructionData(template="alpaca_short", synthetic_val_size=32, synthetic_train_size=8)
    sft.setup("validate")
    # the held-out prompts are those the SFT step validates on: its scores and the RL step's line up
    assert [sft.prompt_and_response(r)[0] for r in sft.raw_rows("validation")] == val[:32]
