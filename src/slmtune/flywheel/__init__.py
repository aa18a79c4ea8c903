"""Stage 9: every stage above as one incremental, resumable round over the logs so far (`run_flywheel`).
Only the CLI imports it."""

from __future__ import annotations

from slmtune.flywheel.loop import FlywheelConfig, FlywheelResult, run_flywheel

__all__ = ["FlywheelConfig", "FlywheelResult", "run_flywheel"]
