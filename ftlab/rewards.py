"""Reward functions defined in code, for PPO experiments without a trained reward model.

A reward function takes the prompts and the policy's responses (decoded text, special tokens
removed) plus its keyword arguments, and returns one number per response:

    def my_reward(prompts: list[str], responses: list[str], **kwargs) -> list[float]

PPO finds it by import path (``reward_fn: ftlab.rewards.char_fraction``, arguments in
``reward_kwargs``), so any importable function works the same way.
"""

from __future__ import annotations


def char_fraction(prompts: list[str], responses: list[str], chars: str = "e") -> list[float]:
    """Share of the response's characters that are in ``chars`` (0 for an empty response)."""
    wanted = set(chars)
    return [sum(c in wanted for c in r) / len(r) if r else 0.0 for r in responses]


def uppercase_fraction(prompts: list[str], responses: list[str]) -> list[float]:
    """Share of the response's letters that are capitals (0 when it has no letters)."""
    out = []
    for r in responses:
        letters = [c for c in r if c.isalpha()]
        out.append(sum(c.isupper() for c in letters) / len(letters) if letters else 0.0)
    return out


def target_length(prompts: list[str], responses: list[str], length: int = 10) -> list[float]:
    """``1 − |len − length| / length`` on the stripped response's characters, at least −1."""
    if length <= 0:
        raise ValueError(f"target_length needs length > 0, got {length}")
    return [max(-1.0, 1.0 - abs(len(r.strip()) - length) / length) for r in responses]


def contains(prompts: list[str], responses: list[str], text: str = "yes") -> list[float]:
    """1 when the response contains ``text``, else 0."""
    return [float(text in r) for r in responses]


def has_char(prompts: list[str], responses: list[str], chars: str = "0123456789") -> list[float]:
    """1 when the response holds any character of ``chars`` (default: a digit), else 0."""
    wanted = set(chars)
    return [float(any(c in wanted for c in r)) for r in responses]
