"""Reading a model's answer back: tool calls, JSON objects and labels, as eval scores them and serve's guard
checks them; and the offered tools as {name: parameters}. Pure functions, no torch."""

from __future__ import annotations

import json
import re
from typing import Any

from slmtune.records import CATEGORIES
from slmtune.schema_check import tool_params

TOOL_CALLING, EXTRACTION, CLASSIFICATION, *_TEXT = CATEGORIES
TEXT_CATEGORIES = tuple(_TEXT)  # summarization, coding, generation: scored as text

_FENCE = re.compile(r"^```[A-Za-z0-9_+-]*\s*\n(.*?)\n?```$", re.S)
BAD = object()  # arguments that are not a JSON object
_BAD = BAD


def parse_json_text(text: str | None) -> Any:
    """The JSON value of an answer, bare or wrapped in one ``` fence; `_BAD` when it is not JSON."""
    body = (text or "").strip()
    m = _FENCE.match(body)
    if m:
        body = m.group(1).strip()
    if not body:
        return _BAD
    try:
        return json.loads(body)
    except ValueError:
        return _BAD


def decode_calls(msg: dict | None) -> list[tuple[Any, Any]]:
    """(name, arguments object or `_BAD`) per tool call; arguments may be a JSON string or already an object."""
    out = []
    for call in (msg or {}).get("tool_calls") or []:
        fn = (call or {}).get("function") or {}
        args = fn.get("arguments")
        if isinstance(args, str):
            try:
                args = json.loads(args) if args.strip() else {}
            except ValueError:
                args = _BAD
        elif args is None:
            args = {}
        out.append((fn.get("name"), args if isinstance(args, dict) else _BAD))
    return out


def tool_specs(schema: dict | list | None, record_tools: list | None) -> dict[str, dict]:
    """{tool name: parameters schema} from the task schema (any of its shapes) or the record's own tools."""
    tools = schema.get("tools") if isinstance(schema, dict) else schema
    chosen = (tools if isinstance(tools, list) else None) or record_tools or []
    return {name: params or {"type": "object"} for name, params in tool_params(chosen).items()}


def label_of(msg: dict | None) -> str:
    """A classification answer's label: the stripped content, unwrapped from a fence or JSON string."""
    text = ((msg or {}).get("content") or "").strip()
    m = _FENCE.match(text)
    text = m.group(1).strip() if m else text
    if len(text) >= 2 and text[0] == text[-1] == '"':
        try:
            text = json.loads(text)
        except ValueError:
            pass
    return text.strip()
