"""A STAND-IN for the upstream LLM, for demos and tests — not a language model.

An OpenAI-compatible server (FastAPI) that answers `POST /v1/chat/completions` from logged teacher responses:
the logs given (any format `slmtune ingest` reads, or canonical records) are indexed by their prompt
messages and tools, so a request whose prompt was logged gets the logged answer (content or tool calls),
and any other prompt gets the fixed text `UNKNOWN_ANSWER`. Every answer's `model` is `stand-in/<logged
model>` so nobody mistakes it for a real LLM. `stream: true` is answered as server-sent events.

For tests it can fail on purpose: `error_status` (or `POST /standin/error {"status": 429}`; `null` clears
it) makes every chat request get that status with an OpenAI error body (`"message"` sets its text). `POST
/standin/error {"fault": F}` misbehaves instead: `break_stream` (a streamed answer breaks off mid-way: the
connection drops), `cut_stream` (it ends cleanly but early: no finish_reason, no `[DONE]`), `not_json` (200 with
an HTML body); `{"fault": null}` clears it. `app.state.requests` keeps the bodies it received, so a test can
check what the server under test forwarded.

    python -m slmtune.synthetic.upstream LOGS... --port 8100      # then: slmtune serve W --upstream http://127.0.0.1:8100/v1
"""

# No `from __future__ import annotations`: FastAPI reads the endpoints' annotations (`Request`, imported
# inside the function that builds the app) when they are defined.
import hashlib
import json
import tempfile
import time
import uuid
from collections import deque
from collections.abc import Sequence
from pathlib import Path

UNKNOWN_ANSWER = "(stand-in upstream) No logged answer for this prompt."
STANDIN_MODEL = "stand-in/teacher"


def prompt_key(messages: list[dict], tools: list | None) -> str:
    """A hash of what decides the answer: each message's role, text and tool calls, and the tool names."""
    def call(c: dict) -> list:
        fn = c.get("function") or {}
        try:
            args = json.loads(fn.get("arguments") or "{}")
        except (TypeError, ValueError):
            args = fn.get("arguments")
        return [fn.get("name"), json.dumps(args, sort_keys=True)]

    rows = [[m.get("role"), m.get("content") or "", [call(c) for c in m.get("tool_calls") or []]] for m in messages]
    names = sorted((t.get("function") or {}).get("name") or "" for t in tools or [])
    return hashlib.sha256(json.dumps([rows, names], ensure_ascii=False).encode()).hexdigest()


def index_logs(paths: Sequence[str | Path]) -> dict[str, dict]:
    """{prompt_key: {"message", "model"}} of every logged call under `paths` (read by `slmtune ingest`)."""
    from slmtune.data.ingest import ingest
    from slmtune.io import iter_jsonl

    index: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as d:
        out = Path(d) / "records.jsonl"
        ingest(paths, out)
        for _, rec in iter_jsonl(out):
            *prompt, target = rec["messages"]
            answer = {k: v for k, v in target.items() if k in ("role", "content", "tool_calls")}
            index.setdefault(prompt_key(prompt, rec.get("tools")), {"message": answer,
                                                                    "model": (rec.get("meta") or {}).get("model")})
    return index


def request_key(body: dict) -> str:
    """The prompt key of a chat request, its messages normalized exactly as ingest normalizes logs."""
    from slmtune.data.ingest import to_record

    log = {"request": body, "response": {"choices": [{"message": {"role": "assistant", "content": "-"}}]}}
    rec, _ = to_record(log)
    return prompt_key(rec["messages"][:-1], rec.get("tools"))


def answer(body: dict, index: dict[str, dict]) -> dict:
    """The chat.completion the stand-in gives for `body`."""
    try:
        hit = index.get(request_key(body))
    except Exception:  # noqa: BLE001 - a request ingest can't read is just an unknown prompt here
        hit = None
    msg = dict(hit["message"]) if hit else {"role": "assistant", "content": UNKNOWN_ANSWER}
    model = f"stand-in/{hit['model']}" if hit and hit.get("model") else STANDIN_MODEL
    n_in = sum(len(str(m.get("content") or "")) for m in body.get("messages") or []) // 4
    n_out = len(json.dumps(msg)) // 4
    return {"id": f"chatcmpl-standin-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()),
            "model": model, "choices": [{"index": 0, "message": msg, "logprobs": None,
                                         "finish_reason": "tool_calls" if msg.get("tool_calls") else "stop"}],
            "usage": {"prompt_tokens": n_in, "completion_tokens": n_out, "total_tokens": n_in + n_out}}


def stream_events(resp: dict) -> list[str]:
    """The answer as chat.completion.chunk events, the text in pieces of 8 characters."""
    head = {k: resp[k] for k in ("id", "created", "model")} | {"object": "chat.completion.chunk"}
    msg = resp["choices"][0]["message"]
    text = msg.get("content") or ""
    deltas = [{"role": "assistant", "content": ""}, *({"content": text[i:i + 8]} for i in range(0, len(text), 8))]
    for i, c in enumerate(msg.get("tool_calls") or []):
        args = c["function"]["arguments"]
        deltas.append({"tool_calls": [{"index": i, "id": c.get("id"), "type": "function",
                                       "function": {"name": c["function"]["name"], "arguments": args[:5]}}]})
        deltas.append({"tool_calls": [{"index": i, "function": {"arguments": args[5:]}}]})
    chunks = [head | {"choices": [{"index": 0, "delta": d, "finish_reason": None}]} for d in deltas]
    chunks.append(head | {"choices": [{"index": 0, "delta": {}, "finish_reason": resp["choices"][0]["finish_reason"]}]})
    return [f"data: {json.dumps(c)}\n\n" for c in chunks] + ["data: [DONE]\n\n"]


def create_upstream_app(paths: Sequence[str | Path] = (), error_status: int | None = None):
    """The stand-in's FastAPI app, answering from the logs under `paths`."""
    from fastapi import FastAPI, Request
    from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse

    index = index_logs(paths) if paths else {}
    app = FastAPI(title="slmtune stand-in upstream (answers from logs; not an LLM)", docs_url=None, redoc_url=None)
    app.state.error_status, app.state.error_message, app.state.fault = error_status, None, None
    app.state.requests = deque(maxlen=1000)

    def error(status: int, message: str) -> JSONResponse:
        return JSONResponse({"error": {"message": message, "type": "standin_error", "param": None,
                                       "code": f"standin_{status}"}}, status_code=status)

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        try:
            body = await request.json()
        except ValueError:
            return error(400, "the body is not JSON")
        app.state.requests.append(body)
        if app.state.error_status:
            return error(app.state.error_status, app.state.error_message
                         or f"stand-in upstream told to fail with {app.state.error_status}")
        if app.state.fault == "not_json":
            return HTMLResponse("<html><body>502 Bad Gateway (a proxy's page)</body></html>")
        resp = answer(body, index)
        if body.get("stream"):
            return StreamingResponse(_faulty(stream_events(resp), app.state.fault), media_type="text/event-stream")
        return resp

    @app.post("/standin/error")
    async def set_error(request: Request):
        told = await request.json()
        if "status" in told:
            app.state.error_status, app.state.error_message = told["status"], told.get("message")
        if "fault" in told:
            app.state.fault = told["fault"]
        return {"error_status": app.state.error_status, "fault": app.state.fault}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": STANDIN_MODEL, "object": "model", "owned_by": "slmtune-standin"}]}

    return app


async def _faulty(events: list[str], fault: str | None):
    """The events, whole or (a fault) only the first half: cut cleanly, or broken off by an error mid-stream."""
    import asyncio

    cut = len(events) // 2 if fault in ("break_stream", "cut_stream") else len(events)
    for e in events[:cut]:
        yield e
        await asyncio.sleep(0)  # each event its own chunk on the wire, as a real stream sends them
    if fault == "break_stream":
        raise ConnectionResetError("stand-in upstream: the stream breaks off here (told to)")


def main() -> None:  # pragma: no cover - a demo entry point
    import argparse

    import uvicorn

    ap = argparse.ArgumentParser(description="Stand-in upstream LLM answering from logged teacher responses.")
    ap.add_argument("logs", nargs="*", help="log files or folders (any format slmtune ingest reads)")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8100)
    ap.add_argument("--error-status", type=int, default=None, help="answer every request with this HTTP status")
    args = ap.parse_args()
    uvicorn.run(create_upstream_app(args.logs, args.error_status), host=args.host, port=args.port)


if __name__ == "__main__":  # pragma: no cover
    main()
