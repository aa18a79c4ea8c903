"""`slmtune serve`'s configuration: `ServeConfig` (what the CLI's options set) and what the server reads from
router.json — the routes' exports as engine `Checkpoint`s, the routes `--min-score` turns off, and the vLLM
commands for those exports (`slmtune serve --print-vllm-command`)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from slmtune.errors import SlmtuneError
from slmtune.serve.guard import RequestLimits
from slmtune.serve.jobs import Checkpoint


@dataclass(frozen=True)
class ServeConfig:
    router: Path
    """router.json (`slmtune flywheel` writes WORKDIR/router.json)."""
    host: str = "127.0.0.1"
    """Address to bind (loopback by default; any other exposes the server and needs --api-key-env, or
    --insecure)."""
    insecure: bool = False
    """Allow a non-loopback --host without --api-key-env (anyone who reaches it spends the upstream key)."""
    port: int = 8000
    """TCP port."""
    engine: str = "embedded"
    """embedded (transformers, in this process), llamacpp (each export's GGUF from `export --gguf`, through
    llama.cpp in this process; needs slmtune's llamacpp extra) or vllm (a running vLLM server at --engine-url)."""
    engine_urls: tuple[str, ...] = ()
    """vLLM base URL (…/v1) for every export, or EXPORT=URL per export (repeatable)."""
    upstream: str | None = None
    """Base URL (…/v1) of the OpenAI-compatible upstream LLM: it answers unrouted requests and fallbacks."""
    upstream_key_env: str | None = None
    """Environment variable holding the upstream's API key (sent as Authorization: Bearer)."""
    upstream_timeout_s: float = 120.0
    """Seconds to wait for the upstream."""
    max_loaded: int = 2
    """Exports the embedded or llamacpp engine keeps in memory; the least recently used is unloaded."""
    batch_window_ms: float = 10.0
    """How long the first request of a batch waits for more requests to the same export (milliseconds)."""
    max_batch: int = 16
    """Most requests generated as one batch (llamacpp: requests decoding at once, one llama.cpp sequence each, at
    most 4, sharing a 384 MiB KV cache)."""
    max_new_tokens: int = 512
    """Most tokens an export generates per answer (a request's max_tokens may lower it)."""
    decoding: str = "auto"
    """As eval's --decoding: auto = tool-calling routes decode under the grammar of the request's tools
    (llguidance); constrained = extraction JSON and labels too; free = every route decodes free."""
    sample: bool = False
    """Honour a request's temperature > 0 in the embedded engine; off: greedy, as eval scored the model."""
    slm_timeout_s: float = 30.0
    """Seconds an export may take (queueing included) before the request goes to the upstream."""
    min_score: tuple[tuple[str, float], ...] = ()
    """Send a route to the upstream when its tuned key metric (eval report) is below VALUE; TASK=VALUE for one
    route (repeatable). In Python: (task or "*", threshold) pairs."""
    api_key_env: str | None = None
    """Environment variable holding the key clients must send (Authorization: Bearer); unset: no auth."""
    max_body_bytes: int = 4 << 20
    """Largest request body (4 MiB: ~1M tokens of text); larger ones get 413."""
    max_messages: int = 2048
    """Most messages a request may hold (400 past it)."""
    max_tools: int = 128
    """Most tools a request may offer (400 past it; OpenAI's own limit)."""
    max_tokens_cap: int = 32768
    """Largest max_tokens / max_completion_tokens a request may ask of the SLM or the upstream (400 past it)."""
    max_concurrency: int = 256
    """Connections served at once (uvicorn's limit_concurrency); past it new ones get 503."""
    log_dir: Path | None = None
    """Where served calls are logged (default: served/ beside router.json)."""
    log_scrub: bool = True
    """Scrub PII and secrets from served logs, as curate does."""
    log_scrubber: str = "regex"
    """The served logs' scrubber, as curate's --scrubber: regex, or presidio (names and addresses too)."""
    dtype: str = "auto"
    """Embedded engine weights dtype: auto, float32, bfloat16."""

    def limits(self) -> RequestLimits:
        return RequestLimits(self.max_messages, self.max_tools, self.max_tokens_cap)

    def constrained_for(self, category: str) -> bool:
        """Whether a route of this category decodes under its grammar (`decoding`, as eval decodes it)."""
        from slmtune.infer.decoding import decoding_for

        return decoding_for(self.decoding, category) == "constrained"


def load_router(path: Path) -> dict:
    if not path.is_file():
        raise SlmtuneError(f"{path}: no router.json there.", "Give a flywheel workdir or --router router.json.")
    try:
        router = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as e:
        raise SlmtuneError(f"{path}: not JSON ({e}).") from None
    if not isinstance(router, dict) or not isinstance(router.get("routes"), list):
        raise SlmtuneError(f"{path}: not a router.json (no `routes` list).")
    return router


def checkpoints(router: dict) -> dict[str, Checkpoint]:
    """{task: Checkpoint} for every route, from its export's slmtune.json; a missing export is an error."""
    from slmtune.export.export import MANIFEST

    out, missing = {}, []
    for r in router["routes"]:
        folder = Path(r["checkpoint"])
        if not (folder / "config.json").is_file() and not (folder / "adapter_config.json").is_file():
            missing.append(str(folder))
            continue
        m = json.loads((folder / MANIFEST).read_text(encoding="utf-8")) if (folder / MANIFEST).is_file() else {}
        task = m.get("task") or {}
        base_path = (m.get("base_model") or {}).get("path")
        fmt = r.get("format") or m.get("format") or "merged"
        threshold = r.get("threshold")
        if threshold is not None and (isinstance(threshold, bool) or not isinstance(threshold, (int, float))
                                      or not 0 <= threshold <= 1):
            raise SlmtuneError(f"router.json route {r['task']!r}: `threshold` must be a number in [0, 1] or null, "
                               f"got {threshold!r}.")
        out[r["task"]] = Checkpoint(
            name=m.get("name") or folder.name, task=r["task"], category=r.get("category") or task.get("category"),
            schema=task.get("schema"), path=str(folder), format=fmt, base_path=base_path,
            context=_context(Path(base_path) if fmt == "adapter" and base_path else folder), threshold=threshold)
    if missing:
        raise SlmtuneError(f"router.json names exports that are not there: {', '.join(missing)}.",
                           "Run `slmtune flywheel` again, or fix the router's `checkpoint` paths.")
    return out


def _context(model_dir: Path) -> int | None:
    """max_position_embeddings from a model folder's config.json, when it says."""
    try:
        n = json.loads((model_dir / "config.json").read_text(encoding="utf-8")).get("max_position_embeddings")
    except (OSError, ValueError, AttributeError):
        return None
    return n if isinstance(n, int) and n > 0 else None


def parse_min_score(values: list[str]) -> tuple[tuple[str, float], ...]:
    """`--min-score` values: `0.5` for every route, `TASK=0.5` for one."""
    out = []
    for v in values:
        task, _, num = v.rpartition("=")
        try:
            out.append((task or "*", float(num)))
        except ValueError:
            raise SlmtuneError(f"--min-score {v!r}: expected VALUE or TASK=VALUE, e.g. 0.8 or "
                               "tool_calling-get_weather=0.9.") from None
    return tuple(out)


def disabled_routes(router: dict, min_score: tuple[tuple[str, float], ...]) -> dict[str, str]:
    """{task: why} for routes whose tuned key metric is below their --min-score (or has no eval to show)."""
    limits = dict(min_score)
    out = {}
    for r in router["routes"]:
        limit = limits.get(r["task"], limits.get("*"))
        if limit is None:
            continue
        metric, values = next(iter((r.get("metrics") or {}).items()), (None, {}))
        tuned = (values or {}).get("tuned")
        if tuned is None or tuned < limit:
            out[r["task"]] = f"tuned {metric} {tuned} < --min-score {limit}"
    return out


def vllm_command_text(router_path: Path) -> str:
    """The vLLM commands for a router's exports, and the `slmtune serve` line that uses them."""
    from slmtune.serve.vllm import vllm_commands

    items = vllm_commands(list(checkpoints(load_router(router_path)).values()))
    if not items:
        return f"# {router_path} routes nothing: there is nothing for vLLM to serve."
    lines = ["# Start vLLM (one server per merged export; one per base model for its adapters):"]
    lines += [it["command"] for it in items]
    urls = " ".join(f"--engine-url {m}={it['url']}" for it in items for m in it["models"])
    lines += ["# Then point slmtune at it:", f"slmtune serve --router {router_path} --engine vllm {urls}"]
    return "\n".join(lines)
