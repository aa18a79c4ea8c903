"""The flywheel's task stage: `slmtune cluster` output in, task dirs with eval sets pinned across rounds out.

An errand's eval set is fixed the first round it appears (the cluster's held-out split then) and copied
byte-for-byte into every later round, so metrics stay comparable and new logs never leak into an old eval.
Every other record of the task — the cluster's train split *and* its eval split — goes to train, except any
record pinned in some task's eval set. Task names are kept from the first round too.

Output (`ROUND/tasks/`): the task-dir format of `slmtune.tasks.cluster` (`index.json`, `<task>/train.jsonl`,
`eval.jsonl`, `task.json` with `key` and `first_round` added), limited to the selected tasks, largest first;
plus `curate_report.json` (the round's curate report, for export manifests) and `selection.json`:
`{"tasks": [task.json...], "not_trained": [{"task", "reason"}], "registry_tasks": {key: entry}}`.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from slmtune.flywheel.state import match_task, task_key
from slmtune.io import dumps, file_fingerprint, iter_jsonl, write_json, write_jsonl

MIN_TRAIN = 4  # fewer train records than a batch teaches nothing worth exporting


def build_tasks(cluster_dir: Path, out_dir: Path, known: dict[str, dict], workdir: Path, round_name: str,
                max_tasks: int | None, curate_report: Path) -> dict:
    """Write `out_dir` (see module docstring) and return the selection."""
    index = json.loads((cluster_dir / "index.json").read_text(encoding="utf-8"))
    pinned = {i for entry in known.values() for i in entry["eval_ids"]}
    registry = dict(known)
    found = []
    for entry in index["tasks"]:
        task = json.loads((cluster_dir / entry["dir"] / "task.json").read_text(encoding="utf-8"))
        key = match_task(task, registry) or task_key(task)
        if key not in registry:
            registry[key] = _new_entry(cluster_dir / entry["dir"] / "eval.jsonl", task, round_name, registry)
        found.append((key, task, cluster_dir / entry["dir"]))
    pinned |= {i for key, _, _ in found for i in registry[key]["eval_ids"]}
    if out_dir.exists():
        shutil.rmtree(out_dir)  # a half-written stage from an interrupted run: rebuild it whole
    tasks = [_write_task(out_dir, key, task, src, registry[key], pinned, workdir) for key, task, src in found]
    tasks.sort(key=lambda t: (-t["n_train"], t["name"]))
    selected, not_trained = _select(tasks, max_tasks)
    write_json(out_dir / "index.json", index | {"tasks": [_index_entry(t) for t in selected]})
    shutil.copyfile(curate_report, out_dir / "curate_report.json")
    selection = {"tasks": selected, "not_trained": not_trained,
                 "registry_tasks": {k: v for k, v in registry.items() if k in {t["key"] for t in tasks} or k in known}}
    write_json(out_dir / "selection.json", selection)
    return selection


def _new_entry(eval_path: Path, task: dict, round_name: str, registry: dict) -> dict:
    taken = {e["name"] for e in registry.values()}
    name, n = task["name"], 2
    while name in taken:  # a new errand that cluster named like an old one
        name, n = f"{task['name']}-{n}", n + 1
    return {"name": name, "first_round": round_name, "eval_sha256": file_fingerprint(eval_path),
            "eval_ids": [rec["id"] for _, rec in iter_jsonl(eval_path)], "category": task["category"],
            "schema_hash": task["schema_hash"], "tools": task.get("tools") or [],
            "system_fingerprints": task.get("system_fingerprints") or []}


def _write_task(out_dir: Path, key: str, task: dict, src: Path, entry: dict, pinned: set, workdir: Path) -> dict:
    name = entry["name"]
    tdir = out_dir / name
    tdir.mkdir(parents=True)
    eval_src = src / "eval.jsonl" if entry["first_round"] == out_dir.parent.name else \
        workdir / entry["first_round"] / "tasks" / name / "eval.jsonl"
    shutil.copyfile(eval_src, tdir / "eval.jsonl")
    recs = [rec for p in (src / "train.jsonl", src / "eval.jsonl") for _, rec in iter_jsonl(p)]
    recs.sort(key=lambda r: (str(r.get("id")), dumps(r)))  # cluster's order (id), whichever split a record was in
    n_train = write_jsonl(tdir / "train.jsonl", (r for r in recs if r.get("id") not in pinned))
    out = task | {"name": name, "key": key, "first_round": entry["first_round"], "n_train": n_train,
                  "n_eval": len(entry["eval_ids"]), "files": {"train": "train.jsonl", "eval": "eval.jsonl"}}
    write_json(tdir / "task.json", out)
    return out


def _select(tasks: list[dict], max_tasks: int | None) -> tuple[list[dict], list[dict]]:
    selected, skipped = [], []
    for t in tasks:
        if t["n_train"] < MIN_TRAIN or t["n_eval"] == 0:
            skipped.append({"task": t["name"], "reason": f"too little data ({t['n_train']} train, {t['n_eval']} eval)"})
        elif max_tasks is not None and len(selected) >= max_tasks:
            skipped.append({"task": t["name"], "reason": f"over --max-tasks {max_tasks} (largest tasks go first)"})
        else:
            selected.append(t)
    return selected, skipped


def _index_entry(t: dict) -> dict:
    keys = ("category", "output_kind", "tools", "tools_called", "system_fingerprints", "top_terms", "schema_hash",
            "n_train", "n_eval")
    return {"name": t["name"], "dir": t["name"], **{k: t.get(k) for k in keys}}
