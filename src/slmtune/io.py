"""Files every stage shares: JSONL streamed with line numbers, JSON read with pointed errors, atomic writes (temp
file + rename), content fingerprints, and the UTC timestamp stages stamp their outputs with."""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import json
import os
import tempfile
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import IO, Any

from slmtune.errors import SlmtuneError


def open_text(path: Path) -> IO[str]:
    """Open a text file for reading, transparently decompressing `.gz`."""
    if str(path).endswith(".gz"):
        return gzip.open(path, "rt", encoding="utf-8")
    return open(path, encoding="utf-8")


def iter_jsonl(path: str | Path, *, strict: bool = True) -> Iterator[tuple[int, Any]]:
    """Yield `(line_number, object)` for each non-blank line; 1-based line numbers.

    With `strict`, a line that is not JSON raises `SlmtuneError` naming the file and line; otherwise it is
    yielded as `(line_number, JSONDecodeError)` so the caller can reject it with a reason.
    """
    path = Path(path)
    if not path.is_file():
        raise SlmtuneError(f"{path}: no such file.")
    with open_text(path) as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                yield lineno, json.loads(line)
            except json.JSONDecodeError as e:
                if strict:
                    raise SlmtuneError(f"{path}:{lineno}: not valid JSON ({e.msg}).") from None
                yield lineno, e


def read_jsonl(path: str | Path) -> list[Any]:
    return [obj for _, obj in iter_jsonl(path)]


def dumps(obj: Any) -> str:
    """One JSONL line: compact, UTF-8 kept readable, stable key order as given."""
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":"))


@contextlib.contextmanager
def atomic_open(path: str | Path, mode: str = "w") -> Iterator[IO]:
    """Write to a temp file beside `path` and rename it into place only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Build a folder in a temp dir beside `path`; on success it replaces `path` (whole), else it is removed."""
    import shutil

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        yield tmp
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_jsonl(path: str | Path, rows: Iterable[Any]) -> int:
    """Atomically write rows as JSONL; returns the number written."""
    n = 0
    with atomic_open(path) as f:
        for row in rows:
            f.write(dumps(row) + "\n")
            n += 1
    return n


def write_json(path: str | Path, obj: Any) -> None:
    with atomic_open(path) as f:
        json.dump(obj, f, ensure_ascii=False, indent=2, sort_keys=False)
        f.write("\n")


def file_fingerprint(path: str | Path) -> str:
    """sha256 of a file's bytes: the content fingerprint stages use to tell changed inputs."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def read_json(path: str | Path, hint: str | None = None) -> Any:
    """A JSON file's value; a missing or malformed file is a one-line error naming it."""
    path = Path(path)
    if not path.is_file():
        raise SlmtuneError(f"{path}: no such file.", hint)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except ValueError as e:
        raise SlmtuneError(f"{path}: not valid JSON ({e}).", hint) from None


def read_json_or_none(path: str | Path) -> Any:
    """A JSON file's value, or None when it is missing or unreadable (markers a crash may have cut short)."""
    path = Path(path)
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except ValueError:
        return None


def fingerprint(obj: Any) -> str:
    """sha256 of canonical JSON: equal inputs and parameters give equal fingerprints."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, ensure_ascii=False, default=str).encode()).hexdigest()


def now() -> str:
    """UTC time, second resolution, ISO 8601 with Z: what manifests, markers and routers record."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
