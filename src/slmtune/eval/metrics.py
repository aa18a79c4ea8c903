"""Scoring one model output against the teacher's: pure functions, no torch.

`score(category, schema, pred, ref, tools)` turns a predicted assistant message and the teacher's (the
reference) into per-record *verdicts*: `{metric: [unit scores]}`, where a unit is what the metric counts —
a record (`parse_rate`, `schema_valid_rate`, `exact_match`, `label_accuracy`, `token_f1`, `rouge_l`) or a
reference tool call (`tool_name_accuracy`, `arguments_exact_match`, `arguments_f1`). `aggregate` averages each
metric over every unit of every record and keeps the count, so a metric's value is always `sum / count`.

Rules (what the tests pin down):

* Values compare type-aware (`values_equal`): `5 == 5.0`, `"5" != 5`, `True != 1`, object key order ignored,
  array order kept.
* Tool calls are aligned to the reference calls one-to-one (same name first, then most equal arguments), so
  parallel calls may come in any order. Per reference call: `tool_name_accuracy` (aligned call has its name),
  `arguments_exact_match` (same name and equal arguments), `arguments_f1` (F1 of the (key, value) pairs; 1.0
  when both are empty). A reference call left without a partner scores 0 on all three. `exact_match` per
  record: the same multiset of (name, arguments), so extra or missing calls fail it.
* `parse_rate`: tool_calling — at least one call (none, when the teacher made none) and every call has a
  string name and JSON-object arguments;
  extraction — the content is JSON (bare or in a ``` fence); classification / text — non-empty content.
* `schema_valid_rate` (`slmtune.schema_check`): every call names a known tool and its arguments fit that tool's
  `parameters`; the extraction object fits the task schema; the label is one of the enum (case-insensitive).
  Not counted when the task has no schema (text tasks).
* Text tasks: `token_f1` (bag of lower-cased word tokens) and `rouge_l` (LCS F-measure) against the teacher.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from typing import Any

from slmtune.infer.calls import BAD as _BAD
from slmtune.infer.calls import (  # re-exported: eval's callers and the tests name them here
    CLASSIFICATION,
    EXTRACTION,
    TEXT_CATEGORIES,
    TOOL_CALLING,
    decode_calls,
    label_of,
    parse_json_text,
    tool_specs,
)

METRICS = {
    TOOL_CALLING: ("parse_rate", "schema_valid_rate", "tool_name_accuracy", "arguments_exact_match",
                   "arguments_f1", "exact_match"),
    EXTRACTION: ("parse_rate", "schema_valid_rate", "fields_f1", "exact_match"),
    CLASSIFICATION: ("parse_rate", "schema_valid_rate", "label_accuracy"),
    **{c: ("parse_rate", "token_f1", "rouge_l", "exact_match") for c in TEXT_CATEGORIES},
}
# What decides whether the tuned model does the errand (gates, exports, the flywheel's comparisons).
KEY_METRICS = {TOOL_CALLING: "exact_match", EXTRACTION: "exact_match", CLASSIFICATION: "label_accuracy"}
TEXT_KEY_METRIC = "rouge_l"


def key_metric(category: str) -> str:
    return KEY_METRICS.get(category, TEXT_KEY_METRIC)


_WORD = re.compile(r"\w+", re.U)


# ----------------------------------------------------------------------------- values
def values_equal(a: Any, b: Any) -> bool:
    """JSON values equal up to number representation (5 == 5.0) and object key order; bools are not numbers."""
    if isinstance(a, bool) or isinstance(b, bool):
        return isinstance(a, bool) and isinstance(b, bool) and a == b
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return a == b
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(values_equal(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(values_equal(x, y) for x, y in zip(a, b, strict=True))
    return type(a) is type(b) and a == b


def canonical(v: Any) -> str:
    """A string equal for `values_equal` values (integral floats written as ints, keys sorted)."""
    def norm(x: Any) -> Any:
        if isinstance(x, float) and x.is_integer():
            return int(x)
        if isinstance(x, dict):
            return {k: norm(y) for k, y in x.items()}
        if isinstance(x, list):
            return [norm(y) for y in x]
        return x
    return json.dumps(norm(v), sort_keys=True, ensure_ascii=False)


def pairs_f1(pred: dict, ref: dict) -> float:
    """F1 of (key, value) pairs; a key counts when both sides have it with equal values."""
    if not pred and not ref:
        return 1.0
    tp = sum(1 for k in ref if k in pred and values_equal(pred[k], ref[k]))
    return 2 * tp / (len(pred) + len(ref))


# ----------------------------------------------------------------------------- tool calls
def align_calls(pred: list[tuple], ref: list[tuple]) -> list[int | None]:
    """For each reference call, the index of its predicted partner (or None): greedy on (name, exact, F1)."""
    def quality(p: tuple, r: tuple) -> tuple:
        same = p[0] == r[0]
        ok = same and p[1] is not _BAD and r[1] is not _BAD
        return (same, ok and values_equal(p[1], r[1]), pairs_f1(p[1], r[1]) if ok else 0.0)

    cands = sorted(((quality(p, r), -ri, -pi) for ri, r in enumerate(ref) for pi, p in enumerate(pred)),
                   reverse=True)
    partner: list[int | None] = [None] * len(ref)
    used: set[int] = set()
    for q, nri, npi in cands:
        ri, pi = -nri, -npi
        if partner[ri] is None and pi not in used and q[0]:
            partner[ri] = pi
            used.add(pi)
    # Calls with a wrong name still pair up (in order) so the name is scored as wrong, not as missing.
    free = [pi for pi in range(len(pred)) if pi not in used]
    for ri in range(len(ref)):
        if partner[ri] is None and free:
            partner[ri] = free.pop(0)
    return partner


def score_tool_calls(pred: dict | None, ref: dict, specs: dict[str, dict]) -> dict[str, list[float]]:
    p, r = decode_calls(pred), decode_calls(ref)
    # A record whose teacher answered without a call is parsed when the model also makes no (broken) call.
    parsed = (bool(p) or not r) and all(isinstance(n, str) and a is not _BAD for n, a in p)
    valid = parsed and bool(specs) and all(n in specs and _fits(a, specs[n]) for n, a in p)
    partner = align_calls(p, r)
    names, exact, f1 = [], [], []
    for rc, pi in zip(r, partner, strict=True):
        pc = p[pi] if pi is not None else (None, _BAD)
        same = pc[0] == rc[0]
        ok = same and pc[1] is not _BAD and rc[1] is not _BAD
        names.append(float(same))
        exact.append(float(ok and values_equal(pc[1], rc[1])))
        f1.append(pairs_f1(pc[1], rc[1]) if ok else 0.0)
    whole = parsed and sorted(_call_key(c) for c in p) == sorted(_call_key(c) for c in r)
    return {"parse_rate": [float(parsed)], "schema_valid_rate": [float(valid)] if specs else [],
            "tool_name_accuracy": names, "arguments_exact_match": exact, "arguments_f1": f1,
            "exact_match": [float(whole)]}


def _call_key(call: tuple) -> str:
    return json.dumps([call[0], "<bad>" if call[1] is _BAD else canonical(call[1])])


def _fits(value: Any, schema: dict | None) -> bool:
    from slmtune.schema_check import is_valid

    if value is _BAD:
        return False
    # a schema that can't be used (not a schema, a non-local $ref) constrains nothing we can check
    return is_valid(value, schema, broken=True)


# ----------------------------------------------------------------------------- other categories
def score_extraction(pred: dict | None, ref: dict, schema: dict | None) -> dict[str, list[float]]:
    p, r = parse_json_text((pred or {}).get("content")), parse_json_text(ref.get("content"))
    parsed = p is not _BAD
    out = {"parse_rate": [float(parsed)], "schema_valid_rate": [float(parsed and _fits(p, schema))] if schema else []}
    if isinstance(r, dict):
        out["fields_f1"] = [pairs_f1(p, r) if isinstance(p, dict) else 0.0]
    out["exact_match"] = [float(parsed and r is not _BAD and values_equal(p, r))]
    return out


def score_classification(pred: dict | None, ref: dict, schema: dict | None) -> dict[str, list[float]]:
    label, gold = label_of(pred).casefold(), label_of(ref).casefold()
    enum = [str(x).casefold() for x in (schema or {}).get("enum") or []]
    return {"parse_rate": [float(bool(label))],
            "schema_valid_rate": [float(bool(label) and label in enum)] if enum else [],
            "label_accuracy": [float(bool(label) and label == gold)]}


def words(text: str | None) -> list[str]:
    return _WORD.findall((text or "").lower())


def token_f1(pred: str | None, ref: str | None) -> float:
    p, r = Counter(words(pred)), Counter(words(ref))
    if not p and not r:
        return 1.0
    common = sum((p & r).values())
    return 2 * common / (sum(p.values()) + sum(r.values()))


def rouge_l(pred: str | None, ref: str | None) -> float:
    """ROUGE-L F1: longest common subsequence of word tokens (O(n·m), fine for single answers)."""
    p, r = words(pred), words(ref)
    if not p and not r:
        return 1.0
    if not p or not r:
        return 0.0
    prev = [0] * (len(r) + 1)
    for x in p:
        cur = [0]
        for j, y in enumerate(r):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    lcs = prev[-1]
    return 2 * lcs / (len(p) + len(r))


def score_text(pred: dict | None, ref: dict) -> dict[str, list[float]]:
    p, r = (pred or {}).get("content") or "", ref.get("content") or ""
    return {"parse_rate": [float(bool(p.strip()))], "token_f1": [token_f1(p, r)], "rouge_l": [rouge_l(p, r)],
            "exact_match": [float(" ".join(p.split()) == " ".join(r.split()))]}


# ----------------------------------------------------------------------------- entry points
def score(category: str, schema: Any, pred: dict | None, ref: dict, record_tools: list | None = None
          ) -> dict[str, list[float]]:
    """Per-record verdicts `{metric: [unit scores]}` of a predicted message against the teacher's."""
    if category == TOOL_CALLING:
        return score_tool_calls(pred, ref, tool_specs(schema, record_tools))
    if category == EXTRACTION:
        return score_extraction(pred, ref, schema if isinstance(schema, dict) else None)
    if category == CLASSIFICATION:
        return score_classification(pred, ref, schema if isinstance(schema, dict) else None)
    return score_text(pred, ref)


def aggregate(verdicts: list[dict[str, list[float]]], category: str) -> dict[str, dict]:
    """`{metric: {"value": mean over units or None, "count": units}}` in the category's metric order."""
    out = {}
    for name in METRICS.get(category, ()):
        units = [u for v in verdicts for u in v.get(name, [])]
        out[name] = {"value": round(sum(units) / len(units), 6) if units else None, "count": len(units)}
    return out
