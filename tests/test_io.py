"""Atomic files and folders: readers see old or new, a replaced folder is never missing without its
old version beside it, stale temporaries are cleaned, output paths are checked before any work."""

import os
import subprocess
import sys

import pytest

from scoreaction.errors import OutputError
from scoreaction.io import atomic_folder, atomic_write_bytes, remove_stale
from scoreaction.outputs import check_output_file, check_output_folder


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_atomic_folder_builds_beside_and_replaces(tmp_path):
    with atomic_folder(tmp_path / "out") as tmp:
        assert tmp.name == f".out.tmp-{os.getpid()}" and not (tmp_path / "out").exists()
        (tmp / "a").write_text("1")
    with pytest.raises(OutputError, match="replaced only when asked"), atomic_folder(tmp_path / "out"):
        pass  # an existing folder is replaced only when asked
    with atomic_folder(tmp_path / "out", replace=True) as tmp:
        (tmp / "b").write_text("2")
        assert (tmp_path / "out" / "a").read_text() == "1"  # the old one stays readable meanwhile
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["b"]


def test_atomic_folder_leaves_the_old_folder_when_filling_fails(tmp_path):
    with atomic_folder(tmp_path / "out") as tmp:
        (tmp / "a").write_text("1")
    with pytest.raises(RuntimeError), atomic_folder(tmp_path / "out", replace=True) as tmp:
        (tmp / "b").write_text("2")
        raise RuntimeError
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert (tmp_path / "out" / "a").read_text() == "1"


def test_atomic_folder_and_file_refuse_the_other_kind(tmp_path):
    (tmp_path / "file").write_text("keep me")
    with pytest.raises(OutputError, match="is a file; expected a folder"), atomic_folder(tmp_path / "file"):
        pass
    assert (tmp_path / "file").read_text() == "keep me"
    (tmp_path / "dir").mkdir()
    with pytest.raises(OutputError, match="is a folder; expected a file name"):
        atomic_write_bytes(tmp_path / "dir", b"x")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dir", "file"]


def test_remove_stale_removes_the_dead_and_restores_a_missing_folder(tmp_path):
    dead = dead_pid()
    (tmp_path / f".a.tmp-{dead}").mkdir()
    (tmp_path / f".b.json.tmp-{dead}").write_text("{")
    (tmp_path / f".c.old-{dead}").mkdir()  # c is missing: a kill between the renames
    (tmp_path / f".c.old-{dead}" / "x").write_text("old c")
    (tmp_path / "d").mkdir()
    (tmp_path / f".d.old-{dead}").mkdir()  # d exists: a leftover
    (tmp_path / f".e.tmp-{os.getpid()}").write_text("mine")  # this process's own: stale too
    (tmp_path / f".f.tmp-{os.getppid()}").write_text("a live writer's")
    (tmp_path / ".g.tmp-x").write_text("not a temporary name")
    done = remove_stale(tmp_path)
    assert sorted(done) == sorted([f".a.tmp-{dead}", f".b.json.tmp-{dead}", f".c.old-{dead}", f".d.old-{dead}",
                                   f".e.tmp-{os.getpid()}"])
    assert sorted(p.name for p in tmp_path.iterdir()) == [f".f.tmp-{os.getppid()}", ".g.tmp-x", "c", "d"]
    assert (tmp_path / "c" / "x").read_text() == "old c"
    assert remove_stale(tmp_path / "missing") == []


def test_remove_stale_can_be_limited_to_some_names(tmp_path):
    dead = dead_pid()
    for name in ("config.json", "notes.txt"):
        (tmp_path / f".{name}.tmp-{dead}").write_text("x")
    assert remove_stale(tmp_path, names=("config.json",)) == [f".config.json.tmp-{dead}"]
    assert [p.name for p in tmp_path.iterdir()] == [f".notes.txt.tmp-{dead}"]


def test_output_paths_are_checked_before_work(tmp_path):
    (tmp_path / "file").write_text("x")
    (tmp_path / "dir").mkdir()
    assert check_output_file(tmp_path / "new.npz") == tmp_path / "new.npz"
    assert check_output_file(tmp_path / "a" / "b" / "new.npz")  # folders to be created
    assert check_output_folder(tmp_path / "dir") and check_output_folder(tmp_path / "new")
    with pytest.raises(OutputError, match="^--out .* is a folder; expected a file name$"):
        check_output_file(tmp_path / "dir", "--out")
    with pytest.raises(OutputError, match="is a file; expected a folder"):
        check_output_folder(tmp_path / "file", "--out")
    for check in (check_output_file, check_output_folder):
        with pytest.raises(OutputError, match="cannot be created: .*/file' is a file, not a folder"):
            check(tmp_path / "file" / "x" / "y", "--out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dir", "file"]
