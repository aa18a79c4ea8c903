"""The flywheel's bookkeeping: rounds, stage fingerprints, `stage.done.json` markers, the task registry.

A stage's *fingerprint* is the sha256 of a canonical JSON of its inputs (file sha256s, never paths) and its
parameters. A stage that finished writes `stage.done.json` = `{"stage", "fingerprint", "finished", ...}` LAST,
after its outputs are in place; a marker whose fingerprint matches the current inputs means "done, skip".

`WORKDIR/flywheel.json` (the registry, rewritten atomically at the end of every round)::

    {"version": 1, "inputs": [log paths, every round's, in first-seen order],
     "rounds": ["round-001", ...]  (finished rounds, oldest first),
     "tasks": {key: {"name", "first_round", "eval_sha256", "eval_ids": [...], "category", "schema_hash",
                     "tools", "system_fingerprints"}}}

A task's `key` (`task_key`) joins its category, output schema hash, offered tools and — for free-text tasks,
which have no schema — its main system-prompt fingerprint, so the same errand is recognised across rounds
even when clustering names it differently.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from slmtune.errors import SlmtuneError
from slmtune.io import fingerprint, now, read_json_or_none, write_json

MARKER = "stage.done.json"
REGISTRY = "flywheel.json"


def read_marker(stage_dir: Path) -> dict | None:
    path = stage_dir / MARKER
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except ValueError:
        return None  # a torn marker counts as not done


def is_done(stage_dir: Path, fp: str) -> bool:
    m = read_marker(stage_dir)
    return m is not None and m.get("fingerprint") == fp


def mark_done(stage_dir: Path, stage: str, fp: str, **extra: Any) -> dict:
    marker = {"stage": stage, "fingerprint": fp, "finished": now(), **extra}
    write_json(stage_dir / MARKER, marker)
    return marker


def task_key(task: dict) -> str:
    """Stable identity of an errand across rounds (see module docstring)."""
    tools = sorted(task.get("tools") or [])
    fps = task.get("system_fingerprints") or []
    sys_fp = fps[0][0] if fps and not task.get("schema_hash") else None
    return fingerprint([task.get("category"), task.get("schema_hash"), tools, sys_fp])[:16]


def match_task(task: dict, known: dict[str, dict]) -> str | None:
    """The registry key of an earlier round's task this one continues: same key, else same category with a
    shared system-prompt fingerprint and the same tools (a schema that gained an optional field)."""
    key = task_key(task)
    if key in known:
        return key
    mine = {h for h, _ in task.get("system_fingerprints") or []}
    for k, old in known.items():
        same_kind = old["category"] == task.get("category") and sorted(old["tools"]) == sorted(task.get("tools") or [])
        if same_kind and mine & {h for h, _ in old.get("system_fingerprints") or []}:
            return k
    return None


# ----------------------------------------------------------------------------- registry and rounds
def load_registry(workdir: Path) -> dict:
    path = workdir / REGISTRY
    if not path.is_file():
        return {"version": 1, "inputs": [], "rounds": [], "tasks": {}}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except ValueError as e:
        raise SlmtuneError(f"{path}: not valid JSON ({e}).", "Restore it or start a new --workdir.") from None


def save_registry(workdir: Path, registry: dict) -> None:
    write_json(workdir / REGISTRY, registry)


def round_dirs(workdir: Path) -> list[Path]:
    return sorted(p for p in workdir.glob("round-[0-9][0-9][0-9]") if p.is_dir())


def pick_round(workdir: Path, registry: dict, inputs_fp: str) -> tuple[Path, Path | None]:
    """(this round's dir, the previous finished round's dir or None).

    An unfinished last round with the same inputs is resumed; a finished one with the same inputs is re-used as
    is (nothing new to learn); otherwise a new round starts. A last round without `round.json` (a run killed
    while writing it, the round's first file) never started: it is taken over, not skipped.
    """
    rounds = round_dirs(workdir)
    finished = [workdir / r for r in registry.get("rounds", [])]
    prev = finished[-1] if finished else None
    if rounds:
        last = rounds[-1]
        started = read_json_or_none(last / "round.json")
        if started is None and last not in finished:
            return last, prev
        if (started or {}).get("inputs_fingerprint") == inputs_fp:
            prev_of_last = [r for r in finished if r != last]
            return last, (prev_of_last[-1] if prev_of_last else None)
    return workdir / f"round-{len(rounds) + 1:03d}", prev
