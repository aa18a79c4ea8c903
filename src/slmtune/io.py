"""Files every stage shares: JSONL streamed with line numbers, JSON read with pointed errors, atomic writes (temp
file or folder + rename) and the clean-up of what a killed one leaves, content fingerprints, and the UTC
timestamp stages stamp their outputs with."""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import json
import os
import re
import secrets
import shutil
import tempfile
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
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


# Temp names every atomic write uses, so `clean_stale_temps` can tell a killed run's leftovers from real files:
# `.{name}.{8 random chars}.tmp` (a file or folder being built) and `.{name}.{8 hex}.old.tmp` (a replaced folder
# moved aside). 8 chars is what `tempfile` draws; requiring them keeps a user's `.notes.tmp` safe.
TMP_SUFFIX, OLD_SUFFIX = ".tmp", ".old.tmp"
_STALE = re.compile(r"^\.(?P<name>.+)\.[a-z0-9_]{8}(?P<old>\.old)?\.tmp$")


@contextlib.contextmanager
def atomic_open(path: str | Path, mode: str = "w") -> Iterator[IO]:
    """Write to a temp file beside `path` and rename it into place only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TMP_SUFFIX, dir=path.parent)
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
    """Build a folder in a temp dir beside `path`; on success it replaces `path` (whole), else it is removed.

    The old folder is renamed aside before the new one is renamed in and deleted after, so a kill at any moment
    leaves `path` whole (old or new) or, between the two renames, an aside that `clean_stale_temps` puts back.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=TMP_SUFFIX, dir=path.parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _swap_in(tmp, path)


def _swap_in(new: Path, path: Path) -> None:
    aside = path.with_name(f".{path.name}.{secrets.token_hex(4)}{OLD_SUFFIX}") if path.exists() else None
    if aside is not None:
        os.rename(path, aside)
    try:
        os.rename(new, path)
    except BaseException:
        if aside is not None:
            os.rename(aside, path)
        shutil.rmtree(new, ignore_errors=True)
        raise
    if aside is not None:
        shutil.rmtree(aside, ignore_errors=True)


@dataclass(frozen=True)
class TempCleanup:
    """What `clean_stale_temps` did: asides renamed back over their missing target, temps deleted."""

    restored: tuple[Path, ...]
    removed: tuple[Path, ...]


def stale_temps(root: str | Path) -> list[Path]:
    """Every atomic-write temp (file or folder) under `root`, without looking inside them; hidden folders that
    are not temps (`.git`, caches) are not descended into: slmtune writes none of its temps there."""
    found, todo = [], [Path(root)]
    while todo:
        with os.scandir(todo.pop()) as entries:
            for e in entries:
                if _STALE.match(e.name):
                    found.append(Path(e.path))
                elif e.is_dir(follow_symlinks=False) and not e.name.startswith("."):
                    todo.append(Path(e.path))
    return sorted(found)


def clean_stale_temps(root: str | Path) -> TempCleanup:
    """Undo what killed atomic writes left under `root`: an aside (`.{name}.X.old.tmp`) whose `name` is gone is
    renamed back (the previous folder returns); every other temp is deleted, nested ones included. Run it only
    while nothing writes under `root` (the flywheel runs it holding the work-dir lock)."""
    restored, removed = [], []
    for p in stale_temps(root):
        m = _STALE.match(p.name)
        target = p.with_name(m["name"])
        # (an aside of a temp — merge swapping into export's build folder — is a temp too: not put back)
        if m["old"] and not os.path.lexists(target) and not _STALE.match(target.name):
            os.rename(p, target)
            restored.append(target)
            continue
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        else:
            p.unlink(missing_ok=True)
        removed.append(p)
    return TempCleanup(tuple(restored), tuple(removed))


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
