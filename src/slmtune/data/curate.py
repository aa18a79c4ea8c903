"""`slmtune curate`: canonical records in, scrubbed, filtered, de-duplicated training records out.

Per record, in order: scrub PII and secrets (`scrub.py`; rejected records are scrubbed too), run the
filters, then — only for records that passed — drop exact and near duplicates, keeping the first seen.

Rejection reasons (a record may have several; `reason` is the first in this order):
`blank_line`, `invalid_json`, `invalid_record` (fails `records.record_problems`), `secret` (only with
on_secret="drop"), `slm_served` (a call `slmtune serve` answered with one of slmtune's own small models, i.e.
`meta.metadata.slmtune_answered_by` is "slm": a model is not trained on its own outputs; kept with
keep_slm_served),
`empty_completion`, `truncated` (finish_reason length), `errored` (finish_reason error/content_filter or
an `error` in meta), `unfinished` (an OpenAI or Anthropic request/response log whose response has no
finish_reason / stop_reason, as when an upstream stream broke off: the answer may be cut off; `messages`
records never carry one and are kept), `tool_args_not_json`, `unknown_tool` (not in the record's `tools`),
`tool_args_schema` (arguments violate the tool's JSON Schema), `too_long` (more than `max_chars` characters of
content and arguments), `duplicate` (same normalized messages and tools), `near_duplicate` (prompt MinHash-LSH
Jaccard >= `near_dup` with a kept record whose answer is also that similar; the prompt is every non-system message
before the target, the answer the target's content and calls: a near-identical prompt answered differently, like
the next step of an agent's conversation, is kept).

Rejected lines (`<out>.rejected.jsonl`): `{"file", "line", "reason", "reasons", "detail", "id", "record"}`
(`record` is the scrubbed record, absent for blank_line / invalid_json / invalid_record; `duplicate_of`
is added for exact duplicates, naming the kept record's id).

Report (`report.json`): `{"input", "output", "rejected_output", "records_in", "kept", "rejected",
"rejected_by_reason" (first reason; sums to `rejected`), "flagged_by_reason" (every reason a record had),
"duplicates_removed": {"exact", "near"}, "pii_placeholders" (per TYPE, over kept records),
"pii_placeholders_all" (per TYPE, over all records), "records_with_secrets", "settings"}`.
`records_in == kept + rejected` always; `records_in` counts every line of the input.

Scrubbing and filtering run in worker processes for large inputs (`workers`); dedupe and writing stay
in input order in the main process, so the output is byte-identical whatever the number of workers.
"""

from __future__ import annotations

import json
import os
import time
from collections import Counter, deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from slmtune.data.backends import get_backend
from slmtune.data.dedupe import Keyer, Seen
from slmtune.data.ingest import default_rejected_path
from slmtune.data.scrub import SECRET_TYPES, scrub_record
from slmtune.errors import SlmtuneError
from slmtune.io import atomic_open, dumps, open_text, write_json
from slmtune.records import record_problems, target_index
from slmtune.schema_check import SchemaProblem, tool_params, validation_error

REASONS = ("blank_line", "invalid_json", "invalid_record", "secret", "slm_served", "empty_completion", "truncated",
           "errored", "unfinished", "tool_args_not_json", "unknown_tool", "tool_args_schema", "too_long",
           "duplicate", "near_duplicate")
BATCH = 256
PARALLEL_MIN_BYTES = 8 << 20  # below ~8 MB (~4k records) starting worker processes costs more than it saves
# Log formats that record the response, finish_reason included (ingest's `meta.format`); `messages` has none.
RESPONSE_FORMATS = ("openai", "anthropic")


@dataclass(frozen=True)
class CurateConfig:
    on_secret: str = "redact"
    """redact: replace secrets with placeholders like all PII; drop: reject records that held one."""
    near_dup: float = 0.9
    """Similarity (Jaccard) of prompt and of answer at which a record is a near duplicate of a kept one; 0 = off."""
    max_chars: int = 32_000
    """Drop records longer than this, in characters of content + arguments (~8k tokens at ~4 chars/token)."""
    scrubber: str = "regex"
    """regex (built in) or presidio (adds names and street addresses; needs presidio-analyzer; ~2.5x slower)."""
    workers: int = 0
    """Worker processes for scrubbing and filtering; 0 = one per idle core (max 4) for inputs over 8 MB, else 1."""
    keep_slm_served: bool = False
    """Keep calls `slmtune serve` answered with a small model (default: drop them, reason slm_served)."""


@dataclass(frozen=True)
class CurateResult:
    """What a curate run did: counts for people, and the whole report (the `--report` JSON)."""

    records_in: int
    kept: int
    rejected: int
    rejected_by_reason: dict[str, int]
    pii_placeholders: dict[str, int]
    output: Path
    rejected_output: Path
    report: dict


def curate(records: str | Path, out: str | Path, report: str | Path | None = None,
           config: CurateConfig = CurateConfig(), progress: Callable[[int], None] | None = None) -> CurateResult:
    """Scrub, filter and de-duplicate `records` into `out`; the report is also written to `report`."""
    _validate(config)
    records, out = Path(records), Path(out)
    if not records.is_file():
        raise SlmtuneError(f"{records}: no such file.", "Run `slmtune ingest` first to make records.")
    get_backend(config.scrubber)  # fail here, not in a worker, when the backend is missing
    keyer = Keyer(config.near_dup)  # built once: workers get it pickled
    seen = Seen(config.near_dup)
    rep = _empty_report(records, out, config)
    with atomic_open(out) as f_out, atomic_open(default_rejected_path(out)) as f_rej:
        for batch in _prepared(records, config, keyer):
            for item in batch:
                _account(item, seen, rep, f_out, f_rej, str(records))
            if progress:
                progress(rep["records_in"])
    rep["duplicates_removed"] = {"exact": seen.exact_removed, "near": seen.near_removed}
    for key in ("rejected_by_reason", "flagged_by_reason", "pii_placeholders", "pii_placeholders_all"):
        rep[key] = dict(sorted(rep[key].items()))
    if report:
        write_json(report, rep)
    return CurateResult(rep["records_in"], rep["kept"], rep["rejected"], rep["rejected_by_reason"],
                        rep["pii_placeholders"], out, default_rejected_path(out), rep)


def _validate(config: CurateConfig) -> None:
    problems = []
    if config.on_secret not in ("redact", "drop"):
        problems.append(f"--on-secret must be redact or drop, got {config.on_secret!r}")
    if not 0 <= config.near_dup <= 1:
        problems.append(f"--near-dup must be between 0 and 1, got {config.near_dup}")
    if config.max_chars <= 0:
        problems.append(f"--max-chars must be > 0, got {config.max_chars}")
    if config.workers < 0:
        problems.append(f"--workers must be >= 0, got {config.workers}")
    if problems:
        raise SlmtuneError("; ".join(problems) + ".")


def _empty_report(records: Path, out: Path, config: CurateConfig) -> dict:
    return {"input": str(records), "output": str(out), "rejected_output": str(default_rejected_path(out)),
            "records_in": 0, "kept": 0, "rejected": 0, "rejected_by_reason": Counter(),
            "flagged_by_reason": Counter(), "duplicates_removed": {}, "pii_placeholders": Counter(),
            "pii_placeholders_all": Counter(), "records_with_secrets": 0,
            "settings": {"on_secret": config.on_secret, "near_dup": config.near_dup,
                         "max_chars": config.max_chars, "scrubber": config.scrubber,
                         "keep_slm_served": config.keep_slm_served}}


def _account(item: dict, seen: Seen, rep: dict, f_out, f_rej, source: str) -> None:
    """Dedupe one prepared record (in input order), count it, and write it to the kept or rejected file."""
    found, extra = item["found"], {}
    if not found:
        dup = seen.check(*item["keys"], item["id"])
        if dup:
            found = {dup[0]: dup[1]}
            extra = {"duplicate_of": dup[2]} if dup[0] == "duplicate" else {}
    rep["records_in"] += 1
    rep["flagged_by_reason"].update(found.keys())
    rep["pii_placeholders_all"].update(item["counts"])
    rep["records_with_secrets"] += item["secret"]
    if not found:
        rep["kept"] += 1
        rep["pii_placeholders"].update(item["counts"])
        f_out.write(item["rec_line"] + "\n")
        return
    reasons = sorted(found, key=REASONS.index)
    rep["rejected"] += 1
    rep["rejected_by_reason"][reasons[0]] += 1
    row = dumps({"file": source, "line": item["line"], "reason": reasons[0], "reasons": reasons,
                 "detail": "; ".join(found[r] for r in reasons), "id": item["id"]} | extra)
    if item["rec_line"] is not None:
        row = row[:-1] + ',"record":' + item["rec_line"] + "}"
    f_rej.write(row + "\n")


# ----------------------------------------------------------------------------- batches and workers
def _batches(path: Path) -> Iterator[list[tuple[int, str]]]:
    batch: list[tuple[int, str]] = []
    try:
        with open_text(path) as f:
            for lineno, line in enumerate(f, start=1):
                batch.append((lineno, line))
                if len(batch) == BATCH:
                    yield batch
                    batch = []
    except UnicodeDecodeError as e:
        raise SlmtuneError(f"{path}: not UTF-8 text ({e.reason}).") from None
    if batch:
        yield batch


def _n_workers(path: Path, config: CurateConfig) -> int:
    """config.workers, or one per idle core: on a busy machine extra processes only add overhead."""
    if config.workers:
        return config.workers
    if path.stat().st_size < PARALLEL_MIN_BYTES:
        return 1
    return max(1, min(4, round(_idle_cores())))


def _idle_cores() -> float:
    """Cores idle right now, from /proc/stat over 0.2 s (the load average lags by a minute)."""
    try:
        before = _cpu_ticks()
        time.sleep(0.2)
        after = _cpu_ticks()
    except (OSError, ValueError):
        return (os.cpu_count() or 1) - os.getloadavg()[0]
    total, idle = (a - b for a, b in zip(after, before, strict=True))
    return (os.cpu_count() or 1) * idle / max(total, 1)


def _cpu_ticks() -> tuple[int, int]:
    """(all, idle + iowait) jiffies since boot, from the first line of /proc/stat."""
    with open("/proc/stat") as f:
        ticks = [int(x) for x in f.readline().split()[1:9]]  # user .. steal; guest is already in user
    return sum(ticks), ticks[3] + ticks[4]


def _prepared(path: Path, config: CurateConfig, keyer: Keyer) -> Iterator[list[dict]]:
    """Prepared batches in input order; at most 2 per worker in flight, so memory stays flat."""
    workers = _n_workers(path, config)
    if workers == 1:
        _init_worker(config, keyer)
        yield from map(_prepare_batch, _batches(path))
        return
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    # spawn, not fork: the CLI's progress bar runs a thread, and forking a threaded process can deadlock.
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(workers, mp_context=ctx, initializer=_init_worker,
                             initargs=(config, keyer)) as pool:
        pending: deque = deque()
        for batch in _batches(path):
            pending.append(pool.submit(_prepare_batch, batch))
            if len(pending) >= 2 * workers:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


_WORKER: dict[str, Any] = {}


def _init_worker(config: CurateConfig, keyer: Keyer) -> None:
    _WORKER.update(config=config, backend=get_backend(config.scrubber), keyer=keyer)


def _prepare_batch(batch: list[tuple[int, str]]) -> list[dict]:
    items = [_prepare(lineno, line) for lineno, line in batch]
    # Only records that passed every filter need dedupe keys; they are computed for the batch at once.
    todo = [item for item in items if "_clean" in item and not item["found"]]
    for item, keys in zip(todo, _WORKER["keyer"].keys([item["_clean"] for item in todo]), strict=True):
        item["keys"] = keys
    for item in items:
        item.pop("_clean", None)
    return items


def _prepare(lineno: int, line: str) -> dict:
    """Everything about one record that does not depend on the others: scrub, filters, dedupe keys."""
    item: dict = {"line": lineno, "id": None, "rec_line": None, "counts": {}, "secret": False, "keys": None}
    if not line.strip():
        return item | {"found": {"blank_line": "blank line"}}
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        return item | {"found": {"invalid_json": f"not valid JSON: {e.msg} at column {e.colno}"}}
    if isinstance(obj, dict):
        item["id"] = obj.get("id")
    problems = record_problems(obj)
    if problems:
        return item | {"found": {"invalid_record": "; ".join(problems[:3])}}
    config: CurateConfig = _WORKER["config"]
    rec, counts = scrub_record(obj, _WORKER["backend"])
    found = _filters(rec, config)
    secrets = sorted(k for k in counts if k in SECRET_TYPES)
    if secrets and config.on_secret == "drop":
        found = {"secret": ", ".join(secrets)} | found
    return item | {"found": found, "rec_line": dumps(rec), "counts": dict(counts), "secret": bool(secrets),
                   "_clean": rec}


# ----------------------------------------------------------------------------- filters
def _filters(rec: dict, config: CurateConfig) -> dict[str, str]:
    """{reason: detail} for every filter the record fails."""
    found: dict[str, str] = {}
    msgs = rec["messages"]
    target = msgs[target_index(msgs)]
    if not (target.get("content") or "").strip() and not target.get("tool_calls"):
        found["empty_completion"] = "the target assistant message has no content and no tool calls"
    meta = rec.get("meta") if isinstance(rec.get("meta"), dict) else {}
    tags = meta.get("metadata") if isinstance(meta.get("metadata"), dict) else {}
    if tags.get("slmtune_answered_by") == "slm" and not config.keep_slm_served:
        found["slm_served"] = f"answered by slmtune's own {tags.get('slmtune_model') or 'small model'}"
    finish = meta.get("finish_reason")
    if finish == "length":
        found["truncated"] = "finish_reason is length"
    if finish in ("error", "content_filter") or meta.get("error"):
        found["errored"] = f"finish_reason {finish!r}" if finish else f"error: {str(meta.get('error'))[:80]}"
    if not finish and meta.get("format") in RESPONSE_FORMATS:
        found["unfinished"] = "no finish_reason: the answer may be cut off"
    found |= _tool_call_problems(rec)
    size = sum(len(m.get("content") or "") + sum(len(c["function"]["arguments"]) for c in m.get("tool_calls") or [])
               for m in msgs)
    if size > config.max_chars:
        found["too_long"] = f"{size} characters > max {config.max_chars}"
    return found


def _tool_call_problems(rec: dict) -> dict[str, str]:
    found: dict[str, str] = {}
    specs = tool_params(rec.get("tools"))
    for m in rec["messages"]:
        for call in m.get("tool_calls") or []:
            name, args = call["function"]["name"], call["function"]["arguments"]
            try:
                value = json.loads(args)
            except json.JSONDecodeError as e:
                found.setdefault("tool_args_not_json", f"{name}: arguments are not JSON ({e.msg})")
                continue
            if name not in specs:
                found.setdefault("unknown_tool", f"{name!r} is not in tools ({', '.join(specs) or 'none'})")
                continue
            error = _schema_error(specs[name], value)
            if error:
                found.setdefault("tool_args_schema", f"{name}: {error}")
    return found


_VERDICTS: dict[tuple[str, str], str | None] = {}  # (schema, arguments) -> error; agents repeat arguments


def _schema_error(schema: Any, value: Any) -> str | None:
    if not isinstance(schema, dict):
        return None
    key = (json.dumps(schema), json.dumps(value))
    if key in _VERDICTS:
        return _VERDICTS[key]
    if len(_VERDICTS) >= 50_000:
        _VERDICTS.clear()
    verdict = _VERDICTS[key] = _validate_args(schema, value)
    return verdict


def _validate_args(schema: dict, value: Any) -> str | None:
    """The first way `value` breaks the tool's schema (`slmtune.schema_check`: Draft 7, local refs only, nothing
    fetched); a schema that can't be used is the agent's problem, not a reason to drop its calls."""

    try:
        error = validation_error(value, schema)
    except SchemaProblem:
        return None
    return error.replace("(root)", "arguments", 1) if error and error.startswith("(root)") else error
