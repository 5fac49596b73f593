"""FLAN-style templating: plain task rows -> instruction data (Wei et al., 2022; Longpre et al., 2023).

Each task has several phrasings (templates); every example gets one, drawn with a seeded RNG,
so the model sees the task worded many ways. A template is three ``str.format`` strings
(``instruction``, ``input``, ``output``) over the row's fields plus ``{answer}`` (the label's
answer text) and ``{options}`` (the answers as an ``OPTIONS:`` list, as FLAN writes them).

Built-in tasks: ``sentiment`` (sentence, label 0/1), ``nli`` (premise, hypothesis, label) and
``similarity`` (sentence1, sentence2, score 0-5). Your own: a JSON file
``{"fields": [...], "answers": {label: text} or null, "templates": [{"instruction", "input", "output"}]}``.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

from ftlab.data._io import DataError, Record, require

TASKS: dict[str, dict[str, Any]] = {
    "sentiment": {
        "fields": ["sentence", "label"],
        "answers": {"0": "negative", "1": "positive"},
        "templates": [
            {
                "instruction": "Is the sentiment of the following sentence positive or negative?\n{options}",
                "input": "{sentence}",
                "output": "{answer}",
            },
            {
                "instruction": "What is the sentiment of this review?\n{options}",
                "input": "{sentence}",
                "output": "{answer}",
            },
            {
                "instruction": "Did the writer like it? Answer positive or negative.",
                "input": "{sentence}",
                "output": "{answer}",
            },
            {
                "instruction": "Classify the sentiment of the text.\n{options}",
                "input": "Text: {sentence}",
                "output": "{answer}",
            },
        ],
    },
    "nli": {
        "fields": ["premise", "hypothesis", "label"],
        "answers": {
            "entailment": "yes",
            "neutral": "it is not possible to tell",
            "contradiction": "no",
            "0": "yes",
            "1": "it is not possible to tell",
            "2": "no",
        },
        "templates": [
            {
                "instruction": "Premise: {premise}\nHypothesis: {hypothesis}\nDoes the premise entail the "
                "hypothesis?\n{options}",
                "input": "",
                "output": "{answer}",
            },
            {
                "instruction": "Can we conclude the hypothesis from the premise?\n{options}",
                "input": "Premise: {premise}\nHypothesis: {hypothesis}",
                "output": "{answer}",
            },
            {
                "instruction": "Read the text and decide if the sentence is true.\n{options}",
                "input": "{premise}\n\nSentence: {hypothesis}",
                "output": "{answer}",
            },
        ],
    },
    "similarity": {
        "fields": ["sentence1", "sentence2", "score"],
        "answers": None,
        "templates": [
            {
                "instruction": "How similar are these two sentences, on a scale from 0 to 5?",
                "input": "1: {sentence1}\n2: {sentence2}",
                "output": "{score}",
            },
            {
                "instruction": "Rate the semantic similarity of the sentences (0 = unrelated, 5 = same "
                "meaning).",
                "input": "{sentence1}\n{sentence2}",
                "output": "{score}",
            },
            {
                "instruction": "Sentence A: {sentence1}\nSentence B: {sentence2}\nGive a similarity score "
                "between 0 and 5.",
                "input": "",
                "output": "{score}",
            },
        ],
    },
}


def load_task(task: str) -> dict[str, Any]:
    """A built-in task by name, or a task from a JSON file (checked)."""
    if task in TASKS:
        return TASKS[task]
    path = Path(task)
    if not path.exists():
        raise ValueError(f"unknown task {task!r}: use one of {sorted(TASKS)} or a JSON file of templates")
    try:
        spec = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise DataError(f"{path}:{err.lineno}: malformed JSON ({err.msg})") from None
    templates = spec.get("templates") if isinstance(spec, dict) else None
    if not templates or not isinstance(templates, list):
        raise DataError(f"{path}: needs a non-empty 'templates' list")
    for i, t in enumerate(templates):
        if not isinstance(t, dict) or "instruction" not in t or "output" not in t:
            raise DataError(
                f"{path}: templates[{i}] needs 'instruction' and 'output' (and optionally 'input')"
            )
    return {"fields": list(spec.get("fields") or []), "answers": spec.get("answers"), "templates": templates}


def apply_templates(
    rows: list[Record], task: str | dict[str, Any], seed: int = 0, fields: dict[str, str] | None = None
) -> list[Record]:
    """Instruction records (``instruction``, ``input``, ``output``, ``template``) from task rows.

    ``fields`` maps the task's field names to your column names (e.g. ``{"sentence": "text"}``).
    """
    spec = load_task(task) if isinstance(task, str) else task
    fields = fields or {}
    answers = spec.get("answers")
    options = "OPTIONS:\n" + "\n".join(f"- {a}" for a in dict.fromkeys(answers.values())) if answers else ""
    rng = random.Random(seed)
    out = []
    for row in rows:
        where = row.get("_where", "?")
        values = {name: require(row, fields.get(name, name)) for name in spec["fields"]}
        for name, value in values.items():
            if isinstance(value, float) and value.is_integer():
                values[name] = int(value)
        if answers is not None:
            label_field = "label" if "label" in spec["fields"] else spec["fields"][-1]
            label = str(values[label_field]).strip()
            if label not in answers:
                raise DataError(
                    f"{where}: field {fields.get(label_field, label_field)!r} = {label!r} is not one "
                    f"of the task's labels {sorted(answers)}"
                )
            values["answer"] = answers[label]
        values["options"] = options
        k = rng.randrange(len(spec["templates"]))
        t = spec["templates"][k]
        try:
            out.append(
                {key: t.get(key, "").format(**values).strip() for key in ("instruction", "input", "output")}
                | {"template": k}
            )
        except KeyError as err:
            raise DataError(
                f"{where}: template {k} uses {{{err.args[0]}}}, which is not a field of the task "
                f"({spec['fields']}) nor answer/options"
            ) from None
    return out
