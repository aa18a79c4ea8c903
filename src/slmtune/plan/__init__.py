"""Stage 4: tasks → one recipe per task that fits a memory budget (`plan`), from a catalog of small models.
Never imports torch."""

from __future__ import annotations

from slmtune.plan.catalog import CATALOG, ModelSpec, lookup
from slmtune.plan.estimate import Estimate, estimate
from slmtune.plan.planner import Planned, PlanResult, plan

__all__ = ["CATALOG", "Estimate", "ModelSpec", "PlanResult", "Planned", "estimate", "lookup", "plan"]
