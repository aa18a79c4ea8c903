"""What `slmtune serve` checks on the way in (the request's shape) and on the way out (the small model's answer).

`request_problems(body)` lists everything wrong with a chat-completions request (a 400 names them all).
`to_record(body)` turns a valid request into the canonical prompt record `slmtune.render` renders.

`check_answer(...)` returns None when the small model's answer may go to the client, else the fallback reason:

* `invalid_output` — the answer was cut at max_tokens, or does not parse the way its task's answers do: a
  tool-calling task must answer with at least one call whose name is a string and whose arguments are a JSON
  object (text alone is not a tool-calling answer); an extraction task with JSON (bare or in one ``` fence); a
  classification or text task with non-empty text and no tool-call markup;
* `schema_invalid` — it parses but breaks the contract: a call names a tool the request did not offer (or not
  the one `tool_choice` names), its arguments fail that tool's JSON Schema (jsonschema), an extraction object
  fails the task schema from the export manifest, a label is not one of the task's labels.
"""

from __future__ import annotations

import json
from typing import Any

from slmtune.eval.metrics import CLASSIFICATION, EXTRACTION, TOOL_CALLING, decode_calls, label_of
from slmtune.records import ROLES
from slmtune.tasks.schema import parse_json_output

FALLBACK_REASONS = ("no_route", "unsupported", "disabled", "invalid_output", "schema_invalid", "timeout", "error")
_ROLES = (*ROLES, "developer", "function")


# ----------------------------------------------------------------------------- requests
def request_problems(body: Any) -> list[str]:
    """Everything wrong with a chat-completions request body, as short phrases."""
    if not isinstance(body, dict):
        return [f"the body must be a JSON object, got {type(body).__name__}"]
    problems = []
    msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs:
        problems.append("`messages` must be a non-empty array")
    else:
        for i, m in enumerate(msgs):
            if not isinstance(m, dict) or m.get("role") not in _ROLES:
                problems.append(f"messages[{i}] must be an object with a role in {', '.join(_ROLES)}")
            elif not (m.get("content") is None or isinstance(m.get("content"), (str, list))):
                problems.append(f"messages[{i}].content must be a string, an array of parts or null")
    tools = body.get("tools")
    if tools is not None and not (isinstance(tools, list) and all(
            isinstance(t, dict) and isinstance(t.get("function"), dict) and isinstance(t["function"].get("name"), str)
            for t in tools)):
        problems.append("`tools` must be an array of {type: function, function: {name, parameters}}")
    for key in ("max_tokens", "max_completion_tokens", "n"):
        v = body.get(key)
        if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 1):
            problems.append(f"`{key}` must be a positive integer, got {v!r}")
    t = body.get("temperature")
    if t is not None and (not isinstance(t, (int, float)) or isinstance(t, bool) or not 0 <= t <= 2):
        problems.append(f"`temperature` must be a number from 0 to 2, got {t!r}")
    if not isinstance(body.get("stream", False), bool):
        problems.append(f"`stream` must be true or false, got {body.get('stream')!r}")
    choice = body.get("tool_choice")
    if choice is not None and choice not in ("none", "auto", "required") and not (
            isinstance(choice, dict) and isinstance((choice.get("function") or {}).get("name"), str)):
        problems.append("`tool_choice` must be none, auto, required or {type: function, function: {name}}")
    return problems


def to_record(body: dict) -> dict:
    """The request as a canonical record whose prompt is every request message (an empty assistant target
    closes it, as `render.prompt_text` expects)."""
    msgs = [_message(m) for m in body["messages"]]
    rec: dict = {"messages": [*msgs, {"role": "assistant", "content": ""}]}
    if body.get("tools"):
        rec["tools"] = body["tools"]
    return rec


def _message(m: dict) -> dict:
    role = {"developer": "system", "function": "tool"}.get(m["role"], m["role"])
    content = m.get("content")
    if isinstance(content, list):  # content parts: the text ones, joined (as ingest reads them)
        content = "\n".join(p["text"] for p in content if isinstance(p, dict) and isinstance(p.get("text"), str))
    out: dict = {"role": role, "content": content}
    if m.get("tool_calls"):
        out["tool_calls"] = [_call(c) for c in m["tool_calls"] if isinstance(c, dict)]
    if role == "tool":
        out["tool_call_id"] = m.get("tool_call_id") or m.get("name") or ""
    return out


def _call(c: dict) -> dict:
    fn = c.get("function") or {}
    args = fn.get("arguments")
    return {"id": c.get("id") or "", "type": "function",
            "function": {"name": fn.get("name"), "arguments": args if isinstance(args, str) else json.dumps(args)}}


# ----------------------------------------------------------------------------- answers
def check_answer(category: str, schema: Any, message: dict, finished: bool, tools: list | None,
                 tool_choice: Any = None) -> str | None:
    """None when `message` (parsed with `render.parse_output`) may be returned; else the fallback reason."""
    if not finished:
        return "invalid_output"
    if category == TOOL_CALLING:
        return _check_calls(message, tools, tool_choice)
    if message.get("tool_calls"):
        return "invalid_output"  # tool-call markup from a task that answers in text
    if category == EXTRACTION:
        value = parse_json_output(message.get("content"))
        if value is None:
            return "invalid_output"
        return None if _fits(value, schema) else "schema_invalid"
    if category == CLASSIFICATION:
        label = label_of(message)
        if not label:
            return "invalid_output"
        enum = [str(x).casefold() for x in (schema or {}).get("enum") or []] if isinstance(schema, dict) else []
        return None if not enum or label.casefold() in enum else "schema_invalid"
    return None if (message.get("content") or "").strip() else "invalid_output"


def _check_calls(message: dict, tools: list | None, tool_choice: Any) -> str | None:
    calls = decode_calls(message)
    if not calls or not all(isinstance(n, str) and isinstance(a, dict) for n, a in calls):
        return "invalid_output"
    specs = {t["function"]["name"]: t["function"].get("parameters") for t in tools or []}
    wanted = ((tool_choice or {}).get("function") or {}).get("name") if isinstance(tool_choice, dict) else None
    for name, args in calls:
        if name not in specs or (wanted and name != wanted) or not _fits(args, specs[name]):
            return "schema_invalid"
    return None


def _fits(value: Any, schema: Any) -> bool:
    """True when `value` validates against `schema` (no schema, or one jsonschema can't read, checks nothing)."""
    if not isinstance(schema, dict) or not schema:
        return True
    import jsonschema

    cls = jsonschema.validators.validator_for(schema, default=jsonschema.Draft7Validator)
    try:
        cls.check_schema(schema)
    except jsonschema.SchemaError:
        return True
    return cls(schema).is_valid(value)
