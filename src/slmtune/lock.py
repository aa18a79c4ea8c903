"""One writer per work dir: `slmtune flywheel` holds an exclusive `flock` on `WORKDIR/.lock` for its whole round.

`WORKDIR/.lock` holds the pid of the process that holds the lock (empty once released; the file itself stays,
because deleting a locked file lets a third process lock a fresh inode of the same name while the second
still holds the old one). The kernel drops a `flock` when its holder dies, SIGKILL included, so a killed
flywheel never leaves a stale lock behind: the pid in the file is only there to name the holder in the error.

Readers (`slmtune serve`) call `check_unlocked` first: a work dir being written may hold half a round.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator
from pathlib import Path

from slmtune.errors import SlmtuneError

LOCK_FILE = ".lock"


@contextlib.contextmanager
def workdir_lock(workdir: Path) -> Iterator[Path]:
    """Hold `WORKDIR/.lock` exclusively for the block (creating both if needed); yields the lock file's path.

    Raises `SlmtuneError` at once, naming the holder's pid, when another process holds it.
    """
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    path = workdir / LOCK_FILE
    # os.open's fds are not inherited across exec (PEP 446): a subprocess the round starts (the GGUF converter)
    # cannot keep the lock alive after this process dies.
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise SlmtuneError(f"{workdir} is in use (locked by {_holder(path)}: another slmtune flywheel is "
                               "running there).", "Wait for it to finish, or give this run another --workdir."
                               ) from None
        _write_pid(fd, str(os.getpid()))
        try:
            yield path
        finally:
            with contextlib.suppress(OSError):
                _write_pid(fd, "")  # released: no pid left behind to mislead a reader of the file
    finally:
        os.close(fd)  # closing the last fd of the open file releases the flock


def check_unlocked(workdir: Path) -> None:
    """Raise `SlmtuneError` when a flywheel run holds `WORKDIR/.lock` (reading now could see half a round)."""
    path = Path(workdir) / LOCK_FILE
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return  # never run by a flywheel that locks: nothing to wait for
    try:
        # A shared lock on our own open file conflicts with the writer's exclusive one and with nothing else,
        # so two readers never refuse each other.
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            raise SlmtuneError(f"{workdir} is being written by a flywheel run (locked by {_holder(path)}): "
                               "serving it now would read a half-finished round.",
                               "Wait for the flywheel to finish, then start again.") from None
        fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def _write_pid(fd: int, text: str) -> None:
    os.ftruncate(fd, 0)
    os.pwrite(fd, text.encode() + (b"\n" if text else b""), 0)


def _holder(path: Path) -> str:
    """The holder as `pid N` from the lock file, or `another process` when it is empty or caught mid-write."""
    try:
        text = path.read_text(encoding="utf-8", errors="replace").strip()
    except OSError:
        text = ""
    return f"pid {text}" if text.isdigit() else "another process"
