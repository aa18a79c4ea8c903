"""`slmtune models`: the exported checkpoints in a folder, read from each export's `slmtune.json`.

One row per export: `name`, `path`, `task`, `category`, `schema_hash`, `base`, `format`, `size_bytes`,
`key_metric`, `tuned`, `base_value`, `teacher` (the key metric of each model row, 1.0 = as the teacher),
`n_eval`, `created`. Folders without a readable `slmtune.json` are skipped (temp dirs, foreign checkpoints).
"""

from __future__ import annotations

import json
from pathlib import Path

from slmtune.errors import SlmtuneError
from slmtune.eval.metrics import key_metric
from slmtune.export.export import MANIFEST


def list_models(exports_dir: str | Path) -> list[dict]:
    """Rows for every export under `exports_dir`, newest first."""
    exports_dir = Path(exports_dir)
    if not exports_dir.is_dir():
        raise SlmtuneError(f"{exports_dir}: no such folder.", "Give the folder `slmtune export -o` wrote to.")
    rows = [row for d in sorted(exports_dir.iterdir()) if (row := _row(d)) is not None]
    return sorted(rows, key=lambda r: r["created"] or "", reverse=True)


def _row(folder: Path) -> dict | None:
    path = folder / MANIFEST
    if folder.name.startswith(".") or not path.is_file():
        return None
    try:
        m = json.loads(path.read_text(encoding="utf-8"))
    except ValueError:
        return None
    task, ev = m.get("task") or {}, m.get("eval") or {}
    km = ev.get("key_metric") or key_metric(task.get("category") or "")
    vals = {r: (ev.get("metrics") or {}).get(r, {}).get(km) for r in ("tuned", "base", "teacher")}
    return {"name": folder.name, "path": str(folder.resolve()), "task": task.get("name"),
            "category": task.get("category"), "schema_hash": task.get("schema_hash"),
            "base": (m.get("base_model") or {}).get("name"), "format": m.get("format"),
            "size_bytes": sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()),
            "key_metric": km, "tuned": vals["tuned"], "base_value": vals["base"], "teacher": vals["teacher"],
            "n_eval": ev.get("n"), "created": m.get("created")}
