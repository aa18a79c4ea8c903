"""What `slmtune serve` checks on the way in (the request's shape) and on the way out (the small model's answer).

`request_problems(body)` lists everything wrong with a chat-completions request (a 400 names them all).
`to_record(body)` turns a valid request into the canonical prompt record `slmtune.render` renders.

`check_answer(...)` returns None when the small model's answer may go to the client, else the fallback reason:

* `invalid_output` — the answer was cut at max_tokens, or does not parse the way its task's answers do: a
  tool-calling task must answer with at least one call whose name is a string and whose arguments are a JSON
  object (text alone is not a tool-calling answer); an extraction task with JSON (bare or in one ``` fence); a
  classification or text task with non-empty text and no tool-call markup;
* `schema_invalid` — it parses but breaks the contract: a call names a tool the request did not offer (or not
  the one `tool_choice` names), its arguments fail that tool's JSON Schema, an extraction object fails the task
  schema from the export manifest, a label is not one of the task's labels — or the schema can't be applied;
* `placeholder` — it is well-formed but holds a scrub placeholder (`<SECRET_1>`, `<EMAIL_2>`, ...) the request's
  messages do not: learned from scrubbed logs, it stands for a value the model does not have
  (`slmtune.data.scrub.invented_placeholders`).

Schemas are checked by `slmtune.schema_check` (as curate and eval check them): Draft 7, local `$ref`s only, an
empty registry, so nothing in a request makes the server fetch anything. A request's tool schemas are checked
when it arrives (`request_problems`: a 400 naming the tool), so a bad one never reaches a grammar or a batch.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from slmtune.data.scrub import invented_placeholders
from slmtune.infer.calls import CLASSIFICATION, EXTRACTION, TOOL_CALLING, decode_calls, label_of
from slmtune.records import ROLES
from slmtune.schema_check import is_valid, schema_problem, tool_params

FALLBACK_REASONS = ("no_route", "unsupported", "disabled", "too_long", "invalid_output", "schema_invalid",
                    "placeholder", "low_confidence", "timeout", "error")
_ROLES = (*ROLES, "developer", "function")


# ----------------------------------------------------------------------------- requests
@dataclass(frozen=True)
class RequestLimits:
    """What one request may ask for (`ServeConfig` sets them); past these it gets a 400."""

    max_messages: int = 2048
    max_tools: int = 128  # OpenAI's own limit
    max_tokens: int = 32768  # a request's max_tokens / max_completion_tokens, for the SLM and the upstream alike
    max_depth: int = 64  # nested JSON objects/arrays anywhere in the body


def request_problems(body: Any, limits: RequestLimits = RequestLimits()) -> list[str]:
    """Everything wrong with a chat-completions request body, as short phrases."""
    if not isinstance(body, dict):
        return [f"the body must be a JSON object, got {type(body).__name__}"]
    if json_depth(body) > limits.max_depth:
        return [f"the body nests deeper than {limits.max_depth} levels"]
    problems = _message_problems(body.get("messages"), limits) + _tool_problems(body.get("tools"), limits)
    for key in ("max_tokens", "max_completion_tokens", "n"):
        v = body.get(key)
        if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 1):
            problems.append(f"`{key}` must be a positive integer, got {_short(v)}")
        elif v is not None and key != "n" and v > limits.max_tokens:
            problems.append(f"`{key}` must be at most {limits.max_tokens}, got {v}")
    t = body.get("temperature")
    if t is not None and (not isinstance(t, (int, float)) or isinstance(t, bool) or not 0 <= t <= 2):
        problems.append(f"`temperature` must be a number from 0 to 2, got {_short(t)}")
    for key in ("stream", "logprobs", "parallel_tool_calls"):
        if body.get(key) is not None and not isinstance(body.get(key), bool):
            problems.append(f"`{key}` must be true or false, got {_short(body.get(key))}")
    options = body.get("stream_options")
    if options is not None and not (isinstance(options, dict)
                                    and isinstance(options.get("include_usage", False), bool)):
        problems.append("`stream_options` must be an object like {\"include_usage\": true}")
    if body.get("metadata") is not None and not isinstance(body.get("metadata"), dict):
        problems.append("`metadata` must be an object")
    for key in ("model", "user"):
        if body.get(key) is not None and not isinstance(body.get(key), str):
            problems.append(f"`{key}` must be a string")
    choice = body.get("tool_choice")
    if choice is not None and choice not in ("none", "auto", "required") and not (
            isinstance(choice, dict) and isinstance((choice.get("function") or {}).get("name"), str)):
        problems.append("`tool_choice` must be none, auto, required or {type: function, function: {name}}")
    return problems


def _message_problems(msgs: Any, limits: RequestLimits) -> list[str]:
    if not isinstance(msgs, list) or not msgs:
        return ["`messages` must be a non-empty array"]
    if len(msgs) > limits.max_messages:
        return [f"`messages` holds {len(msgs)} messages, over the limit of {limits.max_messages}"]
    problems = []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or m.get("role") not in _ROLES:
            problems.append(f"messages[{i}] must be an object with a role in {', '.join(_ROLES)}")
        elif not (m.get("content") is None or isinstance(m.get("content"), (str, list))):
            problems.append(f"messages[{i}].content must be a string, an array of parts or null")
        elif any(m.get(k) is not None and not isinstance(m.get(k), str) for k in ("name", "tool_call_id")):
            problems.append(f"messages[{i}].name and .tool_call_id must be strings")
        elif m.get("tool_calls") is not None and not _calls_ok(m["tool_calls"]):
            problems.append(f"messages[{i}].tool_calls must be an array of {{id, type, function: {{name, arguments}}}}")
    return problems[:10]


def _calls_ok(calls: Any) -> bool:
    return isinstance(calls, list) and all(
        isinstance(c, dict) and isinstance(c.get("function"), dict) and isinstance(c["function"].get("name"), str)
        and isinstance(c["function"].get("arguments", ""), (str, dict)) and isinstance(c.get("id") or "", str)
        for c in calls)


def _tool_problems(tools: Any, limits: RequestLimits) -> list[str]:
    """Tools as OpenAI takes them, each `parameters` a JSON Schema slmtune can check (`slmtune.schema_check`:
    local refs only), so a bad schema is the client's 400 — naming the tool — not a failed answer later."""
    if tools is None:
        return []
    shape = "`tools` must be an array of {type: function, function: {name, parameters}}"
    if not isinstance(tools, list):
        return [shape]
    if len(tools) > limits.max_tools:
        return [f"`tools` holds {len(tools)} tools, over the limit of {limits.max_tools}"]
    problems = []
    for i, t in enumerate(tools):
        fn = t.get("function") if isinstance(t, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            return [shape]
        params = fn.get("parameters")
        if params is None:
            continue
        why = schema_problem(params) if isinstance(params, dict) else "it must be an object"
        if why:
            problems.append(f"tools[{i}] ({fn['name'][:64]!r}): `parameters` is not a usable JSON Schema: {why}")
    return problems[:10]


def json_depth(value: Any) -> int:
    """How deep objects and arrays nest in `value` (a scalar is 0), without recursion."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, dict):
            node = list(node.values())
        if isinstance(node, list):
            deepest = max(deepest, depth)
            stack.extend((v, depth + 1) for v in node if isinstance(v, (dict, list)))
    return deepest


def _short(v: Any) -> str:
    text = repr(v)
    return text if len(text) <= 40 else text[:37] + "..."


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
                 tool_choice: Any = None, prompt: Any = None) -> str | None:
    """None when `message` (parsed with `render.parse_output`) may be returned; else the fallback reason.
    `prompt`: the request's messages, against which a scrub placeholder in the answer is checked."""
    reason = _check_form(category, schema, message, finished, tools, tool_choice)
    if reason is None and invented_placeholders(message, prompt):
        return "placeholder"
    return reason


def _check_form(category: str, schema: Any, message: dict, finished: bool, tools: list | None,
                tool_choice: Any) -> str | None:
    if not finished:
        return "invalid_output"
    if category == TOOL_CALLING:
        return _check_calls(message, tools, tool_choice)
    if message.get("tool_calls"):
        return "invalid_output"  # tool-call markup from a task that answers in text
    if category == EXTRACTION:
        from slmtune.tasks.schema import parse_json_output  # not at the top: the tasks face loads scikit-learn

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
    specs = tool_params(tools)
    wanted = ((tool_choice or {}).get("function") or {}).get("name") if isinstance(tool_choice, dict) else None
    for name, args in calls:
        if name not in specs or (wanted and name != wanted) or not _fits(args, specs[name]):
            return "schema_invalid"
    return None


def _fits(value: Any, schema: Any) -> bool:
    """True when `value` validates against `schema` (none: nothing to check); a schema that can't be used
    (`slmtune.schema_check.SchemaProblem`) fits nothing: the answer goes upstream rather than unchecked."""
    return is_valid(value, schema, broken=False)
