"""Process helpers for tests that kill things: which processes a run left, and whether they are gone.

Read from /proc (Linux), so a test sees exactly what the kernel sees: no process escapes by renaming
itself or by being reparented.
"""

from __future__ import annotations

import time
from pathlib import Path

from core.process import parent_of


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:  # exited meanwhile
        return ""


def alive(pid: int) -> bool:
    """Running, not a zombie (a reparented zombie waits for a reaper that a container may not run)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2] != "Z"


def descendants(pid: int) -> set[int]:
    """Every process below ``pid`` now: children, their children, ..."""
    tree: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            tree.setdefault(parent_of(int(entry.name)), []).append(int(entry.name))
    out, todo = set(), [pid]
    while todo:
        for child in tree.get(todo.pop(), []):
            out.add(child)
            todo.append(child)
    return out


def wait_gone(pids: set[int], timeout_s: float = 30) -> set[int]:
    """Wait until none of ``pids`` is alive; return those still alive after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while (left := {p for p in pids if alive(p)}) and time.monotonic() < deadline:
        time.sleep(0.2)
    return left


def rank_processes(run_dir: Path) -> list[int]:
    """PIDs whose command line is ``... -m core.train ... <run_dir>`` (the launcher and its ranks)."""
    found = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            args = (d / "cmdline").read_bytes().split(b"\0")
        except OSError:  # exited meanwhile
            continue
        if b"core.train" in args and str(run_dir).encode() in args:
            found.append(int(d.name))
    return found


def assert_no_orphans(run_dir: Path, wait_s: float = 15.0) -> None:
    deadline = time.monotonic() + wait_s
    while (left := rank_processes(run_dir)) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not left, f"training processes outlived their launcher: {left}"
