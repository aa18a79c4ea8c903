"""The OpenAI chat-completions wire format as `slmtune serve` speaks it: error bodies (its own and the
upstream's), the chat.completion of an export's answer, that answer as server-sent events, and the reverse —
an upstream's event stream added up into the chat.completion it amounts to (for the served log)."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from slmtune.serve.jobs import Checkpoint, Completion


class HttpError(Exception):
    """A request that ends in an OpenAI-style error body."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", code: str | None = None,
                 headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.code, self.headers = status, message, type_, code, headers or {}


def error_body(message: str, type_: str = "invalid_request_error", code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type_, "param": None, "code": code}}



def route_headers(task: str | None, answered_by: str, reason: str | None) -> dict:
    """The x-slmtune-route / -task / -fallback headers of a response (see `slmtune.serve.server`)."""
    h = {"x-slmtune-route": task if answered_by == "slm" and task else "llm"}
    if task:
        h["x-slmtune-task"] = task
    if reason:
        h["x-slmtune-fallback"] = reason
    return h


def completion_json(ck: Checkpoint, msg: dict, comp: Completion) -> dict:
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



def upstream_error(status: int, data: bytes, scrub: Callable[[str], str] = lambda t: t) -> tuple[int, dict]:
    """(status, body) for the client from an upstream error: the upstream's own status and OpenAI error body
    (its message scrubbed: an upstream may quote a key's last characters), or one that quotes what it sent.
    A 401/403 is slmtune's key being refused, not the client's doing: a generic 502 that quotes nothing."""
    if status in (401, 403):
        return 502, error_body("the upstream LLM refused slmtune's credentials (--upstream-key-env).",
                               "upstream_error", "upstream_auth")
    try:
        body = json.loads(data)
    except (ValueError, RecursionError):
        body = None
    err = body.get("error") if isinstance(body, dict) else None
    if isinstance(err, dict):
        message = scrub(str(err.get("message") or "")[:1000])
        code, type_ = err.get("code"), err.get("type")
        return status, error_body(message, type_ if isinstance(type_, str) else "upstream_error",
                                  code if isinstance(code, str) else f"upstream_{status}")
    text = scrub(data.decode("utf-8", "replace").strip()[:300])
    return status, error_body(f"the upstream LLM returned HTTP {status}: {text or '(empty body)'}",
                              "upstream_error", f"upstream_{status}")



class StreamAssembler:
    """chat.completion.chunk events → the chat.completion they add up to (content, tool calls, usage)."""

    def __init__(self) -> None:
        self.buf, self.head, self.content, self.calls = b"", {}, [], {}
        self.finish, self.usage, self.seen, self.done = None, None, False, False

    def feed(self, data: bytes) -> None:
        self.buf += data
        *lines, self.buf = self.buf.split(b"\n")
        for line in lines:
            line = line.strip()
            if line.startswith(b"data:") and line[5:].strip() == b"[DONE]":
                self.done = True
            elif line.startswith(b"data:"):
                try:
                    chunk = json.loads(line[5:])
                except (ValueError, RecursionError):
                    continue
                if isinstance(chunk, dict):
                    self._chunk(chunk)

    def _chunk(self, c: dict) -> None:
        # An upstream's stream is untrusted too: a field of the wrong type is skipped, never a crash mid-relay.
        self.seen = True
        self.head = self.head or {k: c.get(k) for k in ("id", "created", "model", "system_fingerprint")}
        self.usage = c.get("usage") if isinstance(c.get("usage"), dict) else self.usage
        for ch in _dicts(c.get("choices")):
            d = ch.get("delta") if isinstance(ch.get("delta"), dict) else {}
            if isinstance(d.get("content"), str):
                self.content.append(d["content"])
            for tc in _dicts(d.get("tool_calls")):
                index = tc.get("index", 0) if isinstance(tc.get("index", 0), int) else 0
                slot = self.calls.setdefault(index, {"id": "", "type": "function",
                                                     "function": {"name": "", "arguments": ""}})
                slot["id"] = tc.get("id") if isinstance(tc.get("id"), str) and tc.get("id") else slot["id"]
                fn = tc.get("function") if isinstance(tc.get("function"), dict) else {}
                for key in ("name", "arguments"):
                    slot["function"][key] += fn.get(key) if isinstance(fn.get(key), str) else ""
            finish = ch.get("finish_reason")
            self.finish = finish if isinstance(finish, str) and finish else self.finish

    def complete(self) -> bool:
        """Whether the stream reached its end: `[DONE]` or a finish_reason."""
        return self.done or self.finish is not None

    def completion(self) -> dict | None:
        if not self.seen:
            return None
        msg: dict = {"role": "assistant", "content": "".join(self.content) or None}
        if self.calls:
            msg["tool_calls"] = [self.calls[i] for i in sorted(self.calls)]
        out = self.head | {"object": "chat.completion",
                           "choices": [{"index": 0, "message": msg, "finish_reason": self.finish}]}
        return out | ({"usage": self.usage} if self.usage else {})


def _dicts(value: Any) -> Iterable[dict]:
    return [v for v in value if isinstance(v, dict)] if isinstance(value, list) else []
