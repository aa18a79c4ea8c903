"""Selective prediction: answer only when confident, and say how often and how well.

Per record, a model row has a confidence (`slmtune.infer.confidence`) and a verdict against the teacher: the
task's key metric for that record (`metrics.key_metric`: exact match for tool calls and extraction, the label for
classification; 1 = agrees with the teacher). A threshold t answers the records with confidence ≥ t and defers
the rest (to the LLM, when serving):

* `curve` — the risk–coverage curve: for every distinct confidence (as a threshold, highest first), the share of
  records answered (coverage) and the mean key metric of those answered (accuracy);
* `auroc` — how well the confidence separates agreeing from disagreeing records: the probability that a random
  agreeing record is more confident than a random disagreeing one (ties count half; None when all agree or
  none does);
* `calibrate(target)` — the lowest threshold whose answered records agree with the teacher at `target` *with a
  conservative bound*: the one-sided 90 % Clopper–Pearson lower bound of their agreement rate must reach the
  target, not the rate itself. So 10 answered records, all right, certify only 0.79; certifying 0.9 takes 22
  of 22, and 0.95 takes 45 of 45. With too few records no threshold passes: coverage 0, threshold None — never
  a guess.

Only answers serving would hand the agent count as answered: on a tool-calling task a text answer goes to the
LLM whatever its confidence (the guard's rule, `slmtune.serve.guard`), and so does an answer holding a scrub
placeholder (`<SECRET_1>`) that its prompt does not, so such records (`servable` False, given
as confidence None to the functions below) are never answered at any threshold — an abstention the SLM got right
does not buy the calls it gets wrong a route. The AUROC still reads every record's own confidence.

Agreement for the bound is binary: a record counts as agreeing when its key metric is 1. Free-text tasks (key
metric ROUGE-L) are never exactly 1 in practice, so they are not calibrated: their curve is reported, and
`calibrate` says why it gives no threshold.

Picking the lowest passing threshold tests many thresholds on the same records, which makes a single bound
optimistic; the flywheel therefore calibrates on one part of the held-out calls and reports the answered
calls' accuracy on another (`slmtune.flywheel`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from slmtune.data.scrub import invented_placeholders
from slmtune.infer.calls import TOOL_CALLING

LEVEL = 0.9  # one-sided confidence of the Clopper–Pearson bound


def servable(category: str, message: dict | None, prompt: Any = None) -> bool:
    """Whether serving could hand the agent this answer: on a tool-calling task only one that calls a tool, and
    on any task not one that holds a scrub placeholder its prompt does not (the guard's `placeholder`)."""
    m = message or {}
    if category == TOOL_CALLING and not m.get("tool_calls"):
        return False
    return not invented_placeholders(m, prompt)


def record_scores(verdicts: Sequence[dict[str, list[float]]], key: str) -> list[float]:
    """Each record's key metric (the mean of its units; a record the metric does not count scores 0)."""
    out = []
    for v in verdicts:
        units = v.get(key) or []
        out.append(sum(units) / len(units) if units else 0.0)
    return out


def curve(conf: Sequence[float | None], scores: Sequence[float]) -> list[dict]:
    """[{threshold, coverage, accuracy, answered, agree}] for every distinct confidence, highest threshold first
    (`agree`: answered records whose key metric is 1; a record with confidence None is never answered, but counts
    in the coverage's denominator)."""
    n = len(conf)
    pairs = sorted(((c, s) for c, s in zip(conf, scores, strict=True) if c is not None), key=lambda p: -p[0])
    out, total, agree = [], 0.0, 0
    for i, (c, s) in enumerate(pairs):
        total, agree = total + s, agree + (s >= 1.0)
        if i + 1 < len(pairs) and pairs[i + 1][0] == c:
            continue  # a threshold answers every record of its confidence
        out.append({"threshold": round(c, 6), "coverage": round((i + 1) / n, 6),
                    "accuracy": round(total / (i + 1), 6), "answered": i + 1, "agree": agree})
    return out


def auroc(conf: Sequence[float], scores: Sequence[float]) -> float | None:
    """P(confidence of an agreeing record > that of a disagreeing one), ties half (Mann–Whitney)."""
    good = [c for c, s in zip(conf, scores, strict=True) if s >= 1.0]
    bad = [c for c, s in zip(conf, scores, strict=True) if s < 1.0]
    if not good or not bad:
        return None
    wins = sum((g > b) + 0.5 * (g == b) for g in good for b in bad)
    return round(wins / (len(good) * len(bad)), 6)


def lower_bound(k: int, n: int, level: float = LEVEL) -> float:
    """One-sided Clopper–Pearson lower bound of a rate seen as k of n, at `level` confidence."""
    if k <= 0 or n <= 0:
        return 0.0
    from scipy.stats import beta

    return float(beta.ppf(1 - level, k, n - k + 1))


def calibrate(conf: Sequence[float | None], scores: Sequence[float], target: float, level: float = LEVEL,
              text_task: bool = False) -> dict:
    """`{target, level, threshold, coverage, accuracy, lower_bound, n, answered}`: the lowest threshold whose
    answered records' agreement has a lower bound ≥ `target`; threshold None and coverage 0 when none does
    (`reason` says why)."""
    n = len(conf)
    out = {"target": target, "level": level, "threshold": None, "coverage": 0.0, "accuracy": None,
           "lower_bound": None, "n": n, "answered": 0}
    if text_task:
        return out | {"reason": "free-text answers are not calibrated (their key metric is never exactly 1)"}
    if n == 0:
        return out | {"reason": "no records"}
    best = None
    for point in curve(conf, scores):  # highest threshold first: the last that passes is the lowest
        k = point["agree"]
        lb = lower_bound(k, point["answered"], level)
        if best is None or lb > best:
            best = lb
        if lb >= target:
            out |= {"threshold": point["threshold"], "coverage": point["coverage"], "answered": point["answered"],
                    "accuracy": round(k / point["answered"], 6), "lower_bound": round(lb, 6)}
    if out["threshold"] is None:
        out |= {"lower_bound": round(best or 0.0, 6),
                "reason": f"no threshold reaches {target:g} at {level:.0%} confidence with {n} records "
                          f"(best lower bound {best or 0.0:.3f})"}
    return out


def selective(conf: Sequence[float | None], scores: Sequence[float], target: float | None = None,
              text_task: bool = False, serves: Sequence[bool] | None = None) -> dict | None:
    """report.json's `models.<row>.selective`: the AUROC, the curve and, with `target`, the calibration's keys
    (`calibrate`) and its `cross_fit` coverage and accuracy; `serves[i]` False: record i is never answered (see
    module docstring). None for a row without confidences (predictions, teacher)."""
    if not conf or any(c is None for c in conf):
        return None
    served = [c if ok else None for c, ok in zip(conf, serves or [True] * len(conf), strict=True)]
    out = {"auroc": auroc(conf, scores), "curve": curve(served, scores)}
    if target is not None:
        out |= calibrate(served, scores, target, text_task=text_task)
        out["cross_fit"] = cross_fit(served, scores, target)
    return out


def cross_fit(conf: Sequence[float | None], scores: Sequence[float], target: float, folds: int = 2,
              level: float = LEVEL) -> dict:
    """Coverage and accuracy measured only on records that did not set the threshold they are judged by: the
    records are dealt into `folds` parts by position (record i to part i mod folds); each part is answered with
    the threshold `calibrate` picks on the other parts, and the parts are pooled. `{folds, coverage, accuracy,
    answered, n}` (accuracy None when nothing was answered)."""
    n = len(conf)
    answered, total = 0, 0.0
    for f in range(folds):
        rest = [i for i in range(n) if i % folds != f]
        t = calibrate([conf[i] for i in rest], [scores[i] for i in rest], target, level)["threshold"]
        if t is None:
            continue
        picked = [i for i in range(f, n, folds) if conf[i] is not None and conf[i] >= t]
        answered, total = answered + len(picked), total + sum(scores[i] for i in picked)
    return {"folds": folds, "coverage": round(answered / n, 6) if n else 0.0,
            "accuracy": round(total / answered, 6) if answered else None, "answered": answered, "n": n}
