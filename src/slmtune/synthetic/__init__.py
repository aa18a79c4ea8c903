"""Made-up but realistic data for demos, tests and benchmarks: agent logs of recurring errands with planted
PII, and a tiny Llama + tokenizer built offline."""

from __future__ import annotations

from slmtune.synthetic.logs import generate_logs, write_logs
from slmtune.synthetic.tiny import build_tiny_model, weather_records

__all__ = ["build_tiny_model", "generate_logs", "weather_records", "write_logs"]
