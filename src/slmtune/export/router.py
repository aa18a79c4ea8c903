"""`WORKDIR/router.json`: which exported checkpoint serves which kind of request; the rest goes to the LLM.

Format (version 1)::

    {"version": 1, "created", "round", "fallback": "llm",
     "routes": [{"task", "category", "schema_hash", "checkpoint" (export folder), "format" (merged | adapter),
                 "match": {"tools": [offered tool names, sorted], "output_kind",
                           "system_fingerprints": [sha256-16 of the errand's system-prompt template, ...],
                           "centroid_terms": [words that set the task's prompts apart]},
                 "metrics": {key_metric: {"tuned", "base", "teacher"}},
                 "threshold": answers less confident than this go to the LLM (null: none calibrated),
                 "target", "coverage", "accuracy": the calibration (`slmtune.flywheel.loop._calibration`): the
                 share of held-out calls the SLM answered at that target and how often those answers agreed
                 with the teacher, counted on calls that did not set the threshold}],
     "not_routed": [{"task", "reason"}]}  (e.g. "coverage 0.04 at accuracy 0.95 (needs 0.2; ...)")

`route(request, router)` applies the rules in order: a request offering tools goes to the route with exactly
that tool set, else to the route with the fewest tools among those offering all of the request's (a task's
tools are the union over its tool family, as `slmtune cluster` groups them: an agent that offers its file-system
tools alone in one step and beside its messaging tools in the next); a request without tools goes to a
tool-less route whose centroid terms it shares most (at least `MIN_TERMS`); anything else returns None — the LLM
keeps it. (System fingerprints are computed by `slmtune cluster` on the system prompt with boilerplate shared
across errands removed, so they identify a task in the logs; serving code matches on tools and terms, which need
no corpus.)
"""

from __future__ import annotations

import re
from pathlib import Path

from slmtune.io import write_json

MIN_TERMS = 2
_WORD = re.compile(r"[a-z]+")


def build_router(routes: list[dict], not_routed: list[dict], round_name: str) -> dict:
    from slmtune.io import now

    return {"version": 1, "created": now(), "round": round_name, "fallback": "llm", "routes": routes,
            "not_routed": not_routed}


def route_entry(task: dict, export_dir: Path, fmt: str, metrics: dict, selective: dict | None = None) -> dict:
    sel = selective or {}
    return {"task": task["name"], "category": task["category"], "schema_hash": task.get("schema_hash"),
            "checkpoint": str(export_dir.resolve()), "format": fmt,
            "match": {"tools": sorted(task.get("tools") or []), "output_kind": task.get("output_kind"),
                      "system_fingerprints": [h for h, _ in task.get("system_fingerprints") or []],
                      "centroid_terms": list(task.get("top_terms") or [])},
            "metrics": metrics, "threshold": sel.get("threshold"), "target": sel.get("target"),
            "coverage": sel.get("coverage"), "accuracy": sel.get("accuracy")}


def write_router(path: Path, router: dict) -> None:
    write_json(path, router)


def route(request: dict, router: dict) -> dict | None:
    """The route serving `request` (a chat request: {messages, tools?}), or None for the LLM."""
    tools = sorted({(t.get("function") or t).get("name") or "" for t in request.get("tools") or []})
    routes = router.get("routes", [])
    if tools:
        exact = next((r for r in routes if r["match"]["tools"] == tools), None)
        covering = [r for r in routes if r["match"]["tools"] and set(tools) <= set(r["match"]["tools"])]
        return exact or min(covering, key=lambda r: len(r["match"]["tools"]), default=None)
    words = set(_WORD.findall(" ".join(str(m.get("content") or "") for m in request.get("messages", [])).lower()))
    scored = [(len(words & set(r["match"]["centroid_terms"])), r) for r in routes if not r["match"]["tools"]]
    best = max(scored, key=lambda x: x[0], default=(0, None))
    return best[1] if best[0] >= MIN_TERMS else None
