"""One writer per work dir, with real processes: another process holding `WORKDIR/.lock` refuses a second
flywheel (library and CLI) and readers, by pid; once that process is killed the lock is free again."""

import os
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from slmtune.cli import app
from slmtune.errors import SlmtuneError
from slmtune.lock import check_unlocked, workdir_lock
from slmtune.synthetic.logs import write_logs

HOLD = ("import sys, time; from pathlib import Path; from slmtune.lock import workdir_lock\n"
        "with workdir_lock(Path(sys.argv[1])):\n"
        "    print('held', flush=True)\n"
        "    time.sleep(600)\n")


@pytest.fixture
def holder(tmp_path):
    """A separate process holding the work dir's lock; killed (SIGKILL, no clean-up) by `kill()`."""
    work = tmp_path / "work"
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(work)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"

    def kill():
        proc.kill()
        proc.wait()

    yield work, proc, kill
    if proc.poll() is None:
        kill()


def test_a_held_work_dir_is_refused_by_pid_until_its_holder_dies(holder):
    work, proc, kill = holder
    assert (work / ".lock").read_text().strip() == str(proc.pid)
    with pytest.raises(SlmtuneError, match=rf"is in use \(locked by pid {proc.pid}: another slmtune flywheel"):
        with workdir_lock(work):
            pass
    with pytest.raises(SlmtuneError, match=rf"being written by a flywheel run \(locked by pid {proc.pid}\)"):
        check_unlocked(work)
    kill()  # SIGKILL: no `finally` ran, the pid is still in the file, the kernel dropped the lock
    check_unlocked(work)
    with workdir_lock(work) as path:
        assert path.read_text().strip() == str(os.getpid())
    assert path.read_text() == ""


def test_a_lock_is_free_after_the_block_and_readers_never_block_each_other(tmp_path):
    check_unlocked(tmp_path / "never-run")  # no .lock at all
    with workdir_lock(tmp_path / "w"):
        with pytest.raises(SlmtuneError, match="is in use"), workdir_lock(tmp_path / "w"):
            pass  # flock is per open file: the same process opening it again is refused too
    check_unlocked(tmp_path / "w")
    check_unlocked(tmp_path / "w")


def test_a_second_flywheel_fails_at_once_with_one_line(holder, tmp_path):
    work, proc, _ = holder
    write_logs(tmp_path / "logs", 16, seed=1, errands=["classification-sentiment"])
    result = CliRunner().invoke(app, ["flywheel", str(tmp_path / "logs" / "logs"), "-w", str(work), "--gpu", "cpu",
                                      "--max-steps", "2", "--min-size", "8"])
    assert result.exit_code == 1, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and "locked" in lines[0] and str(proc.pid) in lines[0], result.output
    assert "Traceback" not in result.output and not (work / "round-001").exists()
