"""Stage 3: curated records → recurring tasks with a category, an output schema and train/eval splits
(`cluster`). Never imports torch."""

from __future__ import annotations

from slmtune.tasks.cluster import ClusterResult, cluster
from slmtune.tasks.schema import categorize, schema_hash, task_schema

__all__ = ["ClusterResult", "categorize", "cluster", "schema_hash", "task_schema"]
