"""Prompt templates: how an instruction record becomes (prompt text, response text).

- ``alpaca``: the Stanford Alpaca prompt, with its preamble ("Below is an instruction...").
- ``alpaca_short``: the same sections without the preamble (shorter sequences for tiny models).
- ``chat``: the tokenizer's own chat template (system / user / assistant messages).

``history`` is a list of earlier ``[instruction, response]`` turns, rendered before the current one.
"""

from __future__ import annotations

from typing import Any

TEMPLATES = ("alpaca", "alpaca_short", "chat")
_PREAMBLE_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
)
_PREAMBLE = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
)


def _turn(instruction: str, inp: str) -> str:
    if inp:
        return f"### Instruction:\n{instruction}\n\n### Input:\n{inp}\n\n### Response:\n"
    return f"### Instruction:\n{instruction}\n\n### Response:\n"


def render(
    template: str,
    instruction: str,
    inp: str = "",
    system: str = "",
    history: list[list[str]] | None = None,
    tokenizer: Any = None,
) -> str:
    """The prompt text; the model is trained to continue it with the response."""
    history = history or []
    if template in ("alpaca", "alpaca_short"):
        head = system + "\n\n" if system else ""
        if template == "alpaca" and not system:
            head = _PREAMBLE_INPUT if inp else _PREAMBLE
        turns = "".join(_turn(q, "") + f"{a}\n\n" for q, a in history)
        return head + turns + _turn(instruction, inp)
    if template == "chat":
        if tokenizer is None or not getattr(tokenizer, "chat_template", None):
            raise ValueError(
                "template 'chat' needs a tokenizer with a chat template; use 'alpaca' for this backbone"
            )
        messages = [{"role": "system", "content": system}] if system else []
        for q, a in history:
            messages += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
        user = f"{instruction}\n\n{inp}" if inp else instruction
        messages.append({"role": "user", "content": user})
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    raise ValueError(f"unknown template {template!r}; choose one of {TEMPLATES}")
