"""writing_dir: the target is replaced whole or kept, whatever fails, and a crash mid-swap is repaired."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

import core.fsutil
from core.fsutil import writing_dir


def _make(path, text):
    path.mkdir(parents=True)
    (path / "f.txt").write_text(text)


def _leftovers(parent, name="out"):
    return sorted(p.name for p in parent.iterdir() if p.name.startswith(f".{name}."))


def test_success_replaces_dest(tmp_path):
    dest = tmp_path / "out"
    _make(dest, "old")
    (dest / "only-in-old.txt").write_text("x")
    with writing_dir(dest) as tmp:
        assert tmp.parent == tmp_path and tmp != dest
        (tmp / "f.txt").write_text("new")
    assert sorted(p.name for p in dest.iterdir()) == ["f.txt"]  # replaced, not merged
    assert (dest / "f.txt").read_text() == "new"
    assert _leftovers(tmp_path) == []


def test_success_creates_missing_dest(tmp_path):
    dest = tmp_path / "a" / "out"
    with writing_dir(dest) as tmp:
        (tmp / "f.txt").write_text("new")
    assert (dest / "f.txt").read_text() == "new"


def test_error_in_block_keeps_old_and_removes_temp(tmp_path):
    dest = tmp_path / "out"
    _make(dest, "old")
    with pytest.raises(RuntimeError, match="boom"):
        with writing_dir(dest) as tmp:
            (tmp / "f.txt").write_text("half")
            raise RuntimeError("boom")
    assert (dest / "f.txt").read_text() == "old"
    assert _leftovers(tmp_path) == []


def test_failure_on_second_rename_restores_old(tmp_path, monkeypatch):
    dest = tmp_path / "out"
    _make(dest, "old")
    real_replace = os.replace
    calls = []

    def flaky_replace(src, dst):
        calls.append((src, dst))
        if len(calls) == 2:  # the new dir moving into place
            raise OSError("injected: disk went away")
        return real_replace(src, dst)

    monkeypatch.setattr(core.fsutil.os, "replace", flaky_replace)
    with pytest.raises(OSError, match="injected"):
        with writing_dir(dest) as tmp:
            (tmp / "f.txt").write_text("new")
    assert len(calls) == 3  # aside, (failed) swap in, restore
    assert (dest / "f.txt").read_text() == "old"
    assert _leftovers(tmp_path) == []


def test_orphan_from_a_crash_between_renames_is_restored(tmp_path):
    dest = tmp_path / "out"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True)
    pid = int(dead.stdout)  # a pid that has exited
    _make(tmp_path / f".out.old-{pid}", "old")
    older = tmp_path / ".out.old-999999999"
    _make(older, "older")
    os.utime(older, (1, 1))
    with pytest.raises(RuntimeError):
        with writing_dir(dest):
            assert (dest / "f.txt").read_text() == "old"  # restored before the block runs
            raise RuntimeError("the caller fails; the restored copy must stay")
    assert (dest / "f.txt").read_text() == "old"
    assert _leftovers(tmp_path) == []  # the older, superseded orphan is gone too


def test_orphan_of_a_live_writer_is_left_alone(tmp_path):
    # pid 1 is alive: its .old dir may be mid-swap, so neither restored nor deleted
    dest = tmp_path / "out"
    _make(tmp_path / ".out.old-1", "theirs")
    with writing_dir(dest) as tmp:
        (tmp / "f.txt").write_text("new")
    assert (dest / "f.txt").read_text() == "new"
    assert _leftovers(tmp_path) == [".out.old-1"]


def test_half_built_copies_of_dead_writers_are_removed_live_ones_kept(tmp_path):
    """A writer killed inside the block leaves .out.tmp-<pid>-*: possibly a multi-GB merged model."""
    dest = tmp_path / "out"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True)
    _make(tmp_path / f".out.tmp-{int(dead.stdout)}-abc123", "torn")
    _make(tmp_path / ".out.tmp-1-def456", "being written by a live process")
    with writing_dir(dest) as tmp:
        assert tmp.name.startswith(f".out.tmp-{os.getpid()}-")
        (tmp / "f.txt").write_text("new")
    assert (dest / "f.txt").read_text() == "new"
    assert _leftovers(tmp_path) == [".out.tmp-1-def456"]


def test_fsync_tree_flushes_nested_files_and_dirs(tmp_path, monkeypatch):
    from core.fsutil import fsync_tree

    _make(tmp_path / "ckpt" / "shards", "x")
    (tmp_path / "ckpt" / "meta.json").write_text("{}")
    synced: list[str] = []
    real = os.fsync

    def fsync(fd: int) -> None:
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    fsync_tree(tmp_path / "ckpt")
    root = tmp_path / "ckpt"
    files = [str(root / "meta.json"), str(root / "shards" / "f.txt")]
    assert sorted(synced[:2]) == files  # files first, then directories deepest first
    assert synced[2:] == [str(root / "shards"), str(root)]


@pytest.mark.parametrize("umask, file_mode", [(0o022, 0o644), (0o002, 0o664)])
def test_written_files_and_dirs_take_the_umask_of_the_moment(tmp_path, umask, file_mode):
    """Not mkstemp's 0600 / mkdtemp's 0700, nor the umask the process had when fsutil was imported."""
    import stat

    from core.fsutil import atomic_write, create_temp_file, make_temp_dir, write_json

    old = os.umask(umask)
    try:
        atomic_write(tmp_path / "a.txt", "x")
        atomic_write(tmp_path / "a.txt", "replaced")  # a replacement too
        write_json(tmp_path / "b.json", {"k": 1})
        with writing_dir(tmp_path / "out") as d:
            (d / "f.txt").write_text("y")
        fd, tmp = create_temp_file(tmp_path, ".t-")
        os.close(fd)
        made = make_temp_dir(tmp_path, ".d-")
    finally:
        os.umask(old)
    for f in ("a.txt", "b.json", "out/f.txt", os.path.basename(tmp)):
        assert stat.S_IMODE((tmp_path / f).stat().st_mode) == file_mode, f
    for d in (tmp_path / "out", made):
        assert stat.S_IMODE(d.stat().st_mode) == 0o777 & ~umask, d
    assert (tmp_path / "a.txt").read_text() == "replaced"
    assert sorted(p.name for p in tmp_path.iterdir() if ".tmp-" in p.name) == []
