"""HTTP plumbing around `slmtune serve`'s app: the gate every request passes first (Host, API key, content
type, body size), and running an ASGI app with uvicorn in a background thread (tests, demos, benchmarks)."""

from __future__ import annotations

import hmac
import time
from dataclasses import dataclass
from typing import Any

from slmtune.errors import SlmtuneError
from slmtune.serve.wire import error_body

LOOPBACK = ("127.0.0.1", "localhost", "::1")
_HOST_NAMES = frozenset({b"127.0.0.1", b"localhost", b"[::1]"})


class Gate:
    """ASGI middleware before any endpoint.

    * Host (every path, with `check_host`: loopback without a key): a web page the user visits can make their
      browser POST here, and after DNS rebinding read the answer; its requests carry the page's own host name,
      never a loopback one (400).
    * Every path but /healthz: the API key (401); a POST body must be `application/json` (415): a page can send
      `text/plain` without a CORS preflight, never `application/json`; the declared body size (413).
    """

    def __init__(self, app, api_key: str | None, max_body: int, check_host: bool = False):
        self.app, self.api_key, self.max_body, self.check_host = app, api_key, max_body, check_host

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            problem = self._problem(scope, dict(scope.get("headers") or []))
            if problem is not None:
                from starlette.responses import JSONResponse

                status, message, code = problem
                headers = {"www-authenticate": "Bearer"} if status == 401 else {}
                resp = JSONResponse(error_body(message, "invalid_request_error", code), status, headers=headers)
                return await resp(scope, receive, send)
        await self.app(scope, receive, send)

    def _problem(self, scope: dict, headers: dict) -> tuple[int, str, str] | None:
        if self.check_host and _host_name(headers.get(b"host", b"")) not in _HOST_NAMES:
            return 400, ("the Host header must name this machine's loopback address (a server without an API key "
                         "answers only loopback names)."), "invalid_host"
        if scope["path"] == "/healthz":
            return None
        if self.api_key is not None:
            given = headers.get(b"authorization", b"")
            if not hmac.compare_digest(given, f"Bearer {self.api_key}".encode()):
                return 401, "missing or wrong API key: send `Authorization: Bearer <key>`.", "invalid_api_key"
        if scope.get("method") == "POST":
            media = headers.get(b"content-type", b"").split(b";")[0].strip().lower()
            if media != b"application/json":
                return 415, "the request body must be JSON sent as `Content-Type: application/json`.", \
                    "unsupported_media_type"
        size = headers.get(b"content-length", b"0")
        if size.isdigit() and int(size) > self.max_body:
            return 413, f"the request body is {int(size)} bytes, over the {self.max_body}-byte limit.", "too_large"
        return None


def _host_name(host: bytes) -> bytes:
    """The name of a Host header without its port: `127.0.0.1:8000` -> `127.0.0.1`, `[::1]:80` -> `[::1]`."""
    host = host.strip().lower()
    if host.startswith(b"["):
        return host[:host.find(b"]") + 1]
    return host.rsplit(b":", 1)[0] if host.count(b":") == 1 else host


@dataclass
class Running:
    """A server started by `serve_in_thread`."""

    server: Any
    thread: Any
    url: str

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=60)


def serve_in_thread(app, host: str = "127.0.0.1", port: int = 0, wait_s: float = 60.0,
                    limit_concurrency: int | None = None) -> Running:
    """Run an ASGI app with uvicorn in a background thread (port 0: a free one); returns once it listens."""
    import socket
    import threading

    import uvicorn

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on",
                                           limit_concurrency=limit_concurrency))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="slmtune-uvicorn", daemon=True)
    thread.start()
    deadline = time.monotonic() + wait_s
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise SlmtuneError(f"the server on {host}:{sock.getsockname()[1]} did not start.")
        time.sleep(0.02)
    return Running(server, thread, f"http://{host}:{sock.getsockname()[1]}")
