"""ShareGPT conversations -> instruction records with ``history`` (what ``InstructionData`` reads).

``{"conversations": [{"from": "human"|"gpt"|"system", "value": ...}, ...]}`` becomes one record per
conversation: the last user turn is the ``instruction``, the reply the ``output``, the earlier
turns ``history`` = ``[[user, assistant], ...]`` and a leading system turn ``system``. A trailing
user turn with no reply is dropped; turns that do not alternate are an error naming the record.
"""

from __future__ import annotations

from typing import Any

from ftlab.data._io import DataError, Record

USER, ASSISTANT, SYSTEM = (
    ("human", "user", "prompter"),
    ("gpt", "assistant", "model", "chatgpt", "bard", "bing"),
    ("system",),
)


def conversation_to_instruction(row: Record, field: str = "conversations") -> Record | None:
    """One instruction record from a ShareGPT row, or None when it holds no complete exchange."""
    where = row.get("_where", "?")
    turns = row.get(field)
    if not isinstance(turns, list):
        raise DataError(
            f"{where}: missing field {field!r} (a list of turns); row has {[k for k in row if k != '_where']}"
        )
    roles: list[tuple[str, str]] = []
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict) or "value" not in turn:
            raise DataError(f"{where}: field {field}[{i}] must be an object with 'from' and 'value'")
        who = str(turn.get("from", turn.get("role", ""))).lower()
        role = (
            "user"
            if who in USER
            else "assistant"
            if who in ASSISTANT
            else "system"
            if who in SYSTEM
            else None
        )
        if role is None:
            raise DataError(f"{where}: field {field}[{i}].from = {who!r} is not a known role")
        roles.append((role, str(turn["value"])))
    system = ""
    if roles and roles[0][0] == "system":
        system = roles.pop(0)[1]
    if roles and roles[-1][0] == "user":
        roles.pop()  # a question nobody answered teaches nothing
    if not roles:
        return None
    for i, (role, _) in enumerate(roles):
        if role != ("user" if i % 2 == 0 else "assistant"):
            raise DataError(
                f"{where}: field {field}: turn {i} is {role!r}; turns must alternate user, assistant"
            )
    pairs = [[roles[i][1], roles[i + 1][1]] for i in range(0, len(roles), 2)]
    out: dict[str, Any] = {
        "instruction": pairs[-1][0],
        "input": "",
        "output": pairs[-1][1],
        "history": pairs[:-1],
    }
    if system:
        out["system"] = system
    if "id" in row:
        out["id"] = row["id"]
    return out


def sharegpt_to_instructions(rows: list[Record], field: str = "conversations") -> tuple[list[Record], int]:
    """Instruction records of every conversation, and how many held no complete exchange."""
    out, empty = [], 0
    for row in rows:
        rec = conversation_to_instruction(row, field)
        if rec is None:
            empty += 1
        else:
            out.append(rec)
    return out, empty
