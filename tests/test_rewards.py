"""Reward sources: functions, weighted sums, logged-only sources, the embedded task's rule, bad specs."""

import pytest
import torch

from ftlab.rewards import Rewards, instruction_answer, instruction_following

PROMPT = "### Instruction:\n{}\n\n### Input:\n{}\n\n### Response:\n"


def test_weighted_sources_and_logged_only_ones():
    rewards = Rewards(
        [
            {"fn": "ftlab.rewards.has_char"},
            {"fn": "ftlab.rewards.contains", "kwargs": {"text": "ok"}, "weight": -2.0, "name": "ok"},
            {"fn": "ftlab.rewards.uppercase_fraction", "weight": 0},
        ]
    )
    total, parts = rewards(["p"] * 3, ["ok 1", "AB", "x2"])
    assert parts["has_char"].tolist() == [1.0, 0.0, 1.0] and parts["ok"].tolist() == [1.0, 0.0, 0.0]
    assert parts["uppercase_fraction"].tolist() == [0.0, 1.0, 0.0]  # computed and returned, not optimised
    assert total.tolist() == [1.0 - 2.0, 0.0, 1.0] and total.dtype == torch.float32


def test_the_embedded_task_rule():
    prompts = [
        PROMPT.format("Reverse the letters of the word.", "tomel"),
        PROMPT.format("Add the two numbers.", "17 + 25"),
        PROMPT.format("Write the word twice.", "fen"),
        PROMPT.format("Write the word in capital letters.", "hira"),
    ]
    assert [instruction_answer(p) for p in prompts] == ["lemot", "42", "fen fen", "HIRA"]
    assert instruction_following(prompts, [" lemot", "43", "fen fen\n", "Hira"]) == [1.0, 0.0, 1.0, 0.0]
    with pytest.raises(ValueError, match="not a prompt of the embedded instruction task"):
        instruction_following(["Tell me a joke."], ["no"])


def test_bad_reward_specs_are_clear_errors():
    with pytest.raises(ValueError, match="no reward"):
        Rewards([])
    with pytest.raises(ValueError, match=r"rewards\[0\] needs exactly one of 'fn'"):
        Rewards([{"fn": "ftlab.rewards.has_char", "model": "somewhere"}])
    with pytest.raises(ValueError, match=r"rewards\[0\]: unknown keys \['wieght'\]"):
        Rewards([{"fn": "ftlab.rewards.has_char", "wieght": 2}])
    with pytest.raises(ValueError, match="every reward source has weight 0"):
        Rewards([{"fn": "ftlab.rewards.has_char", "weight": 0}])
    with pytest.raises(ValueError, match="distinct names"):
        Rewards(
            [{"fn": "ftlab.rewards.has_char"}, {"fn": "ftlab.rewards.has_char", "kwargs": {"chars": "x"}}]
        )
    with pytest.raises(ValueError, match=r"rewards\[0\].fn 'ftlab.rewards.nope' cannot be imported"):
        Rewards([{"fn": "ftlab.rewards.nope"}])
    with pytest.raises(ValueError, match="non-finite"):
        Rewards([{"fn": "tests.test_rewards.nan_reward"}])(["p"], ["r"])


def nan_reward(prompts, responses):
    return [float("nan")] * len(responses)
