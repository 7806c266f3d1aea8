"""Files and directories that appear whole or not at all: build beside the target, then swap it in.

atomic_write(path, text) / write_json(path, obj)    # every state file, report and summary of a run
with writing_dir(dest) as tmp: ...                  # every output directory (adapter, model, merged)
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import shutil
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

_CREATE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_BINARY", 0)


def create_temp_file(directory: str | os.PathLike[str], prefix: str) -> tuple[int, str]:
    """``tempfile.mkstemp`` with the mode of any other new file: ``0o666`` less the process umask
    (mkstemp makes 0600, so on a shared store other users could list a file but not read it).

    The kernel applies the umask (and a directory's default ACL) at ``open``, so nothing reads or
    changes the process-wide umask, which other threads may be using. ``O_EXCL`` makes the name ours.

    Returns:
        An open file descriptor (write only) and the file's path.
    """
    for _ in range(100):
        path = os.path.join(directory, f"{prefix}{secrets.token_hex(6)}")
        try:
            return os.open(path, _CREATE, 0o666), path
        except FileExistsError:
            continue
    raise FileExistsError(f"could not create a unique temp file {prefix}* in {directory}")


def make_temp_dir(directory: str | os.PathLike[str], prefix: str) -> Path:
    """``tempfile.mkdtemp`` with the mode of any other new directory: ``0o777`` less the umask (not 0700)."""
    for _ in range(100):
        path = Path(directory) / f"{prefix}{secrets.token_hex(6)}"
        try:
            path.mkdir(0o777)
            return path
        except FileExistsError:
            continue
    raise FileExistsError(f"could not create a unique temp directory {prefix}* in {directory}")


def atomic_write(path: str | Path, data: str | bytes) -> Path:
    """Write ``data`` to ``path`` so that a reader, or a kill at any instant, sees the old file or the
    new one and never a torn one: written to a temp file beside it, flushed to disk, renamed over it.

    Returns:
        ``path`` as a ``Path``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = create_temp_file(path.parent, f".{path.name}.tmp-{os.getpid()}-")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    fsync_path(path.parent)  # the rename itself survives a crash
    return path


def write_json(path: str | Path, obj: Any) -> Path:
    """``atomic_write`` of ``obj`` as indented JSON."""
    return atomic_write(path, json.dumps(obj, indent=2) + "\n")


def read_json(path: str | Path) -> Any:
    """The JSON document at ``path`` (raises ``FileNotFoundError`` / ``json.JSONDecodeError``)."""
    return json.loads(Path(path).read_text())


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return False  # an orphan with our pid is from an earlier process (pids repeat in containers)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by another user
    return True


def fsync_tree(root: str | Path) -> None:
    """Flush every file under ``root``, then every directory (deepest first), to stable storage.

    Renames and markers order what a *process* crash can leave; only fsync orders what survives a
    node crash or power loss: without it a marker may persist while the data it vouches for does not.
    """
    root = Path(root)
    dirs = [root]
    for path in sorted(root.rglob("*")):
        if path.is_dir():
            dirs.append(path)
        elif path.is_file():
            fsync_path(path)
    for d in sorted(dirs, key=lambda p: len(p.parts), reverse=True):
        fsync_path(d)


def fsync_path(path: str | Path) -> None:
    """Flush one file, or one directory's entries, to stable storage.

    A file's failure raises (an fsync error means the data may not be on disk); a directory's is
    ignored, since some platforms and filesystems cannot fsync directories at all.
    """
    is_dir = os.path.isdir(path)
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        if is_dir:  # a platform without directory fds (Windows): nothing to flush there
            return
        raise
    try:
        os.fsync(fd)
    except OSError:
        if not is_dir:
            raise
    finally:
        os.close(fd)


def _tmp_pid(p: Path) -> int | None:
    pid = p.name.split(".tmp-", 1)[-1].split("-", 1)[0]
    return int(pid) if pid.isdigit() else None


def _orphans(dest: Path) -> list[Path]:
    """``.<name>.old-<pid>`` dirs left by writers that died between the two renames, newest first."""
    found = []
    for p in dest.parent.glob(f".{dest.name}.old-*"):
        pid = p.name.rsplit("-", 1)[-1]
        if p.is_dir() and not (pid.isdigit() and _pid_alive(int(pid))):  # a live writer is mid-swap
            found.append(p)
    return sorted(found, key=lambda p: p.stat().st_mtime, reverse=True)


def _recover(dest: Path) -> None:
    orphans = _orphans(dest)
    if orphans and not dest.exists():
        log.warning("%s was missing; restoring the copy a crashed writer left at %s", dest, orphans[0])
        os.replace(orphans.pop(0), dest)
    for stale in orphans:  # dest is whole, so these are superseded copies
        shutil.rmtree(stale, ignore_errors=True)
    for tmp in dest.parent.glob(f".{dest.name}.tmp-*"):  # half-built copies of writers that died
        pid = _tmp_pid(tmp)
        if tmp.is_dir() and pid is not None and not _pid_alive(pid):
            log.info("removing %s, left by a writer that died", tmp)
            shutil.rmtree(tmp, ignore_errors=True)


@contextmanager
def writing_dir(dest: str | Path) -> Iterator[Path]:
    """Yield a fresh temp dir beside ``dest``; on success it replaces ``dest``, on error it is removed.

    The previous ``dest`` is renamed aside to ``.<name>.old-<pid>`` before the new one moves in and is
    deleted only after. If the swap fails, the old copy is put back; if the process dies between the
    two renames, the next ``writing_dir(dest)`` restores it before doing anything else.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    _recover(dest)
    tmp = make_temp_dir(dest.parent, f".{dest.name}.tmp-{os.getpid()}-")
    old = None
    try:
        yield tmp
        fsync_tree(tmp)  # what moves in is on disk before it replaces anything
        if dest.exists():
            old = dest.with_name(f".{dest.name}.old-{os.getpid()}")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(dest, old)
        os.replace(tmp, dest)
    except BaseException:
        if old is not None and old.exists() and not dest.exists():
            os.replace(old, dest)
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    fsync_path(dest.parent)  # the swap itself survives a crash
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
