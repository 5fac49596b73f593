"""Comparison pairs made in code from a rule a person would apply: for the embedded instruction task
(``ftlab.data.synthetic``), the correct answer is preferred to a plausible wrong one.

A reward model trained on these pairs (``PreferenceData(synthetic_task="instructions")``) can be
checked against the rule itself (``ftlab.rewards.instruction_following``), which is what the RLHF
pipeline experiment does to show reward hacking when it happens.
"""

from __future__ import annotations

import random

from ftlab.data._io import Record
from ftlab.data.synthetic import CONSONANTS, VOWELS, instruction_rows
from ftlab.data.templates import render


def wrong_answer(task: str, inp: str, answer: str, rng: random.Random) -> str:
    """A plausible wrong answer to one of the embedded instruction tasks (``ftlab.data.synthetic``):
    the mistakes a person grading the task would mark wrong, never the right answer itself."""

    def typo(text: str) -> str:
        i = rng.randrange(len(text))
        pool = "0123456789" if text[i].isdigit() else (CONSONANTS + VOWELS)
        letter = rng.choice([c for c in pool if c != text[i].lower()])
        return text[:i] + (letter.upper() if text[i].isupper() else letter) + text[i + 1 :]

    word = inp
    if task == "add":
        a, b = (int(x) for x in inp.split(" + "))
        total = a + b
        options = [
            str(total + rng.choice([-10, -2, -1, 1, 2, 10])),
            str(a) + str(b),
            str(max(a, b)),
            typo(answer),
        ]
    else:
        options = {
            "reverse": [word, typo(answer), answer[1:], answer.upper()],
            "upper": [word, word.capitalize(), typo(answer), answer[::-1]],
            "repeat": [word, f"{word} {word} {word}", f"{word} {typo(word)}", word + word],
        }[task]
    options = [o for o in options if o != answer and o.strip()]
    return rng.choice(options)


def instruction_pairs(n: int, seed: int = 0, template: str = "alpaca_short") -> list[Record]:
    """``n`` comparison pairs on the embedded instruction task: the prompt as ``InstructionData``
    renders it, the correct answer chosen, a plausible wrong one (``wrong_answer``) rejected.

    The rule is the one a person would apply (is the answer right?), so a reward model trained on
    these pairs can be checked against it (``ftlab.rewards.instruction_following``).
    """
    rng = random.Random(f"instruction-pairs-{seed}")
    rows = []
    for i, row in enumerate(instruction_rows(n, seed)):
        prompt = render(template, row["instruction"], row["input"])
        rows.append(
            {
                "prompt": prompt,
                "chosen": row["output"],
                "rejected": wrong_answer(row["task"], row["input"], row["output"], rng),
                "_where": f"synthetic instruction pair {i}",
            }
        )
    return rows
