"""HTTP plumbing around `slmtune serve`'s app: the gate every request but /healthz passes first (API key, body
size), and running an ASGI app with uvicorn in a background thread (tests, demos, benchmarks)."""

from __future__ import annotations

import hmac
import time
from dataclasses import dataclass
from typing import Any

from slmtune.errors import SlmtuneError
from slmtune.ship.wire import error_body


class Gate:
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
