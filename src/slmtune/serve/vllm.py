"""`slmtune serve --engine vllm`: routed requests rendered here and completed by a running vLLM OpenAI server.
`VllmEngine` sends the same rendered prompt to vLLM's `/v1/completions` (so vLLM's chat template can't render
differently from training) with greedy settings and the end-of-turn stop ids; `vllm_commands` prints how to
start vLLM for a router's exports."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from slmtune.errors import SlmtuneError
from slmtune.serve.jobs import DEFAULT_PARAMS, Checkpoint, Completion, Params


class VllmEngine:
    """Routed requests rendered here and completed by a running vLLM OpenAI server (`/v1/completions`)."""

    def __init__(self, urls: dict[str, str], default_url: str | None, timeout_s: float = 60.0):
        self.urls, self.default_url, self.timeout_s = urls, default_url, timeout_s
        self._tokenizers: dict[str, Any] = {}
        self._client = None

    async def complete(self, ckpt: Checkpoint, record: dict, params: Params = DEFAULT_PARAMS) -> Completion:
        """`params.constrained` is not passed on: vLLM's own guided decoding would need its grammar dialect. The
        answer's confidence comes from the log-probabilities vLLM returns for the tokens it picked (`logprobs: 1`),
        read as the embedded engine reads its own (`slmtune.infer.confidence`)."""
        import httpx

        from slmtune.infer.generate import stop_ids
        from slmtune.render import prompt_text

        url = self.urls.get(ckpt.name, self.default_url)
        if not url:
            raise SlmtuneError(f"no --engine-url for {ckpt.name}.")
        tok, renderer = self._tokenizer(ckpt)
        body = {"model": ckpt.name, "prompt": prompt_text(renderer, record), "max_tokens": params.max_tokens,
                "temperature": params.temperature, "stop_token_ids": stop_ids(tok), "skip_special_tokens": False,
                "logprobs": 1}
        if self._client is None:
            self._client = httpx.AsyncClient(timeout=self.timeout_s)
        t0 = time.perf_counter()
        resp = await self._client.post(url.rstrip("/") + "/completions", json=body)
        resp.raise_for_status()
        data = resp.json()
        choice = data["choices"][0]
        usage = data.get("usage") or {}
        return Completion(choice.get("text") or "", usage.get("prompt_tokens", 0), usage.get("completion_tokens", 0),
                          choice.get("finish_reason") != "length", 1, round(time.perf_counter() - t0, 4),
                          _confidence(choice, params))

    def _tokenizer(self, ckpt: Checkpoint):
        if ckpt.name not in self._tokenizers:
            from transformers import AutoTokenizer

            from slmtune.render import make_renderer

            tok = AutoTokenizer.from_pretrained(ckpt.path)
            self._tokenizers[ckpt.name] = (tok, make_renderer(tok))
        return self._tokenizers[ckpt.name]

    def loaded(self) -> dict:
        return {"exports": [], "bases": {}, "vllm": {"urls": self.urls, "default": self.default_url}}

    async def aclose(self) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = None


def _confidence(choice: dict, params: Params) -> float | None:
    """The answer's confidence from vLLM's `logprobs.token_logprobs` (None when sampled or not returned)."""
    from slmtune.infer.confidence import confidence

    lps = (choice.get("logprobs") or {}).get("token_logprobs") if isinstance(choice.get("logprobs"), dict) else None
    if params.temperature > 0 or not isinstance(lps, list):
        return None
    return confidence([float(x) for x in lps if isinstance(x, (int, float)) and not isinstance(x, bool)])


def vllm_commands(checkpoints: list[Checkpoint], first_port: int = 8001) -> list[dict]:
    """How to serve these exports with vLLM: one server per merged export, one per base for its adapters
    (`--lora-modules`). Each item: {"command", "url", "models"}."""
    import shlex

    out, port = [], first_port
    hermes = ["--enable-auto-tool-choice", "--tool-call-parser", "hermes"]
    for ck in (c for c in checkpoints if c.format != "adapter"):
        cmd = ["vllm", "serve", ck.path, "--served-model-name", ck.name, "--host", "127.0.0.1", "--port", str(port),
               *hermes]
        out.append({"command": shlex.join(cmd), "url": f"http://127.0.0.1:{port}/v1", "models": [ck.name]})
        port += 1
    by_base: dict[str, list[Checkpoint]] = {}
    for ck in (c for c in checkpoints if c.format == "adapter"):
        by_base.setdefault(ck.base_path or "?", []).append(ck)
    for base, cks in by_base.items():
        r = max(_lora_rank(c.path) for c in cks)
        rank = max(8, 1 << (r - 1).bit_length())  # vLLM takes ranks 8, 16, 32, ...: the next one up
        cmd = ["vllm", "serve", base, "--host", "127.0.0.1", "--port", str(port), "--enable-lora",
               "--max-lora-rank", str(rank), "--max-loras", str(len(cks)), "--lora-modules",
               *(f"{c.name}={c.path}" for c in cks), *hermes]
        out.append({"command": shlex.join(cmd), "url": f"http://127.0.0.1:{port}/v1", "models": [c.name for c in cks]})
        port += 1
    return out


def _lora_rank(adapter_dir: str) -> int:
    path = Path(adapter_dir) / "adapter_config.json"
    try:
        return int(json.loads(path.read_text(encoding="utf-8")).get("r") or 16)
    except (OSError, ValueError):
        return 16
