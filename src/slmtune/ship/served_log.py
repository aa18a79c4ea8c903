"""The served-call log: every call `slmtune serve` answered, as one line of `<folder>/<UTC date>.jsonl` in the
OpenAI request/response log format `slmtune ingest` reads —

    {"id", "timestamp", "request", "response", "latency_ms",
     "metadata": {<the request's own metadata>, "slmtune_route", "slmtune_task", "slmtune_answered_by": "slm" | "llm",
                  "slmtune_fallback", "slmtune_model", "slmtune_batch_size"}}

— which ingest carries into the record's `meta.metadata`, where `slmtune curate` finds the calls the small
models answered and drops them (a model is not trained on its own outputs). Calls that ended in an error go to
`<date>.errors.log` (a suffix ingest skips), with `slmtune_status`. One writer thread writes the lines, each
once, scrubbed by `slmtune.data.scrub` first (unless `scrub` is off).
"""

from __future__ import annotations

import logging
from pathlib import Path

log = logging.getLogger("slmtune.serve")


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

