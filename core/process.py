"""Process lifetime on Linux: a rank dies with its launcher (PR_SET_PDEATHSIG), and a rank can tell
whether the launcher it was started by is still its parent.

Only the standard library: core.train imports it before torch, to arm the signal from its first moment.
"""

from __future__ import annotations

import ctypes
import signal
from pathlib import Path

# Set for torchrun launches to the supervising process's pid: a rank checks it is its grandparent
# (supervisor -> torchrun -> rank) to detect a launcher that died before the rank armed its death signal.
SUPERVISOR_PID_ENV = "DELTATUNE_SUPERVISOR_PID"
_PR_SET_PDEATHSIG = 1  # linux/prctl.h


def set_pdeathsig(sig: int = signal.SIGKILL) -> None:
    """Have the kernel send ``sig`` to this process when its parent dies (Linux; no-op elsewhere)."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0)
    except OSError:
        pass


def parent_of(pid: int) -> int:
    """The parent pid of ``pid`` (from /proc), or -1 if it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return -1
    return int(stat[stat.rindex(")") + 2 :].split()[1])  # after "pid (comm) ": state, ppid, ...
