"""Output contracts: what kind of answer a record's target is, and the schema a task's answers follow.

A record's *output kind* is one of `tool_call`, `json`, `code`, `label`, `text` (`output_kind`). A task's
*category* follows from the kinds of its records and a few facts about them (`categorize`); its *output schema*
is inferred from every observed answer (`task_schema`):

- tool_calling   → `{"type": "tool_calls", "tools": [<OpenAI function spec of each tool actually called>]}`,
                   with the parameter schema from the offered tool spec, or inferred from the arguments seen;
- extraction     → a JSON Schema inferred from the observed objects (`infer_json_schema`);
- classification → `{"type": "string", "enum": [sorted labels]}`;
- text tasks     → `None`.

`schema_hash` hashes the canonical JSON (sorted keys, no whitespace) so it does not depend on record order.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections import Counter
from collections.abc import Iterable
from typing import Any

KINDS = ("tool_call", "json", "code", "label", "text")

# A label is a short single-line answer: at most 4 words / 40 chars ("positive", "billing", "high priority").
LABEL_MAX_WORDS = 4
LABEL_MAX_CHARS = 40
# A string field becomes an enum when it takes few values, each seen repeatedly: at most 10 distinct values and
# at least 3 observations per value on average (20 observations of 4 values qualify; 10 of 8 do not).
ENUM_MAX_VALUES = 10
ENUM_MIN_OBS_PER_VALUE = 3
ENUM_MAX_VALUE_CHARS = 40
# Classification: at most 20 labels, and the label set must repeat (≥ 3 records per label on average).
CLASS_MAX_LABELS = 20
# Where types disagree, the majority wins when it covers ≥ 90% of observations (the rest are model slips);
# otherwise the field keeps every observed type.
TYPE_MAJORITY = 0.9

_FENCE = re.compile(r"^```([A-Za-z0-9_+-]*)\s*\n(.*?)\n?```\s*$", re.S)
_CODE_START = re.compile(
    r"^\s*(select|with|insert|update|delete|create|alter|drop|def |class |import |from \S+ import|function |const |"
    r"let |var |#include|package |public |fn |SELECT)", re.I)
_SUMMARY_WORDS = re.compile(r"\b(summar\w*|tl;?dr|recap|key points|condense|digest|brief overview)\b", re.I)


# ----------------------------------------------------------------------------- output kind of one record
def strip_fence(text: str) -> tuple[str | None, str]:
    """(fence language or None, body) of a text that is one fenced block; (None, text) otherwise."""
    m = _FENCE.match(text.strip())
    return (m.group(1).lower(), m.group(2)) if m else (None, text)


def parse_json_output(text: str | None) -> Any:
    """The JSON object/array an answer holds (bare or in a ```json fence), or None."""
    if not text:
        return None
    lang, body = strip_fence(text)
    if lang not in (None, "", "json"):
        return None
    body = body.strip()
    if not body or body[0] not in "{[":
        return None
    try:
        value = json.loads(body)
    except ValueError:
        return None
    return value if isinstance(value, (dict, list)) else None


def output_kind(target: dict) -> str:
    """What the assistant target is: tool_call, json, code, label or text."""
    if target.get("tool_calls"):
        return "tool_call"
    text = (target.get("content") or "").strip()
    if parse_json_output(text) is not None:
        return "json"
    lang, _ = strip_fence(text)
    if lang is not None or "```" in text or _CODE_START.match(text):
        return "code"
    if is_label(text):
        return "label"
    return "text"


def is_label(text: str) -> bool:
    text = text.strip()
    return 0 < len(text) <= LABEL_MAX_CHARS and "\n" not in text and len(text.split()) <= LABEL_MAX_WORDS


def code_language(texts: Iterable[str]) -> str | None:
    """The most common fence language of code answers ("sql", "python"), or `sql` for bare SQL, else None."""
    langs: Counter[str] = Counter()
    for t in texts:
        lang, body = strip_fence(t.strip())
        if lang:
            langs[lang] += 1
        elif re.match(r"^\s*(select|with|insert|update|delete|create)\b", t, re.I):
            langs["sql"] += 1
    return min(langs, key=lambda k: (-langs[k], k)) if langs else None


# ----------------------------------------------------------------------------- category of a task
def categorize(kinds: Counter, labels: Counter, prompts: list[str], outputs: list[str],
               systems: list[str] = ()) -> str:
    """A task's category from its records' output kinds (majority), label set and texts (user-side `prompts`,
    their `systems` prompts, target `outputs`)."""
    kind = min(kinds, key=lambda k: (-kinds[k], KINDS.index(k)))
    if kind == "tool_call":
        return "tool_calling"
    if kind == "json":
        return "extraction"
    if kind == "code":
        return "coding"
    if kind == "label" and is_label_set(labels):
        return "classification"
    return "summarization" if looks_like_summary(prompts, outputs, systems) else "generation"


def is_label_set(labels: Counter) -> bool:
    """A few labels, each repeating: 2..20 distinct answers averaging ≥ 3 records per label."""
    n = sum(labels.values())
    return 2 <= len(labels) <= CLASS_MAX_LABELS and n >= ENUM_MIN_OBS_PER_VALUE * len(labels)


def looks_like_summary(prompts: list[str], outputs: list[str], systems: list[str] = ()) -> bool:
    """Summaries: most records ask for one (in the user turns or the system prompt: "Summarize the meeting notes in
    one sentence."), or answers are much shorter than long inputs (< 35% of ≥ 400 chars)."""
    if not prompts:
        return False
    systems = list(systems) or [""] * len(prompts)
    asks = sum(bool(_SUMMARY_WORDS.search(p) or _SUMMARY_WORDS.search(s))
               for p, s in zip(prompts, systems, strict=True))
    if asks >= 0.5 * len(prompts):
        return True
    p_chars = sum(map(len, prompts)) / len(prompts)
    o_chars = sum(map(len, outputs)) / max(1, len(outputs))
    return p_chars >= 400 and o_chars < 0.35 * p_chars


# ----------------------------------------------------------------------------- JSON Schema inference
def _type_of(v: Any) -> str:
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "boolean"
    if isinstance(v, int):
        return "integer"
    if isinstance(v, float):
        return "integer" if v.is_integer() and abs(v) < 2**53 else "number"
    if isinstance(v, str):
        return "string"
    if isinstance(v, list):
        return "array"
    return "object"


def infer_json_schema(values: list[Any]) -> dict:
    """A JSON Schema every observed value fits (up to the majority rule for type conflicts).

    Objects: `properties` per key, `required` = keys present in every object. Strings with few repeated
    values become enums. integer + number → number; a type seen with null becomes nullable.
    """
    types = Counter(_type_of(v) for v in values)
    nullable = "null" in types
    types.pop("null", None)
    if not types:
        return {"type": "null"}
    if "integer" in types and "number" in types:
        types["number"] += types.pop("integer")
    chosen = _resolve_types(types)
    if len(chosen) > 1:
        schema: dict = {"type": sorted(chosen) + (["null"] if nullable else [])}
        return schema
    (t,) = chosen
    schema = _schema_for(t, [v for v in values if _type_of(v) == t or (t == "number" and _type_of(v) == "integer")])
    if nullable:
        schema["type"] = [t, "null"]
    return schema


def _resolve_types(types: Counter) -> list[str]:
    total = sum(types.values())
    top = min(types, key=lambda k: (-types[k], k))
    if types[top] >= TYPE_MAJORITY * total:
        return [top]
    return sorted(types)


def _schema_for(t: str, values: list[Any]) -> dict:
    if t == "object":
        return _object_schema(values)
    if t == "array":
        items = [x for v in values for x in v]
        return {"type": "array", "items": infer_json_schema(items)} if items else {"type": "array"}
    if t == "string":
        return _string_schema(values)
    return {"type": t}


def _object_schema(objs: list[dict]) -> dict:
    seen: Counter[str] = Counter(k for o in objs for k in o)
    props = {k: infer_json_schema([o[k] for o in objs if k in o]) for k in sorted(seen)}
    required = sorted(k for k, c in seen.items() if c == len(objs))
    schema: dict = {"type": "object", "properties": props}
    if required:
        schema["required"] = required
    return schema


def _string_schema(values: list[str]) -> dict:
    distinct = set(values)
    if (len(distinct) <= ENUM_MAX_VALUES and len(values) >= ENUM_MIN_OBS_PER_VALUE * len(distinct)
            and max(map(len, distinct)) <= ENUM_MAX_VALUE_CHARS):
        return {"type": "string", "enum": sorted(distinct)}
    return {"type": "string"}


# ----------------------------------------------------------------------------- task schemas
def tool_calls_schema(records: list[dict]) -> dict:
    """The tools actually called, each with its offered spec (or parameters inferred from the arguments)."""
    args_seen: dict[str, list[Any]] = {}
    specs: dict[str, dict] = {}
    for rec in records:
        for t in rec.get("tools") or []:
            fn = t.get("function") or {}
            specs.setdefault(fn.get("name"), fn)
        for call in _target(rec).get("tool_calls") or []:
            fn = call.get("function") or {}
            try:
                args = json.loads(fn.get("arguments") or "{}")
            except ValueError:
                args = None
            args_seen.setdefault(fn.get("name"), []).append(args)
    tools = [_called_tool(name, specs.get(name), args_seen[name]) for name in sorted(args_seen)]
    return {"type": "tool_calls", "tools": tools}


def _called_tool(name: str, spec: dict | None, args: list[Any]) -> dict:
    if spec and isinstance(spec.get("parameters"), dict):
        return {"type": "function", "function": {"name": name, "parameters": spec["parameters"]}}
    objs = [a for a in args if isinstance(a, dict)]
    params = infer_json_schema(objs) if objs else {"type": "object", "properties": {}}
    return {"type": "function", "function": {"name": name, "parameters": params}}


def _target(rec: dict) -> dict:
    for m in reversed(rec["messages"]):
        if m.get("role") == "assistant":
            return m
    return {}


def task_schema(category: str, records: list[dict]) -> dict | None:
    """The output schema of a task of `category` over its records (None for free-text tasks)."""
    if category == "tool_calling":
        return tool_calls_schema(records)
    if category == "extraction":
        values = [parse_json_output(_target(r).get("content")) for r in records]
        return infer_json_schema([v for v in values if v is not None])
    if category == "classification":
        labels = sorted({(_target(r).get("content") or "").strip() for r in records})
        return {"type": "string", "enum": labels}
    return None


def canonical_json(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def schema_hash(schema: dict | None) -> str | None:
    """First 16 hex digits of sha256(canonical JSON): stable across runs, record order and key order."""
    if schema is None:
        return None
    return hashlib.sha256(canonical_json(schema).encode("utf-8")).hexdigest()[:16]
