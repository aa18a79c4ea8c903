"""Stage 1-2, records in: agent logs → canonical records (`ingest`), scrubbed, filtered and de-duplicated
(`curate`). Never imports torch."""

from __future__ import annotations

from slmtune.data.backends import get_backend
from slmtune.data.curate import CurateConfig, CurateResult, curate
from slmtune.data.ingest import IngestSummary, ingest
from slmtune.data.scrub import scrub_record

__all__ = ["CurateConfig", "CurateResult", "IngestSummary", "curate", "get_backend", "ingest", "scrub_record"]
