"""The RL reward: a sampled answer scored against the teacher's by eval's own per-record comparison.

`reward(task, text, record)` parses the model's text as eval does (`slmtune.render.parse_output`), scores it with
`slmtune.eval.metrics.score` and blends the per-record verdicts into one number in [0, 1], graded rather than
all-or-nothing so a group of rollouts that are all wrong can still differ (ToolRL's finding for small
tool-callers: format, then tool name, parameter names, parameter values):

=====================  ==========================================================================================
tool calling           0.1 format (every call parses) + 0.1 schema (the calls fit the offered tools) + 0.2 tool
                       name + 0.2 argument names (F1 of the key sets of each aligned call of the right name) + 0.2
                       argument values (`arguments_f1`) + 0.2 whole answer exact (`exact_match`)
extraction             0.1 format + 0.1 schema + 0.4 fields F1 + 0.4 exact
classification         0.1 format + 0.1 label in the enum + 0.8 label right
text                   0.1 non-empty + 0.9 ROUGE-L
=====================  ==========================================================================================

A term with nothing to count drops out and the others are rescaled (a teacher that called no tool has no tool
names to match: then format, schema and exact decide). Extra calls cost through `exact_match`, extra arguments
through both F1s, so padding an answer does not pay.
"""

from __future__ import annotations

from typing import Any

from slmtune.eval.metrics import (
    CLASSIFICATION,
    EXTRACTION,
    TOOL_CALLING,
    align_calls,
    decode_calls,
    score,
)
from slmtune.render import parse_output

WEIGHTS: dict[str, dict[str, float]] = {
    TOOL_CALLING: {"parse_rate": 0.1, "schema_valid_rate": 0.1, "tool_name_accuracy": 0.2, "argument_names": 0.2,
                   "arguments_f1": 0.2, "exact_match": 0.2},
    EXTRACTION: {"parse_rate": 0.1, "schema_valid_rate": 0.1, "fields_f1": 0.4, "exact_match": 0.4},
    CLASSIFICATION: {"parse_rate": 0.1, "schema_valid_rate": 0.1, "label_accuracy": 0.8},
}
TEXT_WEIGHTS = {"parse_rate": 0.1, "rouge_l": 0.9}


def argument_names(pred: dict | None, ref: dict) -> list[float]:
    """Per reference call: F1 of the argument-name sets of its aligned predicted call (0 if that call's name
    differs or its arguments do not parse)."""
    p, r = decode_calls(pred), decode_calls(ref)
    out = []
    for rc, pi in zip(r, align_calls(p, r), strict=True):
        pc = p[pi] if pi is not None else None
        if pc is None or pc[0] != rc[0] or not isinstance(pc[1], dict) or not isinstance(rc[1], dict):
            out.append(0.0)
            continue
        a, b = set(pc[1]), set(rc[1])
        out.append(1.0 if not a and not b else 2 * len(a & b) / (len(a) + len(b)))
    return out


def verdicts(category: str, schema: Any, text: str, record: dict) -> dict[str, list[float]]:
    """eval's verdicts of the answer `text` to `record` (its last assistant message is the reference), plus
    `argument_names` for tool calls."""
    pred, ref = parse_output(text), record["messages"][-1]
    v = score(category, schema, pred, ref, record.get("tools"))
    if category == TOOL_CALLING:
        v["argument_names"] = argument_names(pred, ref)
    return v


def blend(v: dict[str, list[float]], category: str) -> float:
    """The weighted mean of each term's mean over its units; terms without units drop out."""
    weights = WEIGHTS.get(category, TEXT_WEIGHTS)
    got = {k: sum(v[k]) / len(v[k]) for k in weights if v.get(k)}
    total = sum(weights[k] for k in got)
    return sum(weights[k] * x for k, x in got.items()) / total if total else 0.0


def reward(category: str, schema: Any, text: str, record: dict) -> float:
    """One sampled answer's reward in [0, 1] (see the module docstring)."""
    return blend(verdicts(category, schema, text, record), category)
