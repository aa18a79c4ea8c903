"""Atomic writes on real folders: a replaced folder is whole or restorable at every moment, and a killed write's
temps are found and cleaned without touching anything else."""

import os
import subprocess
import sys

import pytest

from slmtune.io import atomic_dir, atomic_open, clean_stale_temps, stale_temps


def folder(path, **files):
    path.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (path / name).write_text(text)
    return path


def test_atomic_dir_replaces_a_folder_whole_and_leaves_no_temps(tmp_path):
    folder(tmp_path / "export", old="1", only_old="x")
    with atomic_dir(tmp_path / "export") as stage:
        (stage / "new").write_text("2")
        assert stage.name.startswith(".export.") and stage.name.endswith(".tmp")
    assert sorted(p.name for p in (tmp_path / "export").iterdir()) == ["new"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]


def test_a_failure_inside_the_block_keeps_the_old_folder(tmp_path):
    folder(tmp_path / "export", old="1")
    with pytest.raises(RuntimeError), atomic_dir(tmp_path / "export") as stage:
        (stage / "new").write_text("2")
        raise RuntimeError("merge check failed")
    assert (tmp_path / "export" / "old").read_text() == "1"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]


def test_a_kill_between_the_renames_is_undone_by_clean_stale_temps(tmp_path):
    # What SIGKILL after "old aside" and before "new in" leaves: no target, the aside, the finished new build.
    folder(tmp_path / "exports" / ".task-a.0f3c9a1b.old.tmp", weights="old")
    folder(tmp_path / "exports" / ".task-a.k2_9xq0z.tmp", weights="new, never renamed in")
    done = clean_stale_temps(tmp_path)
    assert done.restored == (tmp_path / "exports" / "task-a",)
    assert done.removed == (tmp_path / "exports" / ".task-a.k2_9xq0z.tmp",)
    assert (tmp_path / "exports" / "task-a" / "weights").read_text() == "old"
    assert sorted(p.name for p in (tmp_path / "exports").iterdir()) == ["task-a"]


def test_an_aside_whose_folder_was_renamed_in_is_deleted(tmp_path):
    # Killed while deleting the aside: the new folder is in place, the old one is leftover.
    folder(tmp_path / "task-a", weights="new")
    folder(tmp_path / ".task-a.0f3c9a1b.old.tmp", weights="old")
    done = clean_stale_temps(tmp_path)
    assert done.restored == () and len(done.removed) == 1
    assert (tmp_path / "task-a" / "weights").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["task-a"]


def test_a_kill_inside_a_nested_swap_leaves_nothing_behind(tmp_path):
    # export builds in `.m.X.tmp`; merge swaps its own build into that folder with atomic_dir: killed between
    # merge's renames, the aside is of a temp. Putting it back would leave a temp, so it goes too.
    folder(tmp_path / "exports" / "..m.abcdefgh.tmp.0f3c9a1b.old.tmp")
    folder(tmp_path / "exports" / "..m.abcdefgh.tmp.k2_9xq0z.tmp", weights="merged")
    done = clean_stale_temps(tmp_path)
    assert done.restored == () and len(done.removed) == 2 and os.listdir(tmp_path / "exports") == []


def test_stale_temps_are_removed_at_any_depth_and_real_files_stay(tmp_path):
    deep = tmp_path / "round-001" / "curate"
    folder(deep, **{"curated.jsonl": "{}\n", ".curated.jsonl.a1b2c3d4.tmp": "half a li"})
    folder(tmp_path / "exports" / ".task-b.zz9_8yy7.tmp" / "nested", **{".README.md.abcdefgh.tmp": "x"})
    folder(tmp_path / ".hidden", **{".cache.abcdefgh.tmp": "not ours: hidden folders are not searched"})
    folder(tmp_path, **{".notes.tmp": "too short a random part", ".lock": "", "keep.tmp": "no leading dot"})
    assert len(stale_temps(tmp_path)) == 2
    done = clean_stale_temps(tmp_path)
    assert sorted(p.name for p in done.removed) == [".curated.jsonl.a1b2c3d4.tmp", ".task-b.zz9_8yy7.tmp"]
    assert sorted(p.name for p in deep.iterdir()) == ["curated.jsonl"]
    assert (tmp_path / ".hidden" / ".cache.abcdefgh.tmp").is_file()
    assert {".notes.tmp", ".lock", "keep.tmp", "round-001", "exports", ".hidden"} == {
        p.name for p in tmp_path.iterdir()}
    assert stale_temps(tmp_path) == [] and clean_stale_temps(tmp_path).removed == ()


def test_the_temps_atomic_writes_leave_when_killed_are_recognised(tmp_path):
    # A real process killed inside each block leaves exactly what a SIGKILL would: its temps, unfinished.
    code = ("import os, signal, sys; from pathlib import Path; from slmtune.io import atomic_dir, atomic_open\n"
            "root = Path(sys.argv[1])\n"
            "with atomic_open(root / 'summary.json') as f:\n"
            "    f.write('{')\n"
            "    with atomic_dir(root / 'export') as d:\n"
            "        (d / 'w').write_text('half')\n"
            "        os.kill(os.getpid(), signal.SIGKILL)\n")
    folder(tmp_path / "export", w="old")
    proc = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True)
    assert proc.returncode == -9, proc.stderr
    assert len(stale_temps(tmp_path)) == 2
    clean_stale_temps(tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["export"] and (tmp_path / "export" / "w").read_text() == "old"


def test_atomic_open_writes_whole_or_nothing(tmp_path):
    with atomic_open(tmp_path / "a.json") as f:
        f.write("{}")
    with pytest.raises(ValueError), atomic_open(tmp_path / "a.json") as f:
        f.write("{half")
        raise ValueError("serializer broke")
    assert (tmp_path / "a.json").read_text() == "{}" and os.listdir(tmp_path) == ["a.json"]
