"""Stage 7: a run → a merged, verified checkpoint (`merge_run`), a tagged export (`export_run`, with its GGUF and
chat template), the exports listing (`list_models`) and the router that says which export serves which request
(`build_router`, `route`; `slmtune.serve` reads it)."""

from __future__ import annotations

from slmtune.export.export import export_run
from slmtune.export.exports import list_models
from slmtune.export.merge import MergeReport, merge_run
from slmtune.export.router import build_router, route

__all__ = ["MergeReport", "build_router", "export_run", "list_models", "merge_run", "route"]
