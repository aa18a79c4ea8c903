"""Stage 8: `slmtune serve` — one OpenAI-compatible endpoint in front of the exports and the upstream LLM
(`run`, configured by `ServeConfig`). Inside: the HTTP app and fallback (`server`), request and answer checks
(`guard`), the gate (`asgi`), OpenAI wire formats (`wire`), the served log (`served_log`) and the engines
(`engine`: the in-process `EmbeddedEngine` built from `batcher`, `model_cache` and `grammar`; `vllm`)."""

from __future__ import annotations

from slmtune.serve.config import ServeConfig
from slmtune.serve.server import run

__all__ = ["ServeConfig", "run"]
