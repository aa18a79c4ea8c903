"""The served-call log: every call `slmtune serve` answered, as one line of `<folder>/<UTC date>.jsonl` in the
OpenAI request/response log format `slmtune ingest` reads —

    {"id", "timestamp", "request", "response", "latency_ms",
     "metadata": {<the request's own metadata>, "slmtune_route", "slmtune_task", "slmtune_answered_by": "slm" | "llm",
                  "slmtune_fallback", "slmtune_model", "slmtune_batch_size"}}

— which ingest carries into the record's `meta.metadata`, where `slmtune curate` finds the calls the small
models answered and drops them (a model is not trained on its own outputs). Calls that ended in an error go to
`<date>.errors.log` (a suffix ingest skips), with `slmtune_status`.

A file rolls over before a line would take it past `max_bytes`: `<date>.jsonl`, then `<date>.1.jsonl`,
`<date>.2.jsonl`, ... (errors: `<date>.errors.log`, `<date>.1.errors.log`, ...). A line is never split; one
longer than `max_bytes` gets a file of its own. A restarted server appends to the day's last file.
`log_files(folder)` lists them in write order, date then index (a plain name sort puts `.1.jsonl` before
`.jsonl`, and `.10.` before `.2.`).

One writer thread writes the lines, each once, scrubbed first (unless `scrub` is off) by the same backend
`slmtune curate --scrubber` uses, loaded once: message `name`s, the answer, the request's `user` and
`metadata` and slmtune's tags share one placeholder table. `write` never blocks the server's event loop: the
queue holds `max_queue` lines; past that a line is dropped, counted in `dropped`, and warned about at most once
a minute.
"""

from __future__ import annotations

import json
import logging
import re
import threading
from collections import Counter
from pathlib import Path
from typing import Any

from slmtune.errors import SlmtuneError

log = logging.getLogger("slmtune.serve")

SCRUBBERS = ("regex", "presidio")
WARN_EVERY_S = 60.0
_FILE = re.compile(r"(\d{4}-\d{2}-\d{2})(?:\.(\d+))?(\.jsonl|\.errors\.log)")
_DAY = re.compile(r"\d{4}-\d{2}-\d{2}")


def log_line(call_id: str, request: dict, response: dict, seconds: float, *, task: str | None, answered_by: str,
             reason: str | None, extra: dict) -> dict:
    """One served-log line: the request's own `metadata` tags with slmtune's over them (`extra` last)."""
    from slmtune.io import now

    theirs = request.get("metadata") if isinstance(request.get("metadata"), dict) else {}
    meta = theirs | {"slmtune_route": task if answered_by == "slm" else "llm", "slmtune_task": task,
                     "slmtune_answered_by": answered_by, "slmtune_fallback": reason} | extra
    return {"id": call_id, "timestamp": now(), "request": request, "response": response,
            "latency_ms": round(seconds * 1000, 1), "metadata": meta}


class ServedLog:
    """One writer thread appending served calls to `<folder>/<UTC date>[.<n>].jsonl` (errors: `.errors.log`)."""

    def __init__(self, folder: Path, scrub: bool, scrubber: str = "regex", *, max_queue: int = 10_000,
                 max_bytes: int = 64 << 20):
        import queue

        _check(scrub, scrubber, max_queue, max_bytes)
        self.folder, self.scrub, self.scrubber, self.max_bytes = Path(folder), scrub, scrubber, max_bytes
        self.folder.mkdir(parents=True, exist_ok=True)
        self.dropped = 0  # lines not written since start: the queue was full, or the scrubber did not load
        self.queue: queue.Queue = queue.Queue(maxsize=max_queue)
        self._lock = threading.Lock()
        self._warned_at = float("-inf")
        self._index: dict[tuple[str, str], int] = {}  # (day, suffix) -> the file index being written
        self._broken: str | None = None
        self.thread = threading.Thread(target=self._run, name="slmtune-served-log", daemon=True)
        self.thread.start()

    def write(self, line: dict, errors: bool = False) -> None:
        """Queue `line` for the writer; when the queue is full, drop it (counted in `dropped`), never wait."""
        import queue

        try:
            self.queue.put_nowait((line, errors))
        except queue.Full:
            self._drop(f"the queue is full ({self.queue.maxsize} lines)")

    def flush(self) -> None:
        self.queue.join()

    def close(self) -> None:
        import queue

        try:
            self.queue.put(None, timeout=60)
        except queue.Full:
            log.warning("served log: the writer did not drain its queue in 60 s; closing without it")
            return
        self.thread.join(timeout=60)

    def _drop(self, why: str) -> None:
        import time

        with self._lock:
            self.dropped += 1
            now = time.monotonic()
            warn = now - self._warned_at >= WARN_EVERY_S
            if warn:
                self._warned_at = now
        if warn:
            log.warning("served log: a line was dropped, %s; %d dropped since start", why, self.dropped)

    def _run(self) -> None:
        self._load()
        while True:
            item = self.queue.get()
            try:
                if item is None:
                    return
                self._write_one(*item)
            except Exception:  # noqa: BLE001 - a line that can't be written must not stop the writer
                log.exception("could not write a served-log line")
            finally:
                self.queue.task_done()

    def _load(self) -> None:
        """Load the scrubber here, once, not in the event loop (presidio takes seconds)."""
        if not self.scrub:
            return
        try:
            _backend(self.scrubber)
        except Exception as e:  # noqa: BLE001 - reported in the server log and in `dropped`
            # Writing unscrubbed, or regex-only when presidio was asked for, would leak what it should catch.
            self._broken = f"the {self.scrubber} scrubber did not load ({e})"
            log.exception("served log: %s; served calls will not be logged", self._broken)

    def _write_one(self, line: dict, errors: bool) -> None:
        from slmtune.io import dumps

        if self._broken:
            self._drop(self._broken)
            return
        line = scrub_line(line, self.scrubber) if self.scrub else line
        text = dumps(line)
        try:
            data = (text + "\n").encode()
        except UnicodeEncodeError:  # a lone surrogate (an upstream's \ud800 escape): kept as the escape it was
            data = (json.dumps(line, separators=(",", ":")) + "\n").encode()
        self._append(_day(line), ".errors.log" if errors else ".jsonl", data)

    def _append(self, day: str, suffix: str, data: bytes) -> None:
        index = self._index.get((day, suffix))
        if index is None:
            index = _last_index(self.folder, day, suffix)
        path = log_path(self.folder, day, suffix, index)
        size = _size(path)
        while size and size + len(data) > self.max_bytes:
            index += 1
            path = log_path(self.folder, day, suffix, index)
            size = _size(path)
        self._index[(day, suffix)] = index
        with open(path, "ab") as f:
            f.write(data)


def _check(scrub: bool, scrubber: str, max_queue: int, max_bytes: int) -> None:
    import importlib.util

    problems = []
    if scrubber not in SCRUBBERS:
        problems.append(f"the served-log scrubber must be one of {', '.join(SCRUBBERS)}, got {scrubber!r}")
    if max_queue < 1:
        problems.append(f"the served-log max_queue must be >= 1, got {max_queue}")
    if max_bytes < 1:
        problems.append(f"the served-log max_bytes must be >= 1, got {max_bytes}")
    if problems:
        raise SlmtuneError("; ".join(problems) + ".")
    if scrub and scrubber == "presidio" and importlib.util.find_spec("presidio_analyzer") is None:
        raise SlmtuneError("the presidio scrubber needs presidio-analyzer.",
                           "`pip install 'slmtune[presidio]'`, or use the regex scrubber.")


def log_path(folder: Path, day: str, suffix: str = ".jsonl", index: int = 0) -> Path:
    """`<folder>/<day>.jsonl` for index 0, `<folder>/<day>.<index>.jsonl` after it (same for `.errors.log`)."""
    return Path(folder) / f"{day}{f'.{index}' if index else ''}{suffix}"


def log_files(folder: Path, errors: bool = False) -> list[Path]:
    """The served-log files in `folder` (error logs with `errors`), in write order: by date, then index."""
    want = ".errors.log" if errors else ".jsonl"
    found = [(m[1], int(m[2] or 0), p) for p in Path(folder).iterdir()
             if (m := _FILE.fullmatch(p.name)) and m[3] == want]
    return [p for _, _, p in sorted(found)]


def _last_index(folder: Path, day: str, suffix: str) -> int:
    return max((int(m[2] or 0) for p in folder.iterdir()
                if (m := _FILE.fullmatch(p.name)) and m[1] == day and m[3] == suffix), default=0)


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def _day(line: dict) -> str:
    """The line's UTC date; today's if its timestamp has none (a file name is never built from other text)."""
    import time

    day = str(line.get("timestamp") or "")[:10]
    return day if _DAY.fullmatch(day) else time.strftime("%Y-%m-%d", time.gmtime())


# ----------------------------------------------------------------------------- scrubbing
_BACKENDS: dict[str, Any] = {}
_BACKENDS_LOCK = threading.Lock()


def _backend(scrubber: str) -> Any:
    """curate's scrub backend `scrubber` (None for regex alone), loaded once per process."""
    if scrubber in _BACKENDS:
        return _BACKENDS[scrubber]
    from slmtune.data.backends import get_backend

    with _BACKENDS_LOCK:
        if scrubber not in _BACKENDS:
            if scrubber == "presidio":
                _import_installed("torch", "transformers")
            _BACKENDS[scrubber] = get_backend(scrubber)
    return _BACKENDS[scrubber]


def _import_installed(*modules: str) -> None:
    """Import `modules` where installed. The presidio loader hides torch and transformers while presidio imports
    (a curate speed-up, `backends._hidden`); in the server the engine thread may import them in that window and
    fail, transformers then believing torch absent. The engine imports both anyway, so import them first."""
    import importlib
    import importlib.util
    import sys

    for name in modules:
        if name not in sys.modules and importlib.util.find_spec(name) is not None:
            importlib.import_module(name)


def scrub_text(text: str, scrubber: str = "regex") -> str:
    """`text` (an upstream error body, say) with PII and secrets replaced by placeholders of its own."""
    from slmtune.data.scrub import scrub_text as scrub_value

    return scrub_value(text, {}, Counter(), _backend(scrubber))


def scrub_line(line: dict, scrubber: str = "regex") -> dict:
    """A served-log line with PII and secrets replaced, placeholders shared by request, answer, names and tags."""
    from slmtune.data.scrub import scrub_record

    req = dict(line["request"])
    msgs = [m for m in req.get("messages") or [] if isinstance(m, dict)]
    resp = line.get("response") if isinstance(line.get("response"), dict) else {}
    choices = [c for c in resp.get("choices") or [] if isinstance(c, dict) and isinstance(c.get("message"), dict)]
    every = msgs + [c["message"] for c in choices]
    # Message names ride with the tags so they share the placeholders: a person's under its cue ("name: Ann
    # Lee"), a tool message's (a function name) under a key that is no cue, so no function is read as a person.
    tool = [m.get("role") in ("tool", "function") for m in every]
    tags = {"metadata": line.get("metadata"), "user": req.get("user"), "request_metadata": req.get("metadata"),
            "name": [None if t else m.get("name") for m, t in zip(every, tool, strict=True)],
            "functions": [m.get("name") if t else None for m, t in zip(every, tool, strict=True)]}
    clean, _ = scrub_record({"messages": [_plain(m) for m in every], "meta": tags}, _backend(scrubber))
    names = [f if t else n for n, f, t in zip(clean["meta"]["name"], clean["meta"]["functions"], tool, strict=True)]
    scrubbed = [m | {"name": n} if "name" in m else m for m, n in zip(clean["messages"], names, strict=True)]
    req["messages"] = scrubbed[:len(msgs)]
    for key, tag in (("user", "user"), ("metadata", "request_metadata")):
        if req.get(key) is not None:
            req[key] = clean["meta"][tag]
    answers = iter(scrubbed[len(msgs):])
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
