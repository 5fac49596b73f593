"""The embedded default: a deterministic instruction task and a pretraining corpus, made in code.

Four skills on short made-up words and small numbers:

    reverse   "Reverse the letters of the word."     tomel   -> lemot
    upper     "Write the word in capital letters."   tomel   -> TOMEL
    add       "Add the two numbers."                 17 + 25 -> 42
    repeat    "Write the word twice."                tomel   -> tomel tomel

``instruction_rows`` gives them in Alpaca form (instruction / input / output). ``corpus_documents``
states the same skills as plain sentences in several phrasings ("tomel backwards is lemot.",
"The sum of 17 and 25 is 42.") with no instruction template: the text ``tiny-llama`` is pretrained
on. Fine-tuning then has to teach the model to follow the Alpaca format, which it has never seen,
using skills it already has — the situation instruction tuning is for. Words are drawn from
disjoint seeds, so evaluation words are new.
"""

from __future__ import annotations

import random

CONSONANTS = "bcdfghjklmnprstvwz"
VOWELS = "aeiou"

TASKS = {
    "reverse": "Reverse the letters of the word.",
    "upper": "Write the word in capital letters.",
    "add": "Add the two numbers.",
    "repeat": "Write the word twice.",
}


def make_word(rng: random.Random) -> str:
    """A pronounceable made-up word of 3-6 letters (alternating consonants and vowels)."""
    n = rng.randint(3, 6)
    start = rng.random() < 0.5
    return "".join(rng.choice(CONSONANTS if (i % 2 == 0) == start else VOWELS) for i in range(n))


def example(task: str, rng: random.Random) -> tuple[str, str]:
    """One (input, output) pair of ``task`` (``reverse``, ``upper``, ``add`` or ``repeat``)."""
    if task == "add":
        a, b = rng.randint(0, 49), rng.randint(0, 49)
        return f"{a} + {b}", str(a + b)
    word = make_word(rng)
    out = {"reverse": word[::-1], "upper": word.upper(), "repeat": f"{word} {word}"}[task]
    return word, out


def instruction_rows(n: int, seed: int = 0, tasks: list[str] | None = None) -> list[dict[str, str]]:
    """``n`` Alpaca records cycling through ``tasks`` (all four by default), reproducible by seed."""
    tasks = tasks or list(TASKS)
    unknown = set(tasks) - set(TASKS)
    if unknown:
        raise ValueError(f"unknown synthetic tasks {sorted(unknown)}; choose from {list(TASKS)}")
    rng = random.Random(f"instructions-{seed}")
    rows = []
    for i in range(n):
        task = tasks[i % len(tasks)]
        inp, out = example(task, rng)
        rows.append({"instruction": TASKS[task], "input": inp, "output": out, "task": task})
    return rows


# Several phrasings per skill, with different gaps between the word and its answer, so the
# pretrained model knows each skill by what it means, not by where the answer sits.
_SENTENCES = {
    "reverse": [
        "{x} backwards is {y}.",
        "The reverse of {x} is {y}.",
        "If you reverse {x} you get {y}.",
        "{x} read from right to left:\n{y}",
        "Spelled backwards, {x} becomes {y}.",
    ],
    "upper": [
        "{x} in capitals is {y}.",
        "Capitalised, {x} is written {y}.",
        "{x} in upper case:\n{y}",
        "The capital form of {x} is {y}.",
    ],
    "add": [
        "{a} plus {b} makes {y}.",
        "The sum of {a} and {b} is {y}.",
        "{a} + {b} = {y}",
        "Adding {a} and {b}:\n{y}",
        "{a} and {b} add up to {y}.",
    ],
    "repeat": ["{x} said twice is {y}.", "Say {x} two times: {y}.", "{x} doubled:\n{y}", "Twice {x} is {y}."],
}


def corpus_documents(n: int, seed: int = 0, facts_per_document: int = 4) -> list[str]:
    """``n`` plain-text documents of skill sentences, for pretraining (no instruction template)."""
    rng = random.Random(f"corpus-{seed}")
    docs = []
    for _ in range(n):
        lines = []
        for _ in range(facts_per_document):
            task = rng.choice(list(TASKS))
            x, y = example(task, rng)
            a, _, b = x.partition(" + ")
            lines.append(rng.choice(_SENTENCES[task]).format(x=x, a=a, b=b, y=y))
        docs.append("".join(line + rng.choice([" ", "\n"]) for line in lines).rstrip())
    return docs
