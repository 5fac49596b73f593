"""Data tools: ROUGE-L filter (against a brute-force reference), FLAN templating, ShareGPT, Label Studio."""

import json
import random
from pathlib import Path

import pytest

from ftlab.cli import main as ftlab_main
from ftlab.data import DataError
from ftlab.data.curation import lcs_length, rouge_filter, rouge_l, rouge_tokens
from ftlab.data.flan import TASKS, apply_templates
from ftlab.data.sharegpt import conversation_to_instruction
from ftlab.data.tools import main

SHARED = Path(__file__).parents[2] / ".." / "shared" / "data"


def _lcs_dp(a, b):
    table = [[0] * (len(b) + 1) for _ in range(len(a) + 1)]
    for i, x in enumerate(a):
        for j, y in enumerate(b):
            table[i + 1][j + 1] = table[i][j] + 1 if x == y else max(table[i][j + 1], table[i + 1][j])
    return table[-1][-1]


def _brute_force_filter(texts, threshold, pool=()):
    """The Self-Instruct filter written plainly: DP LCS against everything kept so far."""

    def f(a, b):
        return 0.0 if not a or not b else 2 * _lcs_dp(a, b) / (len(a) + len(b))

    kept_tokens = [rouge_tokens(t) for t in pool]
    kept = []
    for i, text in enumerate(texts):
        tokens = rouge_tokens(text)
        if all(f(tokens, other) < threshold for other in kept_tokens):
            kept.append(i)
            kept_tokens.append(tokens)
    return kept


def _random_texts(n, seed):
    rng = random.Random(seed)
    words = "give me a list of the best ways to write sort find three words about cats dogs".split()
    base = [" ".join(rng.choices(words, k=rng.randint(2, 9))) for _ in range(n // 3)]
    texts = []
    for _ in range(n):
        t = rng.choice(base).split()
        for _ in range(rng.randint(0, 3)):  # near-duplicates: a few edits
            t.insert(rng.randrange(len(t) + 1), rng.choice(words))
        texts.append(" ".join(t).capitalize() + rng.choice([".", "?", "!", ""]))
    return texts + ["", "!!!", texts[0]]  # empty after tokenising, and an exact duplicate


def test_rouge_tokens_match_rouge_score_defaults():
    assert rouge_tokens("Write a Poem, about: cats & dogs!") == [
        "write",
        "a",
        "poem",
        "about",
        "cats",
        "dogs",
    ]
    assert rouge_tokens("It's 2-for-1 day") == ["it", "s", "2", "for", "1", "day"]
    assert rouge_tokens("naïve café") == [
        "na",
        "ve",
        "caf",
    ]  # non-ASCII letters split words, as in rouge_score


def test_lcs_matches_dynamic_programming():
    rng = random.Random(0)
    for _ in range(500):
        a = [rng.choice("abcd") for _ in range(rng.randint(0, 12))]
        b = [rng.choice("abcde") for _ in range(rng.randint(0, 12))]
        assert lcs_length(a, b) == _lcs_dp(a, b)
    assert rouge_l(["a", "b", "c"], ["a", "c"]) == pytest.approx(2 * 2 / 5)
    assert rouge_l([], ["a"]) == 0.0


@pytest.mark.parametrize("threshold", [0.3, 0.5, 0.7, 0.9])
@pytest.mark.parametrize("seed", [0, 1])
def test_rouge_filter_keeps_exactly_the_brute_force_set(threshold, seed):
    texts = _random_texts(90, seed)
    kept, stats = rouge_filter(texts, threshold)
    assert kept == _brute_force_filter(texts, threshold)
    assert stats["kept"] == len(kept) and stats["exact"] <= stats["pairs"]
    pool = texts[:5]
    assert rouge_filter(texts[5:], threshold, pool)[0] == _brute_force_filter(texts[5:], threshold, pool)


def test_rouge_filter_cli_writes_survivors(tmp_path, capsys):
    rows = [
        {"instruction": t, "output": str(i)}
        for i, t in enumerate(
            [
                "Write a poem about the sea.",
                "Write a poem about the sea!",
                "List three prime numbers.",
                "Write a short poem about the sea.",
            ]
        )
    ]
    src, out = tmp_path / "in.json", tmp_path / "out.jsonl"
    src.write_text(json.dumps(rows))
    ftlab_main(["data", "rouge-filter", "--input", str(src), "--output", str(out)])
    kept = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["output"] for r in kept] == ["0", "2"]  # 0.92 F for the "short poem" variant
    assert "kept 2 of 4 rows" in capsys.readouterr().out
    (tmp_path / "bad.json").write_text(json.dumps([{"instruction": "a"}, {"prompt": "b"}]))
    with pytest.raises(DataError, match=r"bad.json:record 1: missing field 'instruction'"):
        main(["rouge-filter", "--input", str(tmp_path / "bad.json")])


def test_flan_templates_are_seeded_and_varied(tmp_path):
    rows = [{"sentence": f"review number {i}", "label": i % 2, "_where": f"f:{i}"} for i in range(60)]
    a, b = apply_templates(rows, "sentiment", seed=1), apply_templates(rows, "sentiment", seed=1)
    assert a == b and apply_templates(rows, "sentiment", seed=2) != a
    assert {r["template"] for r in a} == set(range(len(TASKS["sentiment"]["templates"])))
    assert all(r["output"] == ("positive" if i % 2 else "negative") for i, r in enumerate(a))
    assert all(f"review number {i}" in r["input"] + r["instruction"] for i, r in enumerate(a))
    with pytest.raises(DataError, match=r"f:0: field 'label' = '7' is not one of"):
        apply_templates([{"sentence": "x", "label": 7, "_where": "f:0"}], "sentiment")
    with pytest.raises(DataError, match=r"f:3: missing field 'text'"):
        apply_templates(
            [{"sentence": "x", "label": 1, "_where": "f:3"}], "sentiment", fields={"sentence": "text"}
        )


def test_flan_cli_with_custom_templates_and_nli(tmp_path, capsys):
    spec = {
        "fields": ["question", "answer"],
        "answers": None,
        "templates": [
            {"instruction": "Answer: {question}", "output": "{answer}"},
            {"instruction": "Q: {question}", "input": "", "output": "{answer}"},
        ],
    }
    (tmp_path / "t.json").write_text(json.dumps(spec))
    (tmp_path / "qa.csv").write_text("q,a\n2+2?,4\nCapital of France?,Paris\n")
    main(
        [
            "flan",
            "--input",
            str(tmp_path / "qa.csv"),
            "--task",
            str(tmp_path / "t.json"),
            "--field",
            "question=q",
            "--field",
            "answer=a",
            "--output",
            str(tmp_path / "o.jsonl"),
        ]
    )
    out = [json.loads(line) for line in (tmp_path / "o.jsonl").read_text().splitlines()]
    assert [r["output"] for r in out] == ["4", "Paris"] and out[0]["instruction"].endswith("2+2?")
    nli = apply_templates(
        [{"premise": "A dog runs.", "hypothesis": "An animal moves.", "label": "entailment"}], "nli"
    )
    assert (
        nli[0]["output"] == "yes"
        and "OPTIONS:\n- yes\n- it is not possible to tell\n- no" in nli[0]["instruction"]
    )


def test_sharegpt_conversion_history_system_and_errors(tmp_path, capsys):
    conv = {
        "id": "c1",
        "conversations": [
            {"from": "system", "value": "Be brief."},
            {"from": "human", "value": "Hi"},
            {"from": "gpt", "value": "Hello"},
            {"from": "human", "value": "Name a color"},
            {"from": "gpt", "value": "Blue"},
            {"from": "human", "value": "?"},
        ],
    }
    rec = conversation_to_instruction(conv)
    assert rec == {
        "instruction": "Name a color",
        "input": "",
        "output": "Blue",
        "history": [["Hi", "Hello"]],
        "system": "Be brief.",
        "id": "c1",
    }
    (tmp_path / "sg.json").write_text(
        json.dumps([conv, {"conversations": [{"from": "human", "value": "alone"}]}])
    )
    main(["sharegpt", "--input", str(tmp_path / "sg.json"), "--output", str(tmp_path / "o.jsonl")])
    assert "1 instruction records (1 history turns; 1 conversations without" in capsys.readouterr().out
    bad = {
        "conversations": [
            {"from": "human", "value": "a"},
            {"from": "human", "value": "b"},
            {"from": "gpt", "value": "c"},
        ],
        "_where": "sg.json:record 4",
    }
    with pytest.raises(DataError, match=r"sg.json:record 4: field conversations: turn 1 is 'user'"):
        conversation_to_instruction(bad)
    with pytest.raises(DataError, match=r"x:1: missing field 'conversations'"):
        conversation_to_instruction({"messages": [], "_where": "x:1"})


def test_sharegpt_output_reads_as_instruction_data(tmp_path):
    from ftlab.data import InstructionData

    conv = {
        "conversations": [
            {"from": "human", "value": "Hi"},
            {"from": "gpt", "value": "Hello"},
            {"from": "human", "value": "Bye"},
            {"from": "gpt", "value": "Ciao"},
        ]
    }
    (tmp_path / "sg.json").write_text(json.dumps([conv, conv]))
    main(["sharegpt", "--input", str(tmp_path / "sg.json"), "--output", str(tmp_path / "train.jsonl")])
    dm = InstructionData(source=str(tmp_path / "train.jsonl"), template="alpaca_short", val_fraction=0.5)
    prompt, response = dm.prompt_and_response(dm.raw_rows("train")[0])
    assert prompt.startswith("### Instruction:\nHi\n\n### Response:\nHello\n\n") and response == "Ciao"


def test_labelstudio_cli(tmp_path, capsys):
    task = {
        "id": 1,
        "data": {"prompt": "Q?", "answer1": "first", "answer2": "second"},
        "annotations": [
            {
                "id": 2,
                "was_cancelled": False,
                "result": [{"type": "pairwise", "value": {"selected": "right"}}],
            }
        ],
    }
    (tmp_path / "export.json").write_text(json.dumps([task]))
    main(["labelstudio", "--input", str(tmp_path / "export.json"), "--output", str(tmp_path / "pairs.jsonl")])
    assert json.loads((tmp_path / "pairs.jsonl").read_text()) == {
        "prompt": "Q?",
        "chosen": "second",
        "rejected": "first",
    }
    assert "1 preference pairs from 1 tasks" in capsys.readouterr().out


def test_missing_shared_input_says_where_it_looked(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)  # no ../shared/data beside this directory
    with pytest.raises(DataError, match="shared data folder is expected beside the repository"):
        main(["labelstudio", "--output", str(tmp_path / "o.jsonl")])


@pytest.mark.skipif(
    not (SHARED / "alpaca_5000_subset").exists(), reason="needs ../shared/data/alpaca_5000_subset"
)
def test_rouge_filter_on_the_alpaca_subset():
    rows = json.loads((SHARED / "alpaca_5000_subset" / "alpaca_5000.json").read_text())
    kept, stats = rouge_filter([r["instruction"] for r in rows], 0.7)
    assert stats["rows"] == 5000 and stats["kept"] == len(kept) == 4993
    assert stats["exact"] < 1000  # the bound leaves almost no pair for the exact LCS
