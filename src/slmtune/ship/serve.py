"""`slmtune serve`: an OpenAI-compatible HTTP server that answers each request with the small model trained
for its errand, and everything else — or anything the small model gets wrong — with the upstream LLM.

Endpoints: `POST /v1/chat/completions` (`tools`, `tool_choice`, `temperature`, `max_tokens`, `stream`),
`GET /v1/models` (the routed exports), `GET /healthz`, `GET /metrics` (Prometheus text).

A request goes through `slmtune.ship.router.route` to its task's export. The engine (`slmtune.ship.engine`)
generates an answer, `slmtune.render.parse_output` reads it back, and `slmtune.ship.guard.check_answer`
checks it; an answer that fails, a timeout (`slm_timeout_s`) or an engine error sends the request to the
upstream LLM instead, verbatim. The client always gets one OpenAI response; headers say who answered:

    x-slmtune-route      the task whose export answered, or `llm`
    x-slmtune-task       the task the router picked (also when the LLM answered instead)
    x-slmtune-fallback   why the LLM answered: no_route | unsupported (n > 1, logprobs, tool_choice none)
                         | disabled (route below --min-score) | invalid_output | schema_invalid | timeout | error

and the response's `model` is the export's name or the upstream's model. Upstream errors come back with the
upstream's status and an OpenAI error body; without an upstream, a request the small models can't answer
gets 503.

**Served log** (`log_dir`, default `WORKDIR/served/`): every answered call becomes one line of
`<UTC date>.jsonl` in the OpenAI request/response log format `slmtune ingest` reads —
`{"id", "timestamp", "request", "response", "latency_ms", "metadata": {..., "slmtune_route", "slmtune_task",
"slmtune_answered_by": "slm" | "llm", "slmtune_fallback", "slmtune_batch_size"}}` — which ingest carries into
the record's `meta.metadata`, where `slmtune curate` finds the calls the small models answered and drops them
(a model is not trained on its own outputs). Calls that ended in an error go to `<date>.errors.log` (a
suffix ingest skips). One writer thread writes the lines, each once, scrubbed by `slmtune.data.scrub` first
(unless `log_scrub` is off).
"""

# No `from __future__ import annotations`: FastAPI reads the endpoints' annotations (`Request`, imported
# inside the function that builds the app) when they are defined.
import asyncio
import hmac
import json
import logging
import os
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from slmtune.errors import SlmtuneError
from slmtune.ship.engine import Checkpoint, Params
from slmtune.ship.guard import check_answer, request_problems, to_record
from slmtune.ship.router import route

log = logging.getLogger("slmtune.serve")
LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64)


@dataclass(frozen=True)
class ServeConfig:
    router: Path
    """router.json (`slmtune flywheel` writes WORKDIR/router.json)."""
    host: str = "127.0.0.1"
    """Address to bind; anything but loopback exposes the server (set `api_key_env` then)."""
    port: int = 8000
    """TCP port."""
    engine: str = "embedded"
    """`embedded` (transformers in this process) or `vllm` (a running vLLM server, `engine_urls`)."""
    engine_urls: tuple[str, ...] = ()
    """vLLM base URLs: `URL` for every export, or `EXPORT=URL` per export."""
    upstream: str | None = None
    """Base URL of the OpenAI-compatible upstream LLM, as the openai client takes it (…/v1)."""
    upstream_key_env: str | None = None
    """Environment variable holding the upstream's API key (sent as `Authorization: Bearer`)."""
    upstream_timeout_s: float = 120.0
    """Seconds to wait for the upstream."""
    max_loaded: int = 2
    """Exports kept in memory by the embedded engine; the least recently used is unloaded."""
    batch_window_ms: float = 10.0
    """How long the first request of a batch waits for more requests to the same export."""
    max_batch: int = 16
    """Most requests generated as one batch."""
    max_new_tokens: int = 512
    """Most tokens an export generates per answer (a request's `max_tokens` may lower it)."""
    constrained: bool = False
    """Decode tool calls, extraction JSON and labels under the task's llguidance grammar (as `eval --constrained`)."""
    sample: bool = False
    """Honour a request's temperature > 0 in the embedded engine; off: greedy, as eval scored the model."""
    slm_timeout_s: float = 30.0
    """Seconds an export may take (queueing included) before the request goes to the upstream."""
    min_score: tuple[tuple[str, float], ...] = ()
    """(task or "*", threshold): routes whose tuned key metric (eval report) is below it go to the upstream."""
    api_key_env: str | None = None
    """Environment variable holding the key clients must send as `Authorization: Bearer`; None: no auth."""
    max_body_bytes: int = 4 << 20
    """Largest request body (4 MiB: ~1M tokens of text); larger ones get 413."""
    log_dir: Path | None = None
    """Where served calls are logged; default: `served/` beside router.json."""
    log_scrub: bool = True
    """Scrub PII and secrets from served logs (`slmtune.data.scrub`, as curate does)."""
    dtype: str = "auto"
    """Embedded engine weights dtype: auto, float32, bfloat16."""


class HttpError(Exception):
    """A request that ends in an OpenAI-style error body."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", code: str | None = None,
                 headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.code, self.headers = status, message, type_, code, headers or {}


def error_body(message: str, type_: str = "invalid_request_error", code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type_, "param": None, "code": code}}


# ----------------------------------------------------------------------------- router → checkpoints
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
    from slmtune.ship.export import MANIFEST

    out, missing = {}, []
    for r in router["routes"]:
        folder = Path(r["checkpoint"])
        if not (folder / "config.json").is_file() and not (folder / "adapter_config.json").is_file():
            missing.append(str(folder))
            continue
        m = json.loads((folder / MANIFEST).read_text(encoding="utf-8")) if (folder / MANIFEST).is_file() else {}
        task = m.get("task") or {}
        out[r["task"]] = Checkpoint(
            name=m.get("name") or folder.name, task=r["task"], category=r.get("category") or task.get("category"),
            schema=task.get("schema"), path=str(folder), format=r.get("format") or m.get("format") or "merged",
            base_path=(m.get("base_model") or {}).get("path"))
    if missing:
        raise SlmtuneError(f"router.json names exports that are not there: {', '.join(missing)}.",
                           "Run `slmtune flywheel` again, or fix the router's `checkpoint` paths.")
    return out


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


# ----------------------------------------------------------------------------- app
@dataclass
class Ctx:
    config: ServeConfig
    router: dict
    ckpts: dict[str, Checkpoint]
    disabled: dict[str, str]
    metrics: Any
    api_key: str | None
    upstream_key: str | None
    engine: Any = None
    http: Any = None
    served: Any = None
    started: float = field(default_factory=time.time)


def create_app(config: ServeConfig):
    """The FastAPI app; the engine, upstream client and log writer start and stop with it (lifespan)."""
    import contextlib

    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, Response

    ctx = _context(config)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        import httpx

        ctx.engine = _engine(config, ctx.metrics)
        ctx.http = httpx.AsyncClient(timeout=config.upstream_timeout_s)
        ctx.served = ServedLog(config.log_dir or config.router.parent / "served", config.log_scrub)
        try:
            yield
        finally:
            await ctx.http.aclose()
            await ctx.engine.aclose()
            ctx.served.close()

    app = FastAPI(title="slmtune serve", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(_Gate, api_key=ctx.api_key, max_body=config.max_body_bytes)

    @app.exception_handler(HttpError)
    async def _http_error(request: Request, e: HttpError):
        return JSONResponse(error_body(e.message, e.type, e.code), status_code=e.status, headers=e.headers)

    @app.exception_handler(Exception)
    async def _crash(request: Request, e: Exception):
        log.exception("unhandled error")  # the traceback stays in the server log, never in a response
        return JSONResponse(error_body("internal server error", "server_error"), status_code=500)

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        return await handle_chat(ctx, request)

    @app.get("/v1/models")
    async def models():
        data = [{"id": c.name, "object": "model", "created": int(ctx.started), "owned_by": "slmtune",
                 "task": task, "category": c.category, "enabled": task not in ctx.disabled}
                for task, c in ctx.ckpts.items()]
        return {"object": "list", "data": data}

    @app.get("/healthz")
    async def healthz():
        return {"status": "ok", "routes": len(ctx.ckpts), "disabled": ctx.disabled,
                "upstream": bool(config.upstream), "engine": config.engine, "loaded": ctx.engine.loaded()}

    @app.get("/metrics")
    async def metrics():
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return Response(generate_latest(ctx.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return app


def _context(config: ServeConfig) -> Ctx:
    _require()
    if config.engine not in ("embedded", "vllm"):
        raise SlmtuneError(f"--engine must be embedded or vllm, got {config.engine!r}.")
    if config.engine == "vllm" and not config.engine_urls:
        raise SlmtuneError("--engine vllm needs --engine-url.", "`slmtune serve --print-vllm-command` shows how.")
    router = load_router(config.router)
    ctx = Ctx(config, router, checkpoints(router), disabled_routes(router, config.min_score), None,
              _secret(config.api_key_env, "--api-key-env"), _secret(config.upstream_key_env, "--upstream-key-env"))
    ctx.metrics = _metrics(ctx)
    return ctx


def _require() -> None:
    try:
        import fastapi  # noqa: F401
        import httpx  # noqa: F401
        import prometheus_client  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as e:
        raise SlmtuneError(f"slmtune serve needs {e.name}.",
                           "Install the serve extra: pip install 'slmtune[serve]'.") from None


def _secret(env: str | None, flag: str) -> str | None:
    if env is None:
        return None
    value = os.environ.get(env, "")
    if not value:
        raise SlmtuneError(f"{flag} {env}: that environment variable is empty or not set.",
                           f"export {env}=... before starting the server.")
    return value


def _engine(config: ServeConfig, metrics):
    from slmtune.ship.engine import EmbeddedEngine, VllmEngine

    if config.engine == "vllm":
        named = dict(u.split("=", 1) for u in config.engine_urls if "=" in u)
        default = next((u for u in config.engine_urls if "=" not in u), None)
        return VllmEngine(named, default, config.slm_timeout_s)
    return EmbeddedEngine(config.max_loaded, config.batch_window_ms / 1000, config.max_batch, config.sample,
                          config.dtype, on_batch=lambda name, n: metrics.batch.labels(name).observe(n))


class _Gate:
    """ASGI middleware before any endpoint but /healthz: the API key (401), then the declared body size (413)."""

    def __init__(self, app, api_key: str | None, max_body: int):
        self.app, self.api_key, self.max_body = app, api_key, max_body

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["path"] != "/healthz":
            problem = self._problem(dict(scope.get("headers") or []))
            if problem is not None:
                from starlette.responses import JSONResponse

                status, message, code = problem
                headers = {"www-authenticate": "Bearer"} if status == 401 else {}
                resp = JSONResponse(error_body(message, "invalid_request_error", code), status, headers=headers)
                return await resp(scope, receive, send)
        await self.app(scope, receive, send)

    def _problem(self, headers: dict) -> tuple[int, str, str] | None:
        if self.api_key is not None:
            given = headers.get(b"authorization", b"")
            if not hmac.compare_digest(given, f"Bearer {self.api_key}".encode()):
                return 401, "missing or wrong API key: send `Authorization: Bearer <key>`.", "invalid_api_key"
        size = headers.get(b"content-length", b"0")
        if size.isdigit() and int(size) > self.max_body:
            return 413, f"the request body is {int(size)} bytes, over the {self.max_body}-byte limit.", "too_large"
        return None


# ----------------------------------------------------------------------------- metrics
@dataclass(frozen=True)
class Metrics:
    registry: Any
    requests: Any  # route (task | llm), outcome (slm | llm | error)
    fallbacks: Any  # reason
    latency: Any  # answered_by (slm | llm), seconds
    tokens: Any  # model: tokens generated by the exports (answers that failed the guard included)
    batch: Any  # model: requests per generated batch


def _metrics(ctx: Ctx) -> Metrics:
    from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

    reg = CollectorRegistry()
    loaded = Gauge("slmtune_loaded_models", "Exports loaded by the embedded engine.", registry=reg)
    loaded.set_function(lambda: len(ctx.engine.loaded()["exports"]) if ctx.engine else 0)
    return Metrics(
        reg,
        Counter("slmtune_requests", "Chat requests by route and who answered.", ["route", "outcome"], registry=reg),
        Counter("slmtune_fallbacks", "Requests the upstream LLM answered, by reason.", ["reason"], registry=reg),
        Histogram("slmtune_request_seconds", "Request latency by who answered.", ["answered_by"],
                  buckets=LATENCY_BUCKETS, registry=reg),
        Counter("slmtune_generated_tokens", "Tokens generated by the exports.", ["model"], registry=reg),
        Histogram("slmtune_batch_size", "Requests generated together.", ["model"], buckets=BATCH_BUCKETS,
                  registry=reg))


# ----------------------------------------------------------------------------- one chat request
@dataclass(frozen=True)
class Call:
    id: str
    body: dict
    raw: bytes
    task: str | None
    t0: float


async def handle_chat(ctx: Ctx, request):
    t0 = time.perf_counter()
    raw = await _read_body(request, ctx.config.max_body_bytes)
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise HttpError(400, f"the request body is not valid JSON: {e}.", code="invalid_json") from None
    problems = request_problems(body)
    if problems:
        raise HttpError(400, "; ".join(problems) + ".", code="invalid_request")
    picked = route(body, ctx.router)
    call = Call(f"req-{uuid.uuid4().hex}", body, raw, picked["task"] if picked else None, t0)
    reason = _skip_reason(ctx, body, call.task)
    if reason is None:
        answer, reason = await _ask_slm(ctx, body, ctx.ckpts[call.task])
        if answer is not None:
            return _slm_response(ctx, call, *answer)
    return await _forward(ctx, call, reason)


async def _read_body(request, cap: int) -> bytes:
    chunks, n = [], 0
    async for chunk in request.stream():  # counted as it arrives: a chunked upload has no content-length
        n += len(chunk)
        if n > cap:
            raise HttpError(413, f"the request body is over the {cap}-byte limit.", code="too_large")
        chunks.append(chunk)
    return b"".join(chunks)


def _skip_reason(ctx: Ctx, body: dict, task: str | None) -> str | None:
    if task is None:
        return "no_route"
    if (body.get("n") or 1) > 1 or body.get("logprobs") or (body.get("tools") and body.get("tool_choice") == "none"):
        return "unsupported"
    return "disabled" if task in ctx.disabled else None


async def _ask_slm(ctx: Ctx, body: dict, ck: Checkpoint):
    """((checkpoint, message, completion), None) for an answer that passed the guard, else (None, reason)."""
    from slmtune.render import parse_output

    cfg = ctx.config
    limit = min(body.get("max_completion_tokens") or body.get("max_tokens") or cfg.max_new_tokens,
                cfg.max_new_tokens)
    params = Params(limit, float(body.get("temperature") or 0.0), cfg.constrained,
                    1 if body.get("parallel_tool_calls") is False else Params.max_calls, cfg.slm_timeout_s)
    try:
        comp = await asyncio.wait_for(ctx.engine.complete(ck, to_record(body), params), cfg.slm_timeout_s)
    except (asyncio.TimeoutError, TimeoutError):
        return None, "timeout"
    except Exception:  # noqa: BLE001 - whatever broke, the upstream answers instead
        log.exception("the %s export failed; the upstream answers", ck.name)
        return None, "error"
    ctx.metrics.tokens.labels(ck.name).inc(comp.completion_tokens)
    msg = parse_output(comp.text)
    reason = check_answer(ck.category, ck.schema, msg, comp.finished, body.get("tools"), body.get("tool_choice"))
    return (None, reason) if reason else ((ck, msg, comp), None)


def _headers(task: str | None, answered_by: str, reason: str | None) -> dict:
    h = {"x-slmtune-route": task if answered_by == "slm" and task else "llm"}
    if task:
        h["x-slmtune-task"] = task
    if reason:
        h["x-slmtune-fallback"] = reason
    return h


def completion_json(ck: Checkpoint, msg: dict, comp) -> dict:
    """An OpenAI chat.completion for an export's answer."""
    calls = [{"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function", "function": c["function"]}
             for c in msg.get("tool_calls") or []]
    message: dict = {"role": "assistant", "content": msg.get("content")}
    if calls:
        message["tool_calls"] = calls
    return {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()),
            "model": ck.name, "system_fingerprint": None,
            "choices": [{"index": 0, "message": message, "logprobs": None,
                         "finish_reason": "tool_calls" if calls else "stop"}],
            "usage": {"prompt_tokens": comp.prompt_tokens, "completion_tokens": comp.completion_tokens,
                      "total_tokens": comp.prompt_tokens + comp.completion_tokens}}


def _slm_response(ctx: Ctx, call: Call, ck: Checkpoint, msg: dict, comp):
    from fastapi.responses import JSONResponse, StreamingResponse

    resp = completion_json(ck, msg, comp)
    _done(ctx, call, resp, "slm", None, {"slmtune_model": ck.name, "slmtune_batch_size": comp.batch_size})
    headers = _headers(call.task, "slm", None)
    if call.body.get("stream"):
        usage = bool((call.body.get("stream_options") or {}).get("include_usage"))
        return StreamingResponse(iter(sse_chunks(resp, usage)), media_type="text/event-stream", headers=headers)
    return JSONResponse(resp, headers=headers)


def sse_chunks(resp: dict, include_usage: bool) -> list[str]:
    """A whole chat.completion as the server-sent events of a streamed one."""
    head = {k: resp[k] for k in ("id", "created", "model", "system_fingerprint")} | {"object": "chat.completion.chunk"}
    choice, msg = resp["choices"][0], resp["choices"][0]["message"]
    deltas: list[dict] = [{"role": "assistant", "content": ""}]
    if msg.get("content"):
        deltas.append({"content": msg["content"]})
    if msg.get("tool_calls"):
        deltas.append({"tool_calls": [{"index": i, **c} for i, c in enumerate(msg["tool_calls"])]})
    chunks = [head | {"choices": [{"index": 0, "delta": d, "logprobs": None, "finish_reason": None}]} for d in deltas]
    chunks.append(head | {"choices": [{"index": 0, "delta": {}, "logprobs": None,
                                       "finish_reason": choice["finish_reason"]}]})
    if include_usage:
        chunks.append(head | {"choices": [], "usage": resp["usage"]})
    return [f"data: {json.dumps(c, ensure_ascii=False)}\n\n" for c in chunks] + ["data: [DONE]\n\n"]


# ----------------------------------------------------------------------------- the upstream LLM
async def _forward(ctx: Ctx, call: Call, reason: str):
    """The request, verbatim, to the upstream; its answer (or error status) back to the client."""
    import httpx
    from fastapi.responses import Response, StreamingResponse

    cfg, headers = ctx.config, _headers(call.task, "llm", reason)
    ctx.metrics.fallbacks.labels(reason).inc()
    if not cfg.upstream:
        why = "no route matched it" if reason == "no_route" else f"the small model did not answer it ({reason})"
        return _fail(ctx, call, 503, error_body(f"no upstream LLM is configured (--upstream) and {why}.",
                                                "service_unavailable", "no_upstream"), headers, reason)
    auth = {"authorization": f"Bearer {ctx.upstream_key}"} if ctx.upstream_key else {}
    req = ctx.http.build_request("POST", cfg.upstream.rstrip("/") + "/chat/completions", content=call.raw,
                                 headers={"content-type": "application/json", **auth})
    try:
        resp = await ctx.http.send(req, stream=True)
    except httpx.TimeoutException:
        return _fail(ctx, call, 504, error_body("the upstream LLM timed out.", "upstream_error", "upstream_timeout"),
                     headers, reason)
    except httpx.HTTPError as e:
        return _fail(ctx, call, 502, error_body(f"the upstream LLM could not be reached ({type(e).__name__}).",
                                                "upstream_error", "upstream_unreachable"), headers, reason)
    if resp.status_code >= 400:
        data = await resp.aread()
        await resp.aclose()
        return _fail(ctx, call, resp.status_code, upstream_error(resp.status_code, data), headers, reason)
    if call.body.get("stream"):
        return StreamingResponse(_relay(ctx, call, resp, reason), media_type="text/event-stream", headers=headers)
    data = await resp.aread()
    await resp.aclose()
    try:
        answer = json.loads(data)
    except ValueError:
        return _fail(ctx, call, 502, error_body("the upstream LLM answered with something other than JSON.",
                                                "upstream_error", "upstream_invalid"), headers, reason)
    _done(ctx, call, answer, "llm", reason, {"slmtune_model": answer.get("model")})
    return Response(data, status_code=resp.status_code, media_type="application/json", headers=headers)


def upstream_error(status: int, data: bytes) -> dict:
    """The upstream's own OpenAI error body when it sent one, else one that quotes what it sent."""
    try:
        body = json.loads(data)
    except ValueError:
        body = None
    if isinstance(body, dict) and isinstance(body.get("error"), dict):
        return body
    text = data.decode("utf-8", "replace").strip()[:300]
    return error_body(f"the upstream LLM returned HTTP {status}: {text or '(empty body)'}", "upstream_error",
                      f"upstream_{status}")


async def _relay(ctx: Ctx, call: Call, resp, reason: str):
    """Pass the upstream's event stream through unchanged, assembling the whole answer for the log."""
    import httpx

    acc = StreamAssembler()
    try:
        async for chunk in resp.aiter_bytes():
            acc.feed(chunk)
            yield chunk
    except httpx.HTTPError as e:
        log.warning("the upstream stream broke off: %s", e)
    finally:
        await resp.aclose()
        answer = acc.completion()
        if answer is not None:
            _done(ctx, call, answer, "llm", reason, {"slmtune_model": answer.get("model")})


class StreamAssembler:
    """chat.completion.chunk events → the chat.completion they add up to (content, tool calls, usage)."""

    def __init__(self) -> None:
        self.buf, self.head, self.content, self.calls = b"", {}, [], {}
        self.finish, self.usage, self.seen = None, None, False

    def feed(self, data: bytes) -> None:
        self.buf += data
        *lines, self.buf = self.buf.split(b"\n")
        for line in lines:
            line = line.strip()
            if line.startswith(b"data:") and line[5:].strip() != b"[DONE]":
                try:
                    self._chunk(json.loads(line[5:]))
                except ValueError:
                    continue

    def _chunk(self, c: dict) -> None:
        self.seen = True
        self.head = self.head or {k: c.get(k) for k in ("id", "created", "model", "system_fingerprint")}
        self.usage = c.get("usage") or self.usage
        for ch in c.get("choices") or []:
            d = ch.get("delta") or {}
            if d.get("content"):
                self.content.append(d["content"])
            for tc in d.get("tool_calls") or []:
                slot = self.calls.setdefault(tc.get("index", 0), {"id": "", "type": "function",
                                                                  "function": {"name": "", "arguments": ""}})
                slot["id"] = tc.get("id") or slot["id"]
                fn = tc.get("function") or {}
                slot["function"]["name"] += fn.get("name") or ""
                slot["function"]["arguments"] += fn.get("arguments") or ""
            self.finish = ch.get("finish_reason") or self.finish

    def completion(self) -> dict | None:
        if not self.seen:
            return None
        msg: dict = {"role": "assistant", "content": "".join(self.content) or None}
        if self.calls:
            msg["tool_calls"] = [self.calls[i] for i in sorted(self.calls)]
        out = self.head | {"object": "chat.completion",
                           "choices": [{"index": 0, "message": msg, "finish_reason": self.finish}]}
        return out | ({"usage": self.usage} if self.usage else {})


# ----------------------------------------------------------------------------- outcomes: metrics + served log
def _done(ctx: Ctx, call: Call, response: dict, answered_by: str, reason: str | None, extra: dict) -> None:
    seconds = time.perf_counter() - call.t0
    ctx.metrics.requests.labels(call.task or "llm", answered_by).inc()
    ctx.metrics.latency.labels(answered_by).observe(seconds)
    ctx.served.write(_log_line(call, response, answered_by, reason, seconds, extra))


def _fail(ctx: Ctx, call: Call, status: int, body: dict, headers: dict, reason: str | None):
    from fastapi.responses import JSONResponse

    seconds = time.perf_counter() - call.t0
    ctx.metrics.requests.labels(call.task or "llm", "error").inc()
    ctx.served.write(_log_line(call, body, "llm", reason, seconds, {"slmtune_status": status}), errors=True)
    return JSONResponse(body, status_code=status, headers=headers)


def _log_line(call: Call, response: dict, answered_by: str, reason: str | None, seconds: float,
              extra: dict) -> dict:
    from slmtune.io import now

    theirs = call.body.get("metadata") if isinstance(call.body.get("metadata"), dict) else {}
    meta = theirs | {"slmtune_route": call.task if answered_by == "slm" else "llm", "slmtune_task": call.task,
                     "slmtune_answered_by": answered_by, "slmtune_fallback": reason} | extra
    return {"id": call.id, "timestamp": now(), "request": call.body, "response": response,
            "latency_ms": round(seconds * 1000, 1), "metadata": meta}


class ServedLog:
    """One writer thread appending served calls to `<folder>/<UTC date>.jsonl` (errors: `.errors.log`)."""

    def __init__(self, folder: Path, scrub: bool):
        import queue
        import threading

        self.folder, self.scrub = Path(folder), scrub
        self.folder.mkdir(parents=True, exist_ok=True)
        self.queue: queue.Queue = queue.Queue()
        self.thread = threading.Thread(target=self._run, name="slmtune-served-log", daemon=True)
        self.thread.start()

    def write(self, line: dict, errors: bool = False) -> None:
        self.queue.put((line, errors))

    def flush(self) -> None:
        self.queue.join()

    def close(self) -> None:
        self.queue.put(None)
        self.thread.join(timeout=60)

    def _run(self) -> None:
        from slmtune.io import dumps

        while True:
            item = self.queue.get()
            try:
                if item is None:
                    return
                line, errors = item
                line = scrub_line(line) if self.scrub else line
                day = str(line["timestamp"])[:10]
                with open(self.folder / f"{day}{'.errors.log' if errors else '.jsonl'}", "a", encoding="utf-8") as f:
                    f.write(dumps(line) + "\n")
            except Exception:  # noqa: BLE001 - a line that can't be written must not stop the writer
                log.exception("could not write a served-log line")
            finally:
                self.queue.task_done()


def scrub_line(line: dict) -> dict:
    """A served-log line with PII and secrets replaced, placeholders shared by request, answer and tags."""
    from slmtune.data.scrub import scrub_record

    req = dict(line["request"])
    msgs = [_plain(m) for m in req.get("messages") or [] if isinstance(m, dict)]
    resp = line.get("response") if isinstance(line.get("response"), dict) else {}
    choices = [c for c in resp.get("choices") or [] if isinstance(c, dict) and isinstance(c.get("message"), dict)]
    tags = {"metadata": line.get("metadata"), "user": req.get("user"), "request_metadata": req.get("metadata")}
    clean, _ = scrub_record({"messages": msgs + [_plain(c["message"]) for c in choices], "meta": tags})
    req["messages"] = clean["messages"][:len(msgs)]
    for key, tag in (("user", "user"), ("metadata", "request_metadata")):
        if req.get(key) is not None:
            req[key] = clean["meta"][tag]
    answers = iter(clean["messages"][len(msgs):])
    if choices:
        resp = resp | {"choices": [c | {"message": next(answers)} for c in choices]}
    return line | {"request": req, "response": resp, "metadata": clean["meta"]["metadata"]}


def _plain(m: dict) -> dict:
    """Content parts joined into text (as ingest reads them), so the scrubber sees every word."""
    content = m.get("content")
    if isinstance(content, list):
        return m | {"content": "\n".join(p["text"] for p in content
                                         if isinstance(p, dict) and isinstance(p.get("text"), str))}
    return dict(m)


# ----------------------------------------------------------------------------- running
@dataclass
class Running:
    """A server started by `serve_in_thread`."""

    server: Any
    thread: Any
    url: str

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=60)


def serve_in_thread(app, host: str = "127.0.0.1", port: int = 0, wait_s: float = 60.0) -> Running:
    """Run an ASGI app with uvicorn in a background thread (port 0: a free one); returns once it listens."""
    import socket
    import threading

    import uvicorn

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="slmtune-uvicorn", daemon=True)
    thread.start()
    deadline = time.monotonic() + wait_s
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise SlmtuneError(f"the server on {host}:{sock.getsockname()[1]} did not start.")
        time.sleep(0.02)
    return Running(server, thread, f"http://{host}:{sock.getsockname()[1]}")


def run(config: ServeConfig) -> None:
    """Serve until interrupted."""
    app = create_app(config)
    import uvicorn

    if config.host not in ("127.0.0.1", "localhost", "::1") and not config.api_key_env:
        log.warning("serving on %s without --api-key-env: anyone who can reach it can use it", config.host)
    uvicorn.run(app, host=config.host, port=config.port, log_level="info")


def vllm_command_text(router_path: Path) -> str:
    """The vLLM commands for a router's exports, and the `slmtune serve` line that uses them."""
    from slmtune.ship.engine import vllm_commands

    items = vllm_commands(list(checkpoints(load_router(router_path)).values()))
    if not items:
        return f"# {router_path} routes nothing: there is nothing for vLLM to serve."
    lines = ["# Start vLLM (one server per merged export; one per base model for its adapters):"]
    lines += [it["command"] for it in items]
    urls = " ".join(f"--engine-url {m}={it['url']}" for it in items for m in it["models"])
    lines += ["# Then point slmtune at it:", f"slmtune serve --router {router_path} --engine vllm {urls}"]
    return "\n".join(lines)
