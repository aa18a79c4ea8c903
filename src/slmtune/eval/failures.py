"""What went wrong on a tool-calling task: one failure *kind* per record, so a user sees what to collect more of.

`classify(pred, ref, specs)` compares a model's assistant message to the teacher's (the reference) and names the
first kind that applies, in this order (a record can be wrong in several ways; the earliest one is the lesson):

1. `no_call`          the teacher called tools; the model answered in text, or not at all.
2. `unwanted_call`    the teacher answered in text (no tool fits); the model made a call, parsed or not.
3. `unparsed`         a call without a function name, or whose arguments are not a JSON object.
4. `wrong_function`   a call to a function the teacher did not call (or to a tool not offered).
5. `wrong_count`      the same functions, a different number of calls (a parallel call missing or extra).
6. `missing_argument` an argument the teacher gave is absent.
7. `extra_argument`   an argument the teacher did not give.
8. `wrong_type`       an argument's JSON type differs from its type in the tool's parameter schema (from the
                      teacher's value when the schema gives no type); integral floats count as integers and an
                      integer fits `number`.
9. `wrong_value`      same type, a different value (`metrics.values_equal`: 5 == 5.0, key order ignored).

None: correct. Calls pair up as the metrics pair them (`metrics.align_calls`), so parallel calls may come in any
order. An argument present on one side only whose value is the tool schema's `default` for it counts as absent
(omitting `unit` when `unit` defaults to "celsius" and the teacher wrote "celsius" is no failure), so a record can
be correct here and still miss `exact_match`. A teacher call whose own arguments do not parse is not held against
the model. Text answers are not compared: a text answer where the teacher answered in text is correct.

`failure_report(records, outputs, schema)` counts the kinds over a row of outputs and keeps two short examples
of each (`report.json` → `models[row]["failures"]`)::

    {"n": records, "failed": records with a kind,
     "kinds": {kind: {"count": int, "examples": [{"id", "expected", "got", "detail"}, ...]}}}

`kinds` holds only the kinds that occur, most frequent first (ties in the order above).
"""

from __future__ import annotations

import json
from collections import Counter
from typing import Any

from slmtune.eval.metrics import align_calls, decode_calls, tool_specs, values_equal
from slmtune.records import split_prompt_target

KINDS = ("no_call", "unwanted_call", "unparsed", "wrong_function", "wrong_count", "missing_argument",
         "extra_argument", "wrong_type", "wrong_value")
EXAMPLES = 2
MAX_CHARS = 120  # per example string: a report line, not a transcript


def classify(pred: dict | None, ref: dict, specs: dict[str, dict] | None = None) -> str | None:
    """The primary failure kind of `pred` against the teacher's `ref` (see the module doc), None when correct.

    `specs`: {tool name: parameters schema}, as `metrics.tool_specs` returns it."""
    found = diagnose(pred, ref, specs or {})
    return found[0] if found else None


def diagnose(pred: dict | None, ref: dict, specs: dict[str, dict]) -> tuple[str, str] | None:
    """(kind, one-line detail) of the first failure in precedence order, or None."""
    p, r = decode_calls(pred), decode_calls(ref)
    if r and not p:
        said = "answered in text" if ((pred or {}).get("content") or "").strip() else "gave no answer"
        return "no_call", f"{said}; the teacher made {_n_calls(len(r))}"
    if p and not r:
        return "unwanted_call", f"called {_names(p)}; the teacher answered in text"
    for i, (name, args) in enumerate(p, 1):
        if not isinstance(name, str) or not name:
            return "unparsed", f"call {i} has no function name"
        if not isinstance(args, dict):  # decode_calls' marker for arguments that are not an object
            return "unparsed", f"call {i} ({name}): arguments are not a JSON object"
    return _wrong_calls(p, r, specs) or _wrong_arguments(p, r, specs)


def _wrong_calls(p: list[tuple], r: list[tuple], specs: dict[str, dict]) -> tuple[str, str] | None:
    taught = {name for name, _ in r}
    partner = align_calls(p, r)
    for pi, (name, _) in enumerate(p):
        if name not in taught:
            if specs and name not in specs:
                return "wrong_function", f"called {name}, not an offered tool"
            instead = [r[ri][0] for ri, x in enumerate(partner) if x == pi]
            return "wrong_function", f"called {name}; the teacher called {instead[0] if instead else _names(r)}"
    want, got = Counter(n for n, _ in r), Counter(n for n, _ in p)
    if want != got:
        name = next(n for n in want if want[n] != got[n])
        return "wrong_count", f"{_n_calls(got[name])} to {name}; the teacher made {want[name]}"
    return None


def _wrong_arguments(p: list[tuple], r: list[tuple], specs: dict[str, dict]) -> tuple[str, str] | None:
    """The highest-precedence argument failure over the aligned pairs (all same-name by now)."""
    found = []
    for (name, ref_args), pi in zip(r, align_calls(p, r), strict=True):
        if pi is None or not isinstance(ref_args, dict):
            continue
        props = (specs.get(name) or {}).get("properties")
        hit = _compare_args(name, p[pi][1], ref_args, props if isinstance(props, dict) else {})
        if hit:
            found.append(hit)
    return min(found, key=lambda kd: KINDS.index(kd[0])) if found else None


def _compare_args(name: str, got: dict, want: dict, props: dict) -> tuple[str, str] | None:
    def defaulted(key: str, value: Any) -> bool:
        prop = props.get(key)
        return isinstance(prop, dict) and "default" in prop and values_equal(value, prop["default"])

    missing = [k for k in want if k not in got and not defaulted(k, want[k])]
    if missing:
        return "missing_argument", f"{name}: missing {missing[0]} (the teacher gave {_short(want[missing[0]])})"
    extra = [k for k in got if k not in want and not defaulted(k, got[k])]
    if extra:
        return "extra_argument", f"{name}: extra {extra[0]}={_short(got[extra[0]])}"
    differ = [k for k in want if k in got and not values_equal(got[k], want[k])]
    for k in differ:
        typ = props[k].get("type") if isinstance(props.get(k), dict) else None
        if not _type_fits(got[k], typ, want[k]):
            wanted = "/".join(typ) if isinstance(typ, list) else typ or json_type(want[k])
            return "wrong_type", f"{name}.{k}: {json_type(got[k])} {_short(got[k])}, wants {wanted}"
    if differ:
        k = differ[0]
        return "wrong_value", f"{name}.{k}: {_short(got[k])}, the teacher gave {_short(want[k])}"
    return None


def json_type(v: Any) -> str:
    """The JSON Schema type of a value; an integral float is an integer (5.0 fits `integer`, as in jsonschema)."""
    if isinstance(v, bool):
        return "boolean"
    if isinstance(v, int) or (isinstance(v, float) and v.is_integer()):
        return "integer"
    return {float: "number", str: "string", list: "array", dict: "object"}.get(type(v), "null")


def _type_fits(value: Any, schema_type: Any, ref_value: Any) -> bool:
    """Does `value` have the schema's type (or, without one, the teacher's value's type, numbers as one)?"""
    types = [schema_type] if isinstance(schema_type, str) else schema_type
    if not isinstance(types, list) or not types:
        types = ["number" if json_type(ref_value) == "integer" else json_type(ref_value)]
    t = json_type(value)
    return t in types or (t == "integer" and "number" in types)


# ----------------------------------------------------------------------------- the report
def failure_report(records: list[dict], outputs: list[dict], schema: Any = None, examples: int = EXAMPLES) -> dict:
    """Failure kinds over one row: `outputs[i]["message"]` is the model's answer to `records[i]`."""
    kinds: dict[str, dict] = {}
    for rec, out in zip(records, outputs, strict=False):
        ref = split_prompt_target(rec)[1]
        # offered = the record's tools and the task's; the task schema's parameters win (as in the metrics)
        specs = {**tool_specs(None, rec.get("tools")), **tool_specs(schema, None)}
        found = diagnose(out.get("message"), ref, specs)
        if found is None:
            continue
        entry = kinds.setdefault(found[0], {"count": 0, "examples": []})
        entry["count"] += 1
        if len(entry["examples"]) < examples:
            entry["examples"].append({"id": rec.get("id"), "expected": show(ref), "got": show(out.get("message")),
                                      "detail": clip(found[1])})
    order = sorted(kinds, key=lambda k: (-kinds[k]["count"], KINDS.index(k)))
    return {"n": min(len(records), len(outputs)), "failed": sum(k["count"] for k in kinds.values()),
            "kinds": {k: kinds[k] for k in order}}


def show(msg: dict | None) -> str:
    """An assistant message in one short line: `name({args})` per call, else its text quoted."""
    calls = (msg or {}).get("tool_calls") or []
    if calls:
        parts = []
        for c in calls:
            fn = (c or {}).get("function") or {}
            args = fn.get("arguments")
            text = args if isinstance(args, str) else json.dumps(args, ensure_ascii=False)
            parts.append(f"{fn.get('name') or '?'}({text})")
        return clip("; ".join(parts))
    content = ((msg or {}).get("content") or "").strip()
    return clip(json.dumps(content, ensure_ascii=False)) if content else "(no answer)"


def clip(text: str, limit: int = MAX_CHARS) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[:limit - 1] + "…"


def _short(v: Any) -> str:
    return clip(json.dumps(v, ensure_ascii=False), 40)


def _names(calls: list[tuple]) -> str:
    return ", ".join(dict.fromkeys(n if isinstance(n, str) and n else "?" for n, _ in calls))


def _n_calls(n: int) -> str:
    return f"{n} call" if n == 1 else f"{n} calls"
