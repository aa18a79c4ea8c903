"""The OpenAI chat-completions wire format as `slmtune serve` speaks it: error bodies (its own and the
upstream's), the chat.completion of an export's answer, that answer as server-sent events, and the reverse —
an upstream's event stream added up into the chat.completion it amounts to (for the served log)."""

from __future__ import annotations

import json
import time
import uuid
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from slmtune.ship.engine import Checkpoint, Completion


class HttpError(Exception):
    """A request that ends in an OpenAI-style error body."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", code: str | None = None,
                 headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.code, self.headers = status, message, type_, code, headers or {}


def error_body(message: str, type_: str = "invalid_request_error", code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type_, "param": None, "code": code}}



def route_headers(task: str | None, answered_by: str, reason: str | None) -> dict:
    """The x-slmtune-route / -task / -fallback headers of a response (see `slmtune.ship.serve`)."""
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

