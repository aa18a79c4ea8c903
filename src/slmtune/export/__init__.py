"""Stages 7-8: a run → a merged, verified checkpoint (`merge_run`), a tagged export (`export_run`), the
exports listing and the router that says which export serves which request."""

from __future__ import annotations

from slmtune.ship.export import export_run
from slmtune.ship.exports import list_models
from slmtune.ship.merge import MergeReport, merge_run
from slmtune.ship.router import build_router, route

__all__ = ["MergeReport", "build_router", "export_run", "list_models", "merge_run", "route"]
