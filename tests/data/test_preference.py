import json
from pathlib import Path

import pytest

from ftlab.data import DataError, PreferenceData
from ftlab.data.preference import clean_pairs, labelstudio_pairs, split_hh

SHARED = Path(__file__).parents[2] / ".." / "shared" / "data"


def _jsonl(path, rows):
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return str(path)


def _hh(question, answer):
    opening = "\n\nHuman: hi there\n\nAssistant: hello, how can I help?"
    return f"{opening}\n\nHuman: {question}\n\nAssistant: {answer}"


def test_hh_split_takes_the_shared_conversation_as_prompt():
    prompt, chosen, rejected = split_hh(
        _hh("a pun?", "Time flies like an arrow, they say."),
        _hh("a pun?", "No, I will not do that for you."),
        "f:1",
    )
    assert prompt == "\n\nHuman: hi there\n\nAssistant: hello, how can I help?\n\nHuman: a pun?\n\nAssistant:"
    assert chosen == "Time flies like an arrow, they say." and rejected == "No, I will not do that for you."
    # responses starting with the same words: the prompt still ends at the last assistant marker
    prompt, chosen, rejected = split_hh(
        _hh("q", "Sure thing, here it is."), _hh("q", "Sure thing, no."), "f:1"
    )
    assert prompt.endswith("\n\nHuman: q\n\nAssistant:") and chosen == "Sure thing, here it is."


def test_hh_rows_without_a_shared_prompt_name_file_and_line(tmp_path):
    rows = [
        {"chosen": _hh("q", "one two three four five"), "rejected": _hh("q", "five four three two one")},
        {
            "chosen": "\n\nHuman: a\n\nAssistant: x y z w v",
            "rejected": "\n\nHuman: b\n\nAssistant: x y z w v",
        },
    ]
    with pytest.raises(DataError, match=r"hh.jsonl:2: fields 'chosen' and 'rejected' share no prompt"):
        PreferenceData(source=_jsonl(tmp_path / "hh.jsonl", rows)).setup()
    rows[1] = {
        "chosen": _hh("q", "a b c d e") + "\n\nHuman: more\n\nAssistant: f g h i j",
        "rejected": _hh("q", "v w x y z") + "\n\nHuman: more\n\nAssistant: f g h i j",
    }
    with pytest.raises(DataError, match=r"hh.jsonl:2: .*differ before their last assistant turn"):
        PreferenceData(source=_jsonl(tmp_path / "hh.jsonl", rows)).setup()


def test_cleaning_counts_each_rule_and_logs_them(tmp_path, caplog):
    long_a, long_b = "this answer has plenty of words", "that answer also has enough words"
    rows = (
        [{"prompt": "p", "chosen": long_a, "rejected": long_b}] * 6
        + [{"prompt": "p", "chosen": long_a, "rejected": long_a + "  "}] * 2  # equal once stripped
        + [{"prompt": "p", "chosen": "too short", "rejected": long_b}] * 3
        + [{"prompt": "p", "chosen": long_a, "rejected": "four words only here"}]
    )
    kept, counts = clean_pairs([dict(r) for r in rows], min_words=5)
    assert counts == {"rows": 12, "identical": 2, "too_short": 4, "kept": 6} and len(kept) == 6
    assert clean_pairs([dict(r) for r in rows], min_words=0)[1]["kept"] == 10
    dm = PreferenceData(source=_jsonl(tmp_path / "p.jsonl", rows), val_fraction=0, max_length=64)
    with caplog.at_level("INFO", logger="ftlab"):
        dm.setup()
    assert dm.cleaning["train"] == counts and len(dm.splits["train"]) == 6
    assert "12 pairs; dropped 2 with chosen == rejected, 4 with a side under 5 words; kept 6" in caplog.text


def test_oasst_turn_list_prompts_are_rendered(tmp_path):
    rows = [
        {
            "prompt": [
                {"from": "human", "value": "Plan a trip"},
                {"from": "gpt", "value": "Where to?"},
                {"from": "human", "value": "Hungary"},
            ],
            "chosen": "Start in Budapest and take the train to Pecs.",
            "rejected": "I do not know much about it.",
            "chosen_rank": 0,
            "rejected_rank": 1,
        }
    ]
    rows = PreferenceData(source=_jsonl(tmp_path / "o.jsonl", rows)).raw_rows("train")
    assert (
        rows[0]["prompt"] == "\n\nHuman: Plan a trip\n\nAssistant: Where to?\n\nHuman: Hungary\n\nAssistant:"
    )
    bad = [{"prompt": [{"from": "robot", "value": "x"}], "chosen": "a b c d e", "rejected": "e d c b a"}]
    with pytest.raises(DataError, match=r"o.jsonl:1: field prompt\[0\].from = 'robot'"):
        PreferenceData(source=_jsonl(tmp_path / "o.jsonl", bad)).raw_rows("train")


def test_empty_prompt_and_missing_field(tmp_path):
    rows = [{"prompt": " ", "chosen": "a b c d e", "rejected": "e d c b a"}]
    with pytest.raises(DataError, match=r"e.jsonl:1: field 'prompt' is empty"):
        PreferenceData(source=_jsonl(tmp_path / "e.jsonl", rows)).raw_rows("train")
    rows = [{"prompt": "q", "chosen": "a b c d e"}]
    with pytest.raises(DataError, match=r"e.jsonl:1: missing field 'rejected'"):
        PreferenceData(source=_jsonl(tmp_path / "e.jsonl", rows), format="records").raw_rows("train")


def _ls_task(i, selected="left", kind="pairwise", cancelled=False, annotations=True):
    result = [
        {
            "value": {"selected": selected} if kind == "pairwise" else {"choices": ["A"]},
            "from_name": "comparison",
            "to_name": "comparison",
            "type": kind,
            "origin": "manual",
        }
    ]
    anns = [{"id": 100 + i, "result": result, "was_cancelled": cancelled}] if annotations else []
    return {
        "id": i,
        "annotations": anns,
        "data": {
            "prompt": f"Question {i}?",
            "answer1": f"left answer number {i} with words",
            "answer2": f"right answer number {i} with words",
        },
        "project": 1,
        "predictions": [],
    }


def test_labelstudio_export_becomes_pairs(tmp_path):
    tasks = [
        _ls_task(1, "left"),
        _ls_task(2, "right"),
        _ls_task(3, cancelled=True),
        _ls_task(4, annotations=False),
    ]
    path = tmp_path / "export.json"
    path.write_text(json.dumps(tasks))
    dm = PreferenceData(source=str(path), val_fraction=0, max_length=64)
    rows = dm.raw_rows("train")
    assert [(r["prompt"], r["chosen"].split()[0], r["rejected"].split()[0]) for r in rows] == [
        ("Question 1?", "left", "right"),
        ("Question 2?", "right", "left"),
    ]
    _, counts = labelstudio_pairs([{**t, "_where": "x"} for t in tasks])
    assert counts == {"tasks": 4, "unlabelled": 2, "cancelled": 1, "empty": 0}


def test_labelstudio_export_of_another_template_is_an_error(tmp_path):
    path = tmp_path / "export.json"
    path.write_text(json.dumps([_ls_task(1), _ls_task(7, kind="choices")]))
    with pytest.raises(
        DataError, match=r"export.json:record 1 \(task 7\): annotation 107 has no 'pairwise' result"
    ):
        PreferenceData(source=str(path)).raw_rows("train")
    task = _ls_task(8)
    del task["data"]["answer2"]
    path.write_text(json.dumps([task]))
    with pytest.raises(DataError, match=r"export.json:record 0 \(task 8\): missing field 'data.answer2'"):
        PreferenceData(source=str(path)).raw_rows("train")
    task = _ls_task(9, selected="middle")
    path.write_text(json.dumps([task]))
    with pytest.raises(DataError, match=r"task 9\): field 'result.value.selected' = 'middle'"):
        PreferenceData(source=str(path)).raw_rows("train")


def test_truncation_keeps_the_responses_and_ends_on_eos(tmp_path):
    rows = [
        {
            "prompt": "x" * 200 + " END OF PROMPT",
            "chosen": "the good answer is here",
            "rejected": "the bad one is here ok",
        }
    ]
    dm = PreferenceData(
        source=_jsonl(tmp_path / "t.jsonl", rows), val_fraction=0, max_length=60, batch_size=1
    )
    dm.setup()
    tok = dm.tokenizer
    batch = next(iter(dm.train_dataloader()))
    assert batch["input_ids"].shape[0] == 2 and batch["input_ids"].shape[1] <= 60
    chosen, rejected = (
        tok.decode(ids[m.bool()]) for ids, m in zip(batch["input_ids"], batch["attention_mask"])
    )
    assert chosen.endswith("END OF PROMPT the good answer is here</s>") and chosen.startswith("<s>xxx")
    assert rejected.endswith("END OF PROMPT the bad one is here ok</s>")


def test_margin_field_and_synthetic_task():
    dm = PreferenceData(synthetic_size=40, batch_size=8, max_length=96)
    dm.setup()
    batch = next(iter(dm.train_dataloader()))
    assert batch["input_ids"].shape[0] == 16 and "margin" not in batch
    assert dm.cleaning["train"]["kept"] == 40  # synthetic pairs pass cleaning
    assert PreferenceData(synthetic_size=40).synthetic_rows("train") == dm.synthetic_rows("train")


def test_margin_column(tmp_path):
    rows = [{"prompt": "q", "chosen": "a b c d e f", "rejected": "f e d c b a", "gap": g} for g in (1, 2.5)]
    dm = PreferenceData(
        source=_jsonl(tmp_path / "m.jsonl", rows), fields={"margin": "gap"}, val_fraction=0, batch_size=2
    )
    dm.setup()
    assert sorted(next(iter(dm.train_dataloader()))["margin"].tolist()) == [1.0, 2.5]
    rows[1]["gap"] = "big"
    with pytest.raises(DataError, match=r"m.jsonl:2: field 'gap' = 'big' is not a number"):
        PreferenceData(source=_jsonl(tmp_path / "m.jsonl", rows), fields={"margin": "gap"}).setup()


@pytest.mark.skipif(not (SHARED / "hh_rlhf_harmless_base_test").exists(), reason="needs ../shared/data")
def test_real_hh_oasst_and_labelstudio_files():
    hh = PreferenceData(source=str(SHARED / "hh_rlhf_harmless_base_test" / "test.jsonl.gz"))
    assert len(hh.raw_rows("train")) == 2062 and hh.cleaning["train"] == {
        "rows": 2312,
        "identical": 0,
        "too_short": 250,
        "kept": 2062,
    }
    oasst = PreferenceData(source=str(SHARED / "oasst1_en_100_trees" / "en_100_ranked_pairs.jsonl"))
    rows = oasst.raw_rows("train")
    assert oasst.cleaning["train"]["rows"] == 732 and all(
        r["prompt"].endswith("\n\nAssistant:") for r in rows
    )
    ls = PreferenceData(source=str(SHARED / "labelstudio_pairwise_export" / "ls_output_data.json"))
    assert ls.cleaning == {} and ls.raw_rows("train") and ls.cleaning["train"]["rows"] == 32


def test_pair_batches_label_the_responses_only():
    dm = PreferenceData(synthetic_size=16, batch_size=4, max_length=96)
    dm.setup()
    batch = next(iter(dm.val_dataloader()))
    tok = dm.tokenizer
    rows = dm.raw_rows("validation")[:4]
    for i, row in enumerate(rows + rows):
        counted = batch["labels"][i][batch["labels"][i] != -100]
        side = row["chosen"] if i < 4 else row["rejected"]
        assert tok.decode(counted[:-1]) == " " + side and counted[-1].item() == tok.eos_token_id


def test_instruction_pairs_prefer_the_correct_answer_to_a_plausible_wrong_one():
    from ftlab.data.rule_pairs import instruction_pairs
    from ftlab.rewards import instruction_answer, instruction_following

    pairs = instruction_pairs(200, seed=3)
    assert pairs == instruction_pairs(200, seed=3) and pairs != instruction_pairs(200, seed=4)
    prompts = [p["prompt"] for p in pairs]
    assert instruction_following(prompts, [p["chosen"] for p in pairs]) == [1.0] * 200
    assert instruction_following(prompts, [p["rejected"] for p in pairs]) == [0.0] * 200
    assert all(instruction_answer(p) == row["chosen"] for p, row in zip(prompts, pairs))
    # the wrong answers are near misses, of about the right length, not noise
    assert sum(abs(len(p["rejected"]) - len(p["chosen"])) <= 2 for p in pairs) > 150
    dm = PreferenceData(synthetic_task="instructions", synthetic_size=64, min_words=0, max_length=112)
    dm.setup()
    assert len(dm.splits["train"]) == 64 and len(dm.splits["validation"]) == 64
    with pytest.raises(ValueError, match="unknown synthetic_task"):
        PreferenceData(synthetic_task="poems")
