"""Stage 6: a model on held-out records → agentic metrics against the base model and the logged teacher
(`evaluate`)."""

from __future__ import annotations

from slmtune.eval.evaluate import EvalResult, GenSettings, evaluate
from slmtune.eval.metrics import key_metric, score

__all__ = ["EvalResult", "GenSettings", "evaluate", "key_metric", "score"]
