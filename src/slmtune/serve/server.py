"""`slmtune serve`: an OpenAI-compatible HTTP server that answers each request with the small model trained
for its errand, and everything else — or anything the small model gets wrong — with the upstream LLM.

Endpoints: `POST /v1/chat/completions` (`tools`, `tool_choice`, `temperature`, `max_tokens`, `stream`),
`GET /v1/models` (the routed exports), `GET /healthz`, `GET /metrics` (Prometheus text).

A request goes through `slmtune.export.router.route` to its task's export. The engine (`slmtune.serve.engine`)
generates an answer, `slmtune.render.parse_output` reads it back, and `slmtune.serve.guard.check_answer`
checks it; an answer that fails, a timeout (`slm_timeout_s`) or an engine error sends the request to the
upstream LLM instead, verbatim. The client always gets one OpenAI response; headers say who answered:

    x-slmtune-route      the task whose export answered, or `llm`
    x-slmtune-task       the task the router picked (also when the LLM answered instead)
    x-slmtune-fallback   why the LLM answered: no_route | unsupported (n > 1, logprobs, tool_choice none or
                         naming a tool not offered) | disabled (route below --min-score) | too_long (prompt and
                         max_tokens over the model's context) | invalid_output (a text answer to a
                         tool-calling route included) | schema_invalid | placeholder (a scrub placeholder such
                         as <SECRET_1> the request does not hold) | low_confidence (a well-formed answer
                         less confident than its route's calibrated `threshold` in router.json) | timeout | error

and the response's `model` is the export's name or the upstream's model. Upstream errors come back with the
upstream's status and an OpenAI error body, scrubbed (an upstream 401/403 becomes a 502 that says only that the
upstream refused slmtune's key); a non-JSON upstream answer is a 502; an upstream stream that breaks off ends with
an SSE error event, never a silent end. Without an upstream, a request the small models can't answer gets 503
(400 when it is too long for them).

**Untrusted input** (see README's "Security model"): requests are checked before anything runs on them
(`slmtune.serve.guard.request_problems`: types, counts, nesting, tool schemas with local refs only — 400 naming
what is wrong); the gate (`slmtune.serve.asgi.Gate`) wants `application/json` (415) and, on loopback without a
key, a loopback Host header (DNS rebinding). A client that disconnects cancels its request's generation.

**Served log** (`log_dir`, default `WORKDIR/served/`): every answered call becomes one line in the log format
`slmtune ingest` reads, tagged with who answered and why, so `slmtune curate` can drop the calls the small models
answered (`slmtune.serve.served_log`).
"""

# No `from __future__ import annotations`: FastAPI reads the endpoints' annotations (`Request`, imported
# inside the function that builds the app) when they are defined.
import asyncio
import dataclasses
import json
import logging
import os
import re
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from slmtune.errors import SlmtuneError
from slmtune.export.router import route
from slmtune.serve.asgi import LOOPBACK, Gate
from slmtune.serve.config import ServeConfig, checkpoints, disabled_routes, load_router
from slmtune.serve.guard import check_answer, request_problems, to_record
from slmtune.serve.jobs import Checkpoint, GrammarFailed, Params, PromptTooLong
from slmtune.serve.served_log import ServedLog, log_line, scrub_text
from slmtune.serve.wire import (
    HttpError,
    StreamAssembler,
    completion_json,
    error_body,
    route_headers,
    sse_chunks,
    upstream_error,
)

log = logging.getLogger("slmtune.serve")
ENGINES = ("embedded", "llamacpp", "vllm")
LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64)
CONFIDENCE_BUCKETS = (0.1, 0.25, 0.5, 0.75, 0.9, 0.95, 0.99, 1.0)


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
        ctx.served = ServedLog(config.log_dir or config.router.parent / "served", config.log_scrub,
                               scrubber=config.log_scrubber)
        try:
            yield
        finally:
            await ctx.http.aclose()
            await ctx.engine.aclose()
            ctx.served.close()

    app = FastAPI(title="slmtune serve", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(Gate, api_key=ctx.api_key, max_body=config.max_body_bytes,
                       check_host=config.host in LOOPBACK and ctx.api_key is None)

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
    async def healthz():  # no key needed, so it says nothing else (routes, paths and URLs are for /v1/models)
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics():
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return Response(generate_latest(ctx.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return app


def _context(config: ServeConfig) -> Ctx:
    _require()
    if config.host not in LOOPBACK and not config.api_key_env and not config.insecure:
        raise SlmtuneError(f"--host {config.host} serves beyond this machine, and without --api-key-env anyone who "
                           "can reach it spends your upstream key and writes your training data.",
                           "Set --api-key-env VAR (clients send Authorization: Bearer), or pass --insecure.")
    from slmtune.infer.decoding import DECODINGS, decoding_for

    if config.decoding not in DECODINGS:
        raise SlmtuneError(f"--decoding must be one of {', '.join(DECODINGS)}, got {config.decoding!r}.")
    decoding_for(config.decoding, "tool_calling")  # `constrained` without llguidance: refused now, not per request
    if config.engine not in ENGINES:
        raise SlmtuneError(f"--engine must be one of {', '.join(ENGINES)}, got {config.engine!r}.")
    if config.engine == "vllm" and not config.engine_urls:
        raise SlmtuneError("--engine vllm needs --engine-url.", "`slmtune serve --print-vllm-command` shows how.")
    from slmtune.lock import check_unlocked

    check_unlocked(config.router.parent)  # a flywheel writing this work dir: serve would read a half round
    router = load_router(config.router)
    ckpts = checkpoints(router)
    if config.engine == "llamacpp":
        from slmtune.serve.llamacpp import check_router

        check_router(ckpts)  # every export has its GGUF, and llama.cpp is installed: refused now, not per request
    ctx = Ctx(config, router, ckpts, disabled_routes(router, config.min_score), None,
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
    from slmtune.serve.engine import EmbeddedEngine
    from slmtune.serve.vllm import VllmEngine

    if config.engine == "vllm":
        named = dict(u.split("=", 1) for u in config.engine_urls if "=" in u)
        default = next((u for u in config.engine_urls if "=" not in u), None)
        return VllmEngine(named, default, config.slm_timeout_s)

    def on_batch(name: str, n: int) -> None:
        metrics.batch.labels(name).observe(n)

    if config.engine == "llamacpp":
        from slmtune.serve.llamacpp import LlamaCppEngine

        return LlamaCppEngine(config.max_loaded, config.max_batch, config.sample, on_batch=on_batch)
    return EmbeddedEngine(config.max_loaded, config.batch_window_ms / 1000, config.max_batch, config.sample,
                          config.dtype, on_batch=on_batch)


# ----------------------------------------------------------------------------- metrics
@dataclass(frozen=True)
class Metrics:
    registry: Any
    requests: Any  # route (task | llm), outcome (slm | llm | error)
    fallbacks: Any  # reason
    latency: Any  # answered_by (slm | llm), seconds
    tokens: Any  # model: tokens generated by the exports (answers that failed the guard included)
    batch: Any  # model: requests per generated batch
    cancelled: Any  # requests whose client went away before the answer
    confidence: Any  # route: the confidence of the SLM's well-formed and rejected answers alike


def _metrics(ctx: Ctx) -> Metrics:
    from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

    reg = CollectorRegistry()
    loaded = Gauge("slmtune_loaded_models", "Exports loaded by the embedded engine.", registry=reg)
    loaded.set_function(lambda: len(ctx.engine.loaded()["exports"]) if ctx.engine else 0)
    dropped = Gauge("slmtune_served_log_dropped_lines", "Served-log lines dropped: the writer's queue was full.",
                    registry=reg)
    dropped.set_function(lambda: ctx.served.dropped if ctx.served else 0)
    return Metrics(
        reg,
        Counter("slmtune_requests", "Chat requests by route and who answered.", ["route", "outcome"], registry=reg),
        Counter("slmtune_fallbacks", "Requests the upstream LLM answered, by reason.", ["reason"], registry=reg),
        Histogram("slmtune_request_seconds", "Request latency by who answered.", ["answered_by"],
                  buckets=LATENCY_BUCKETS, registry=reg),
        Counter("slmtune_generated_tokens", "Tokens generated by the exports.", ["model"], registry=reg),
        Histogram("slmtune_batch_size", "Requests generated together.", ["model"], buckets=BATCH_BUCKETS,
                  registry=reg),
        Counter("slmtune_cancelled", "Requests whose client disconnected before the answer.", registry=reg),
        Histogram("slmtune_answer_confidence", "Confidence of the SLM answers, by route (low_confidence below the "
                  "route's threshold).", ["route"], buckets=CONFIDENCE_BUCKETS, registry=reg))


# ----------------------------------------------------------------------------- one chat request
@dataclass(frozen=True)
class Call:
    id: str
    body: dict
    raw: bytes
    task: str | None
    t0: float
    confidence: float | None = None  # the SLM answer's, when one was generated (logged with whoever answered)


async def handle_chat(ctx: Ctx, request):
    t0 = time.perf_counter()
    raw = await _read_body(request, ctx.config.max_body_bytes)
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise HttpError(400, f"the request body is not valid JSON: {str(e)[:200]}.", code="invalid_json") from None
    except RecursionError:
        raise HttpError(400, "the request body nests too deep.", code="invalid_request") from None
    if _LONE_SURROGATE_HINT.search(raw) and _has_lone_surrogate(body):
        raise HttpError(400, "the request body holds a lone UTF-16 surrogate escape (e.g. \\ud800): not Unicode "
                             "text.", code="invalid_json")
    problems = request_problems(body, ctx.config.limits())
    if problems:
        raise HttpError(400, "; ".join(problems) + ".", code="invalid_request")
    picked = route(body, ctx.router)
    call = Call(f"req-{uuid.uuid4().hex}", body, raw, picked["task"] if picked else None, t0)
    reason = _skip_reason(ctx, body, call.task, len(raw))
    if reason is None:
        asked = asyncio.ensure_future(_ask_slm(ctx, body, ctx.ckpts[call.task]))
        if not await _until_done_or_gone(asked, request):
            ctx.metrics.cancelled.inc()
            return _fail(ctx, call, 499, error_body("the client disconnected.", "client_closed", "client_closed"),
                         {}, None)
        answer, reason, conf = asked.result()
        call = dataclasses.replace(call, confidence=conf)
        if answer is not None:
            return _slm_response(ctx, call, *answer)
    return await _forward(ctx, call, reason)


async def _until_done_or_gone(task: asyncio.Future, request, poll_s: float = 0.05) -> bool:
    """Wait for `task`; False (and `task` cancelled, which stops its generation) if the client disconnects."""
    while not task.done():
        await asyncio.wait({task}, timeout=poll_s)
        if not task.done() and await request.is_disconnected():
            task.cancel()
            return False
    return True


async def _read_body(request, cap: int) -> bytes:
    from starlette.requests import ClientDisconnect

    chunks, n = [], 0
    try:
        async for chunk in request.stream():  # counted as it arrives: a chunked upload has no content-length
            n += len(chunk)
            if n > cap:
                raise HttpError(413, f"the request body is over the {cap}-byte limit.", code="too_large")
            chunks.append(chunk)
    except ClientDisconnect:  # the body was cut off: nobody is left to answer, nothing to log
        raise HttpError(400, "the request body was cut off.", code="incomplete_body") from None
    return b"".join(chunks)


# A JSON escape of a UTF-16 surrogate: only then can a parsed body hold a lone one (which no UTF-8 log line,
# tokenizer or response can encode), so only then is the body walked.
_LONE_SURROGATE_HINT = re.compile(rb"\\u[dD][89a-fA-F]")


def _has_lone_surrogate(body: Any) -> bool:
    try:
        json.dumps(body, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def _skip_reason(ctx: Ctx, body: dict, task: str | None, size: int) -> str | None:
    if task is None:
        return "no_route"
    if (body.get("n") or 1) > 1 or body.get("logprobs") or (body.get("tools") and body.get("tool_choice") == "none"):
        return "unsupported"
    named = _named_tool(body)
    offered = {(t.get("function") or {}).get("name") for t in body.get("tools") or [] if isinstance(t, dict)}
    if named and named not in offered:
        return "unsupported"  # tool_choice names a tool the request does not offer: no answer could pass the guard
    context = ctx.ckpts[task].context
    if context is not None and size > 64 * context:
        return "too_long"  # ~4 characters a token: far past the context before any template or tokenizer runs
    return "disabled" if task in ctx.disabled else None


def _named_tool(body: dict) -> str | None:
    """The tool `tool_choice` names ({"type": "function", "function": {"name": ...}}), if any."""
    choice = body.get("tool_choice")
    return ((choice.get("function") or {}).get("name") if isinstance(choice, dict) else None) or None


async def _ask_slm(ctx: Ctx, body: dict, ck: Checkpoint):
    """((checkpoint, message, completion), None, confidence) for an answer that passed the guard and its route's
    confidence threshold, else (None, reason, confidence or None)."""
    from slmtune.render import parse_output

    cfg = ctx.config
    limit = min(body.get("max_completion_tokens") or body.get("max_tokens") or cfg.max_new_tokens,
                cfg.max_new_tokens)
    choice, named = body.get("tool_choice"), _named_tool(body)
    # Under the grammar a call names an offered tool (the named one) with schema-valid arguments; a text answer
    # stays possible unless the request requires a call, and the guard sends it to the upstream.
    params = Params(limit, float(body.get("temperature") or 0.0), cfg.constrained_for(ck.category),
                    1 if body.get("parallel_tool_calls") is False else Params.max_calls, cfg.slm_timeout_s,
                    allow_text=choice != "required" and named is None, tool=named)
    try:
        comp = await asyncio.wait_for(ctx.engine.complete(ck, to_record(body), params), cfg.slm_timeout_s)
    except (asyncio.TimeoutError, TimeoutError):
        return None, "timeout", None
    except PromptTooLong:
        return None, "too_long", None
    except GrammarFailed as e:
        log.info("the %s grammar failed for one request: %s", ck.name, e.message)
        return None, "schema_invalid", None
    except Exception:  # noqa: BLE001 - whatever broke, the upstream answers instead
        log.exception("the %s export failed; the upstream answers", ck.name)
        return None, "error", None
    ctx.metrics.tokens.labels(ck.name).inc(comp.completion_tokens)
    if comp.confidence is not None:
        ctx.metrics.confidence.labels(ck.task).observe(comp.confidence)
    msg = parse_output(comp.text)
    reason = check_answer(ck.category, ck.schema, msg, comp.finished, body.get("tools"), body.get("tool_choice"),
                          prompt=body.get("messages"))
    if reason is None and ck.threshold is not None and (comp.confidence is None or comp.confidence < ck.threshold):
        reason = "low_confidence"  # well-formed, but not as sure as the answers that agreed with the teacher
    return (None, reason, comp.confidence) if reason else ((ck, msg, comp), None, comp.confidence)


def _slm_response(ctx: Ctx, call: Call, ck: Checkpoint, msg: dict, comp):
    from fastapi.responses import JSONResponse, StreamingResponse

    resp = completion_json(ck, msg, comp)
    _done(ctx, call, resp, "slm", None, {"slmtune_model": ck.name, "slmtune_batch_size": comp.batch_size})
    headers = route_headers(call.task, "slm", None)
    if call.body.get("stream"):
        usage = bool((call.body.get("stream_options") or {}).get("include_usage"))
        return StreamingResponse(iter(sse_chunks(resp, usage)), media_type="text/event-stream", headers=headers)
    return JSONResponse(resp, headers=headers)


# ----------------------------------------------------------------------------- the upstream LLM
async def _forward(ctx: Ctx, call: Call, reason: str):
    """The request, verbatim, to the upstream; its answer (or error status) back to the client."""
    import httpx
    from fastapi.responses import Response, StreamingResponse

    cfg, headers = ctx.config, route_headers(call.task, "llm", reason)
    ctx.metrics.fallbacks.labels(reason).inc()
    if not cfg.upstream:
        if reason == "too_long":
            return _fail(ctx, call, 400, error_body(
                "the prompt and max_tokens do not fit the small model's context, and no upstream LLM is configured "
                "(--upstream) to take it.", "invalid_request_error", "context_length_exceeded"), headers, reason)
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
        data = await _read_capped(resp, UPSTREAM_ERROR_BYTES)
        scrubber = cfg.log_scrubber if cfg.log_scrub else "regex"  # error bodies are scrubbed either way
        status, body = upstream_error(resp.status_code, data, scrub=lambda t: scrub_text(t, scrubber))
        return _fail(ctx, call, status, body, headers, reason)
    if call.body.get("stream"):
        return StreamingResponse(_relay(ctx, call, resp, reason), media_type="text/event-stream", headers=headers)
    try:
        data = await resp.aread()
    except httpx.HTTPError as e:
        await resp.aclose()
        return _fail(ctx, call, 502, error_body(f"the upstream LLM's answer broke off ({type(e).__name__}).",
                                                "upstream_error", "upstream_unreachable"), headers, reason)
    await resp.aclose()
    answer = _completion_or_none(data)
    if answer is None:
        return _fail(ctx, call, 502, error_body("the upstream LLM answered with something other than a "
                                                "chat.completion JSON object.", "upstream_error", "upstream_invalid"),
                     headers, reason)
    _done(ctx, call, answer, "llm", reason, {"slmtune_model": answer.get("model")})
    return Response(data, status_code=resp.status_code, media_type="application/json", headers=headers)


UPSTREAM_ERROR_BYTES = 64 << 10  # an error body is a message, not a download


async def _read_capped(resp, cap: int) -> bytes:
    data = b""
    try:
        async for chunk in resp.aiter_bytes():
            data += chunk
            if len(data) >= cap:
                break
    except Exception:  # noqa: BLE001 - an error body that breaks off is still an error: keep what came
        pass
    finally:
        await resp.aclose()
    return data[:cap]


def _completion_or_none(data: bytes) -> dict | None:
    try:
        answer = json.loads(data)
    except (ValueError, RecursionError):
        return None
    ok = isinstance(answer, dict) and isinstance(answer.get("choices"), list) and all(
        isinstance(c, dict) and isinstance(c.get("message", {}), dict) for c in answer["choices"])
    return answer if ok else None


async def _relay(ctx: Ctx, call: Call, resp, reason: str):
    """Pass the upstream's event stream through unchanged, assembling the whole answer for the log. A stream
    that breaks off (a transport error, or an end without `[DONE]` or a finish_reason) ends with an SSE error
    event, and goes to the errors log, never the served log: a cut answer must not become training data."""
    import httpx

    acc, broke = StreamAssembler(), None
    try:
        async for chunk in resp.aiter_bytes():
            acc.feed(chunk)
            yield chunk
    except httpx.HTTPError as e:
        broke = f"the upstream stream broke off ({type(e).__name__})"
    finally:
        await resp.aclose()
    answer = acc.completion()
    if broke is None and not acc.complete():
        broke = "the upstream stream ended before its answer did"
    elif broke is None and answer is None:
        broke = "the upstream stream held no answer"
    if broke is None:
        _done(ctx, call, answer, "llm", reason, {"slmtune_model": answer.get("model")})
        return
    log.warning("%s (request %s)", broke, call.id)
    body = error_body(f"{broke}.", "upstream_error", "upstream_stream_broken")
    _fail(ctx, call, 502, body | {"partial": answer}, {}, reason)
    yield f"data: {json.dumps(body)}\n\n".encode()


# ----------------------------------------------------------------------------- outcomes: metrics + served log
def _done(ctx: Ctx, call: Call, response: dict, answered_by: str, reason: str | None, extra: dict) -> None:
    seconds = time.perf_counter() - call.t0
    ctx.metrics.requests.labels(call.task or "llm", answered_by).inc()
    ctx.metrics.latency.labels(answered_by).observe(seconds)
    if call.confidence is not None:
        extra = extra | {"slmtune_confidence": round(call.confidence, 6)}
    ctx.served.write(log_line(call.id, call.body, response, seconds, task=call.task, answered_by=answered_by,
                              reason=reason, extra=extra))


def _fail(ctx: Ctx, call: Call, status: int, body: dict, headers: dict, reason: str | None):
    from fastapi.responses import JSONResponse

    seconds = time.perf_counter() - call.t0
    ctx.metrics.requests.labels(call.task or "llm", "error").inc()
    extra = {"slmtune_status": status} | ({"slmtune_confidence": round(call.confidence, 6)}
                                           if call.confidence is not None else {})
    line = log_line(call.id, call.body, body, seconds, task=call.task, answered_by="llm", reason=reason, extra=extra)
    ctx.served.write(line, errors=True)
    return JSONResponse(body, status_code=status, headers=headers)


# ----------------------------------------------------------------------------- running
def run(config: ServeConfig) -> None:
    """Serve until interrupted."""
    app = create_app(config)
    import uvicorn

    if config.host not in LOOPBACK and not config.api_key_env:
        log.warning("serving on %s without --api-key-env (--insecure): anyone who can reach it can use it",
                    config.host)
    uvicorn.run(app, host=config.host, port=config.port, log_level="info", limit_concurrency=config.max_concurrency)
