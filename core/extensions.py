"""DeepSpeed's JIT-compiled C++ ops, built under a lock deltatune controls; torch's stale build locks cleared.

    python -m core.extensions        # build (or verify) the op every DeepSpeed process on this machine loads

On the CPU, ``deepspeed.init_distributed`` builds DeepSpeed's shared-memory comm op (``deepspeed_shm_comm``)
the first time a machine runs it (docs/environment.md). torch builds it under a ``lock`` file in the op's
build directory (``torch.utils.file_baton.FileBaton``: create-exclusive, removed when the build ends), so a
build killed mid-way leaves that file behind and every later process waits for it forever.

Every deltatune process that loads the op (each rank, in ``core.train.setup``, before its rendezvous; and
this module's ``main``) first takes ``.deltatune-build.lock`` beside the build directories with
``fcntl.flock``, which the kernel releases when its holder dies, however it dies. So while we hold it, no
deltatune process is inside torch's build, and a torch ``lock`` file is stale unless some other process
holds it: torch's ``FileBaton.try_acquire`` keeps the file's descriptor open until ``release`` removes it,
so the lock is live exactly while a process has it open (``/proc/<pid>/fd``, readable for our own user's
processes). A lock that no process holds is removed with a warning naming it; one held by a live process
(another user's tool sharing the cache, a build in progress) is waited for, and named in the start-up phase
that ``core.startup``'s watchdog reports if the wait lasts. A lock file of another user cannot be checked
that way: it is left alone and reported.

Remaining gap: on a build root shared between machines (``TORCH_EXTENSIONS_DIR`` on NFS), a non-deltatune
process building on another machine is invisible in our ``/proc``; deltatune processes are still excluded
by the flock, which Linux forwards to NFS as a POSIX lock.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

LOCK_NAME = ".deltatune-build.lock"  # ours, in the extensions root beside each op's build directory
# torch.utils.cpp_extension._jit_compile: FileBaton(os.path.join(build_directory, 'lock'))
TORCH_BATON = "lock"

# Called with (phase, detail) while waiting or building, so a rank can record where it is.
OnPhase = Callable[[str, str], None]


def _quiet(phase: str, detail: str) -> None:
    pass


def comm_op_builder() -> Any | None:
    """DeepSpeed's shared-memory comm op builder if ``deepspeed.init_distributed`` would load it on this
    machine (the CPU accelerator on Linux), else None: the test of ``deepspeed.comm.torch.build_shm_op``."""
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    builder = get_accelerator().create_op_builder("ShareMemCommBuilder")
    if builder is None or not deepspeed.ops.__compatible_ops__.get(builder.NAME, False):
        return None
    return builder


def build_dir(name: str) -> Path:
    """The directory torch builds extension ``name`` in (``TORCH_EXTENSIONS_DIR`` or its user cache)."""
    from torch.utils.cpp_extension import _get_build_directory

    return Path(_get_build_directory(name, verbose=False))


def holders(path: Path) -> list[int]:
    """Pids of the processes that have ``path`` open (those of our own user: /proc/<pid>/fd)."""
    try:
        target = path.stat()
    except FileNotFoundError:
        return []
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            fds = list((proc / "fd").iterdir())
        except OSError:  # another user's process, or gone
            continue
        for fd in fds:
            try:
                st = fd.stat()
            except OSError:
                continue
            if (st.st_dev, st.st_ino) == (target.st_dev, target.st_ino):
                found.append(int(proc.name))
                break
    return found


def check_baton(op_dir: Path) -> tuple[str, str]:
    """Look at torch's build lock in ``op_dir``; only call it while holding :func:`build_lock`.

    Returns ("none", ""), ("removed", what) after deleting a stale lock, or ("held", who) for a lock a
    live process holds or that cannot be checked (another user's file).
    """
    baton = op_dir / TORCH_BATON
    try:
        st = baton.stat()
    except FileNotFoundError:
        return "none", ""
    age = time.time() - st.st_mtime
    if st.st_uid != os.getuid():
        return "held", f"torch's build lock {baton} belongs to uid {st.st_uid}, whose processes we cannot see"
    pids = holders(baton)
    if pids:
        return "held", f"torch's build lock {baton} is held by pid {', '.join(map(str, pids))}"
    try:
        baton.unlink()
    except FileNotFoundError:  # its holder just released it
        return "none", ""
    what = (
        f"removed a stale torch build lock {baton} ({age:.0f}s old, held by no process): a build of "
        f"{op_dir.name} was killed mid-way, and every later run would have waited for it forever"
    )
    log.warning("%s", what)
    return "removed", what


@contextlib.contextmanager
def build_lock(root: Path, on_phase: OnPhase = _quiet, poll_s: float = 0.2) -> Iterator[Path]:
    """Hold deltatune's build lock of extensions root ``root`` (``fcntl.flock``; the kernel drops it
    when the holder dies). The holder's pid is written into the file, to name it while others wait."""
    root.mkdir(parents=True, exist_ok=True)
    path = root / LOCK_NAME
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        waiting = False
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if not waiting:
                    try:
                        holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
                    except OSError:
                        holder = "?"
                    on_phase(
                        "build lock", f"waiting for deltatune's build lock {path} (held by pid {holder})"
                    )
                    waiting = True
                time.sleep(poll_s)
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        yield path
    finally:
        os.close(fd)  # releases the flock


def ensure_comm_op(on_phase: OnPhase = _quiet, poll_s: float = 0.5) -> Any | None:
    """Build or load DeepSpeed's CPU comm op under deltatune's build lock, clearing a stale torch lock
    first; the loaded module is cached by DeepSpeed, so ``deepspeed.init_distributed`` reuses it.

    Returns the module, or None where DeepSpeed does not use the op (GPU accelerators, not Linux).
    """
    builder = comm_op_builder()
    if builder is None:
        return None
    op_dir = build_dir(builder.NAME)
    with build_lock(op_dir.parent, on_phase) as lock:
        while True:
            state, what = check_baton(op_dir)
            if state != "held":
                break
            on_phase("build lock", f"{what} (waiting for it under {lock})")
            time.sleep(poll_s)
        on_phase("building op", f"building or loading DeepSpeed's {builder.NAME} op in {op_dir} under {lock}")
        t0 = time.monotonic()
        module = builder.load(verbose=False)
        log.info("DeepSpeed op %s ready in %.1fs (%s)", builder.NAME, time.monotonic() - t0, op_dir)
        return module


def main() -> int:
    logging.basicConfig(
        level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s", stream=sys.stdout
    )
    t0 = time.monotonic()
    module = ensure_comm_op(on_phase=lambda phase, detail: print(f"{phase}: {detail}", flush=True))
    if module is None:
        print("no DeepSpeed op to build on this machine (a GPU accelerator, or not Linux)")
    else:
        print(f"DeepSpeed comm op ready: {module.__file__} ({time.monotonic() - t0:.1f}s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
