"""The canonical record: the contract between every stage.

One JSON object per line::

    {"id": "...",
     "messages": [{"role": "system"|"user"|"assistant"|"tool", "content": "...",
                   "tool_calls": [{"id": "...", "type": "function",
                                   "function": {"name": "...", "arguments": "<JSON string>"}}],
                   "tool_call_id": "..."}],
     "tools": [{"type": "function", "function": {"name", "description", "parameters"}}],   # optional
     "meta": {...}}                                                                           # optional

The last assistant message is the target the small model learns; everything before it is the prompt.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal, get_args

from slmtune.errors import SlmtuneError

ROLES = ("system", "user", "assistant", "tool")
# The kinds of errand a task can be: `slmtune cluster` decides; recipes, eval metrics and exports read it.
Category = Literal["tool_calling", "extraction", "classification", "summarization", "coding", "generation"]
CATEGORIES: tuple[str, ...] = get_args(Category)


def record_problems(rec: Any) -> list[str]:
    """Everything wrong with a record, as short phrases ("messages[2].role 'bot' is not one of ...")."""
    if not isinstance(rec, dict):
        return [f"a record must be a JSON object, got {type(rec).__name__}"]
    problems: list[str] = []
    msgs = rec.get("messages")
    if not isinstance(msgs, list) or not msgs:
        return ["`messages` must be a non-empty list"]
    for i, m in enumerate(msgs):
        problems += _message_problems(i, m)
    if not problems and target_index(msgs) is None:
        problems.append("no assistant message to learn (the last assistant message is the target)")
    tools = rec.get("tools")
    if tools is not None and not (isinstance(tools, list) and all(_is_tool_spec(t) for t in tools)):
        problems.append("`tools` must be a list of OpenAI function specs {type: function, function: {name, ...}}")
    return problems


def _message_problems(i: int, m: Any) -> list[str]:
    if not isinstance(m, dict):
        return [f"messages[{i}] must be an object"]
    role = m.get("role")
    if role not in ROLES:
        return [f"messages[{i}].role {role!r} is not one of {', '.join(ROLES)}"]
    content = m.get("content")
    if content is not None and not isinstance(content, str):
        return [f"messages[{i}].content must be a string or null"]
    problems = []
    for j, call in enumerate(m.get("tool_calls") or []):
        fn = call.get("function") if isinstance(call, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            problems.append(f"messages[{i}].tool_calls[{j}] needs function.name")
        elif not isinstance(fn.get("arguments"), str):
            problems.append(f"messages[{i}].tool_calls[{j}].function.arguments must be a JSON string")
    return problems


def _is_tool_spec(t: Any) -> bool:
    return isinstance(t, dict) and isinstance(t.get("function"), dict) and "name" in t["function"]


def target_index(messages: list[dict]) -> int | None:
    """Index of the last assistant message (the target), or None."""
    for i in range(len(messages) - 1, -1, -1):
        if messages[i].get("role") == "assistant":
            return i
    return None


def split_prompt_target(rec: dict) -> tuple[list[dict], dict]:
    """(prompt messages, target assistant message). Messages after the target are dropped."""
    i = target_index(rec["messages"])
    if i is None:
        raise ValueError("record has no assistant message")
    return rec["messages"][:i], rec["messages"][i]


def iter_records(path: str | Path) -> Iterator[tuple[int, dict]]:
    """(line, record) for every record of a JSONL file; the first malformed one stops with a pointed error."""
    from slmtune.io import iter_jsonl

    for lineno, rec in iter_jsonl(path):
        problems = record_problems(rec)
        if problems:
            raise SlmtuneError(f"{path}:{lineno}: not a canonical record: {problems[0]}.",
                               "Run `slmtune ingest` on raw logs to produce canonical records.")
        yield lineno, rec


def read_records(path: str | Path) -> list[tuple[int, dict]]:
    """`iter_records` as a list; a file without records is an error too."""
    out = list(iter_records(path))
    if not out:
        raise SlmtuneError(f"{path}: no records.")
    return out
