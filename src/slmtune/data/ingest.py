"""`slmtune ingest`: agent LLM logs in, canonical records out (see `records.py` for the record shape).

Inputs are files, directories (searched recursively) or globs of `.jsonl`, `.jsonl.gz`, `.json` (an array
of logs, or one log) and `.parquet`. JSONL and parquet are streamed, so memory stays flat as input grows.
Each line's format is detected on its own (or forced with `fmt`):

- `openai`    — `{"request": {model, messages, tools?}, "response": {id, choices: [{message, finish_reason}],
                 usage?}, ...}`, as proxies and gateways log chat-completions calls;
- `messages`  — `{"messages": [...], "tools"?: [...]}`, the OpenAI / TRL fine-tuning format;
- `anthropic` — `{"request": {system?, messages, tools? (input_schema)}, "response": {content: [text |
                 tool_use blocks], stop_reason}}`; tool_use / tool_result blocks become OpenAI-style
                 `tool_calls` / `role: tool` messages.

Record `meta` keys: `source` (file as given), `line`, `format`, and when the log has them `model`,
`timestamp`, `usage` (always `{prompt_tokens, completion_tokens, total_tokens}`, Anthropic's input/output
tokens included), `latency_ms`, `finish_reason` (OpenAI vocabulary: stop, tool_calls, length, ...)
and the log's tags (`metadata`, `tags`, `agent`, `workload`, `user`, `session_id`), and `log_id`: the envelope's
own top-level `id` (a gateway's request id) where an OpenAI or Anthropic log line has one. `id` is the log's
own id (response id, else top-level `id`), else `h_` + a content hash of messages and tools.

Rejected lines go to `<out>.rejected.jsonl` (or `rejected`), one per line:
`{"file", "line", "reason", "detail", "excerpt"}` where `line` is 1-based (the item index for `.json`
arrays and parquet rows) and `reason` is one of REASONS. Every input line is either written or rejected:
`lines_in == kept + rejected`.
"""

from __future__ import annotations

import glob
import hashlib
import json
import re
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from slmtune.errors import SlmtuneError
from slmtune.io import atomic_open, dumps, open_text
from slmtune.records import record_problems

FORMATS = ("openai", "messages", "anthropic")
SUFFIXES = (".jsonl", ".jsonl.gz", ".json", ".parquet")
REASONS = ("blank_line", "invalid_json", "not_an_object", "unknown_shape", "no_completion", "bad_record")
TAG_KEYS = ("metadata", "tags", "agent", "workload", "user", "session_id")
STOP_REASONS = {"end_turn": "stop", "stop_sequence": "stop", "tool_use": "tool_calls", "max_tokens": "length",
                "pause_turn": "pause", "refusal": "content_filter"}


class Rejected(Exception):
    """One input line that cannot become a record: `reason` is one of REASONS."""

    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason, self.detail = reason, detail


@dataclass
class IngestSummary:
    out: Path
    rejected_path: Path
    lines_in: int = 0
    kept: int = 0
    rejected: int = 0
    by_format: Counter = field(default_factory=Counter)
    by_reason: Counter = field(default_factory=Counter)


def ingest(paths: Sequence[str | Path], out: str | Path, fmt: str = "auto", rejected: str | Path | None = None,
           progress: Callable[[int], None] | None = None) -> IngestSummary:
    """Convert every log line under `paths` into a record in `out`; reject the rest with a reason."""
    if fmt != "auto" and fmt not in FORMATS:
        raise SlmtuneError(f"--format must be auto or one of {', '.join(FORMATS)}, got {fmt!r}.")
    out = Path(out)
    summary = IngestSummary(out, Path(rejected) if rejected else default_rejected_path(out))
    # Our own outputs may sit in an input directory: reading them back would change the next run's output.
    ours = {out.resolve(), summary.rejected_path.resolve()}
    files = [f for f in expand_inputs(paths) if f.resolve() not in ours]
    with atomic_open(out) as f_out, atomic_open(summary.rejected_path) as f_rej:
        for path in files:
            for lineno, raw in _iter_items(path):
                summary.lines_in += 1
                try:
                    rec, found = to_record(_decode(raw), fmt, str(path), lineno)
                except Rejected as r:
                    summary.rejected += 1
                    summary.by_reason[r.reason] += 1
                    f_rej.write(dumps({"file": str(path), "line": lineno, "reason": r.reason, "detail": r.detail,
                                       "excerpt": _excerpt(raw)}) + "\n")
                else:
                    summary.kept += 1
                    summary.by_format[found] += 1
                    f_out.write(dumps(rec) + "\n")
                if progress and summary.lines_in % 2000 == 0:
                    progress(summary.lines_in)
    return summary


def default_rejected_path(out: Path) -> Path:
    stem = out.name[: -len(".jsonl")] if out.name.endswith(".jsonl") else out.name
    return out.with_name(f"{stem}.rejected.jsonl")


# ----------------------------------------------------------------------------- inputs
def expand_inputs(paths: Sequence[str | Path]) -> list[Path]:
    """Files, directories and globs -> a sorted, de-duplicated list of supported files."""
    found: list[Path] = []
    for p in paths:
        s = str(p)
        if Path(s).is_dir():
            found += [f for f in sorted(Path(s).rglob("*"), key=_log_order)
                      if f.is_file() and f.name.endswith(SUFFIXES)]
        elif Path(s).is_file():
            found.append(Path(s))
        elif glob.has_magic(s):
            found += [Path(m) for m in sorted(glob.glob(s, recursive=True)) if Path(m).is_file()]
        else:
            raise SlmtuneError(f"{s}: no such file, directory or glob match.")
    files = list(dict.fromkeys(found))
    unsupported = [f for f in files if not f.name.endswith(SUFFIXES)]
    if unsupported:
        raise SlmtuneError(f"{unsupported[0]}: unsupported input type.", f"Use one of {', '.join(SUFFIXES)}.")
    if not files:
        raise SlmtuneError(f"no log files found in {', '.join(map(str, paths))}.",
                           f"Inputs must end in {', '.join(SUFFIXES)}.")
    return files


_ROTATED = re.compile(r"^(.*?)\.(\d+)(\.[a-z.]+)$")


def _log_order(path: Path) -> tuple[str, int]:
    """Sort key of a folder's files: by path, except that a served log rotated by size (`2026-12-05.jsonl`,
    `2026-12-05.1.jsonl`, ..., `2026-12-05.10.jsonl`) keeps the order it was written in."""
    m = _ROTATED.match(path.name)
    return (str(path.with_name(m.group(1) + m.group(3))), int(m.group(2))) if m else (str(path), 0)


def _iter_items(path: Path) -> Iterator[tuple[int, Any]]:
    """(1-based line, raw text line or Parsed object) for every item in a file."""
    if path.name.endswith(".parquet"):
        yield from _iter_parquet(path)
    elif path.name.endswith(".json"):
        yield from _iter_json(path)
    else:
        with open_text(path) as f:
            try:
                yield from enumerate(f, start=1)
            except UnicodeDecodeError as e:
                raise SlmtuneError(f"{path}: not UTF-8 text ({e.reason}).") from None
            except (EOFError, OSError) as e:  # a truncated or corrupt .gz
                raise SlmtuneError(f"{path}: cannot read ({e}).") from None


def _iter_json(path: Path) -> Iterator[tuple[int, Any]]:
    # A .json file is one document: it is loaded whole (use JSONL for large inputs).
    with open_text(path) as f:
        text = f.read()
    try:
        doc = json.loads(text)
    except json.JSONDecodeError:
        yield 1, text
        return
    for n, obj in enumerate(doc if isinstance(doc, list) else [doc], start=1):
        yield n, Parsed(obj)


def _iter_parquet(path: Path) -> Iterator[tuple[int, Any]]:
    import pyarrow.parquet as pq  # lazy: only parquet inputs pay for pyarrow

    try:
        pf = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises several unrelated types for a corrupt file
        raise SlmtuneError(f"{path}: not a readable parquet file ({e}).") from None
    n = 0
    for batch in pf.iter_batches(batch_size=1024):
        for row in batch.to_pylist():
            n += 1
            # Parquet logs often hold nested objects as JSON strings; decode those columns back.
            yield n, Parsed({k: _maybe_json(v) for k, v in row.items() if v is not None})


def _maybe_json(v: Any) -> Any:
    if isinstance(v, str) and v[:1] in "{[":
        try:
            return json.loads(v)
        except json.JSONDecodeError:
            return v
    return v


@dataclass(frozen=True)
class Parsed:
    """An item that arrived already decoded (a .json array element, a parquet row), unlike a text line."""

    value: Any


def _decode(raw: str | Parsed) -> Any:
    if isinstance(raw, Parsed):
        return raw.value
    if not raw.strip():
        raise Rejected("blank_line", "blank line")
    try:
        return json.loads(raw)
    except json.JSONDecodeError as e:
        raise Rejected("invalid_json", f"not valid JSON: {e.msg} at column {e.colno}") from None


def _excerpt(raw: str | Parsed) -> str:
    text = raw if isinstance(raw, str) else json.dumps(raw.value, ensure_ascii=False, default=str)
    return text.strip()[:200]


# ----------------------------------------------------------------------------- detection and conversion
def detect_format(obj: dict) -> str | None:
    if isinstance(obj.get("messages"), list) and "request" not in obj:
        return "messages"
    req, resp = obj.get("request"), obj.get("response")
    if not isinstance(req, dict) or not isinstance(req.get("messages"), list):
        return None
    resp = resp if isinstance(resp, dict) else {}
    if "choices" in resp:
        return "openai"
    if "content" in resp or "stop_reason" in resp or resp.get("type") in ("message", "error") or "system" in req:
        return "anthropic"
    if any(isinstance(t, dict) and "input_schema" in t for t in req.get("tools") or []):
        return "anthropic"
    return "openai"


def to_record(obj: Any, fmt: str = "auto", source: str = "", line: int = 0) -> tuple[dict, str]:
    """(canonical record, detected format) for one decoded log line; raises Rejected."""
    if not isinstance(obj, dict):
        raise Rejected("not_an_object", f"a log line must be a JSON object, got {type(obj).__name__}")
    found = detect_format(obj)
    if found is None or (fmt != "auto" and found != fmt):
        want = "a known log format" if fmt == "auto" else f"an {fmt} log"
        raise Rejected("unknown_shape", f"not {want} (top-level keys: {', '.join(sorted(obj)[:8])})")
    messages, tools, meta = {"openai": _from_openai, "messages": _from_messages,
                             "anthropic": _from_anthropic}[found](obj)
    if not any(m.get("role") == "assistant" for m in messages):
        raise Rejected("no_completion", meta.pop("_why", "no assistant message"))
    meta.pop("_why", None)
    rec: dict = {"id": None, "messages": messages}
    if tools:
        rec["tools"] = tools
    problems = record_problems(rec | {"id": ""})
    if problems:
        raise Rejected("bad_record", "; ".join(problems[:3]))
    rec["id"] = meta.pop("_id", None) or content_id(messages, tools)
    rec["meta"] = {"source": source, "line": line, "format": found} | meta
    return rec, found


def content_id(messages: list[dict], tools: list[dict] | None) -> str:
    blob = json.dumps({"messages": messages, "tools": tools}, sort_keys=True, ensure_ascii=False)
    return "h_" + hashlib.sha256(blob.encode()).hexdigest()[:24]


def _meta(obj: dict, req: dict, resp: dict, **extra: Any) -> dict:
    meta: dict = {"model": resp.get("model") or req.get("model"), "timestamp": obj.get("timestamp"),
                  "usage": _usage(resp.get("usage") or obj.get("usage")), "latency_ms": obj.get("latency_ms")} | extra
    for key in TAG_KEYS:
        for holder in (obj, req):
            if holder.get(key) is not None and key not in meta:
                meta[key] = holder[key]
    meta["_id"] = resp.get("id") or obj.get("id")
    if isinstance(obj.get("id"), (str, int)) and not isinstance(obj.get("id"), bool):
        meta["log_id"] = obj["id"]  # the logger's own request id, to trace a record back to the gateway's log
    return {k: v for k, v in meta.items() if v is not None}


def _usage(usage: Any) -> dict | None:
    """Token counts in one shape for every format, so Arrow (datasets) sees one `meta.usage` type."""
    if not isinstance(usage, dict):
        return None
    prompt = usage.get("prompt_tokens", usage.get("input_tokens"))
    completion = usage.get("completion_tokens", usage.get("output_tokens"))
    if not isinstance(prompt, int) or not isinstance(completion, int):
        return None
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


# ----------------------------------------------------------------------------- OpenAI and messages
def _from_messages(obj: dict) -> tuple[list[dict], list | None, dict]:
    meta = {k: obj[k] for k in TAG_KEYS if obj.get(k) is not None}
    if isinstance(obj.get("id"), str):
        meta["_id"] = obj["id"]
    return [_oa_message(m) for m in obj["messages"]], _oa_tools(obj), meta


def _from_openai(obj: dict) -> tuple[list[dict], list | None, dict]:
    req = obj["request"]
    resp = obj.get("response") if isinstance(obj.get("response"), dict) else {}
    messages = [_oa_message(m) for m in req["messages"]]
    choices = resp.get("choices") or []
    choice = choices[0] if choices and isinstance(choices[0], dict) else {}
    meta = _meta(obj, req, resp, finish_reason=choice.get("finish_reason"))
    target = choice.get("message")
    if isinstance(target, dict) and (target.get("content") is not None or target.get("tool_calls")):
        messages.append(_oa_message({"role": "assistant"} | target))
    else:
        messages = [m for m in messages if m.get("role") != "assistant"]  # history is no target
        err = resp.get("error") or obj.get("error")
        meta["_why"] = f"response error: {str(err)[:120]}" if err else "response has no choices[0].message"
    return messages, _oa_tools(req), meta


def _oa_message(m: Any) -> Any:
    if not isinstance(m, dict):
        return m
    role = {"developer": "system", "function": "tool"}.get(m.get("role"), m.get("role"))
    out: dict = {"role": role, "content": _text(m.get("content"))}
    calls = m.get("tool_calls") or ([{"id": "call_0", "function": m["function_call"]}]
                                    if isinstance(m.get("function_call"), dict) else None)
    if calls:
        out["tool_calls"] = [_oa_call(c) for c in calls]
    if role == "tool":
        out["tool_call_id"] = m.get("tool_call_id") or m.get("name") or ""
    return out


def _oa_call(c: Any) -> Any:
    if not isinstance(c, dict) or not isinstance(c.get("function"), dict):
        return c
    args = c["function"].get("arguments")
    if not isinstance(args, str):  # some gateways log arguments already decoded
        args = json.dumps(args, ensure_ascii=False)
    return {"id": c.get("id") or "", "type": "function", "function": {"name": c["function"].get("name"),
                                                                      "arguments": args}}


def _text(content: Any) -> Any:
    """Content parts ([{"type": "text", "text": ...}, ...]) -> one string; other content kept as given."""
    if isinstance(content, list):
        texts = [p.get("text", "") for p in content if isinstance(p, dict) and isinstance(p.get("text"), str)]
        return "\n".join(texts)
    return content


def _oa_tools(holder: dict) -> list | None:
    tools = holder.get("tools") or [{"type": "function", "function": f} for f in holder.get("functions") or []]
    return tools or None


# ----------------------------------------------------------------------------- Anthropic
def _from_anthropic(obj: dict) -> tuple[list[dict], list | None, dict]:
    req = obj["request"]
    resp = obj.get("response") if isinstance(obj.get("response"), dict) else {}
    system = _text(req.get("system")) if req.get("system") else None
    messages = [{"role": "system", "content": system}] if system else []
    for m in req["messages"]:
        messages += _an_message(m)
    meta = _meta(obj, req, resp, finish_reason=STOP_REASONS.get(resp.get("stop_reason"), resp.get("stop_reason")))
    blocks = resp.get("content")
    if isinstance(blocks, list) and blocks and resp.get("type") != "error":
        messages += _an_message({"role": "assistant", "content": blocks})
    else:
        messages = [m for m in messages if m.get("role") != "assistant"]
        err = resp.get("error") or obj.get("error")
        meta["_why"] = f"response error: {str(err)[:120]}" if err else "response has no content blocks"
    tools = [_an_tool(t) for t in req.get("tools") or []]
    return messages, tools or None, meta


def _an_message(m: Any) -> list:
    if not isinstance(m, dict) or not isinstance(m.get("content"), list):
        return [m if not isinstance(m, dict) else {"role": m.get("role"), "content": m.get("content")}]
    blocks = [b for b in m["content"] if isinstance(b, dict)]
    text = "\n".join(b["text"] for b in blocks if b.get("type") == "text" and isinstance(b.get("text"), str))
    results = [{"role": "tool", "tool_call_id": b.get("tool_use_id", ""), "content": _text(b.get("content")) or ""}
               for b in blocks if b.get("type") == "tool_result"]
    calls = [{"id": b.get("id", ""), "type": "function",
              "function": {"name": b.get("name"), "arguments": json.dumps(b.get("input", {}), ensure_ascii=False)}}
             for b in blocks if b.get("type") == "tool_use"]
    out: dict = {"role": m.get("role"), "content": text or (None if calls else "")}
    if calls:
        out["tool_calls"] = calls
    # Tool results answer the previous assistant turn, so they come before any text the user added.
    return results + ([out] if text or calls or not results else [])


def _an_tool(t: Any) -> Any:
    if not isinstance(t, dict):
        return t
    fn = {"name": t.get("name"), "description": t.get("description", ""),
          "parameters": t.get("input_schema") or {"type": "object"}}
    return {"type": "function", "function": fn}
