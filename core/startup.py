"""Start-up phases of a training launch: each rank records the phase it is in, and the supervisor's
watchdog fails a start-up that makes no progress for ``train.startup_timeout_s``, naming what it waits on.

    mark(rd, rank, "rendezvous", "joining the process group of 2 ranks at 127.0.0.1:29500")   # a rank
    watchdog = StartupWatchdog(rd, ranks=[0, 1], timeout_s=900, before="starting 2 ranks")   # core.launch
    run_supervised(argv, ..., check=watchdog)

A rank's marker is ``startup/rank<R>.json`` in the run directory (docs/run-directory.md), replaced whole
at every phase change. Start-up is over for a rank once it marks ``training`` (after its first optimizer
step, which passes through every collective of a step); the watchdog then stops. Progress is a change of
a rank's marker: each phase has the whole window, however long the phases before it took.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Sequence

from core.errors import DeltatuneError
from core.run import RunDir

log = logging.getLogger(__name__)

TRAINING = "training"  # the phase after a rank's first optimizer step: its start-up is over

# What to check when a start-up stops in a phase (the phase names core.train and core.extensions mark).
_HINTS = {
    "rendezvous": (
        "every rank and node must be started, with the same train.master_addr/master_port (or MASTER_ADDR/"
        "MASTER_PORT), and that port must be reachable from every node"
    ),
    "build lock": "if no build is running any more, remove the lock file named above",
}


class StartupTimeout(DeltatuneError, TimeoutError):
    """Training start-up made no progress for ``train.startup_timeout_s``. Not retried: a retry would wait
    on the same thing (a missing node, a lock held by a live process) for as long again."""

    retryable = False


def mark(rd: RunDir, rank: int, phase: str, detail: str = "") -> None:
    """Record that rank ``rank`` entered ``phase`` (``detail``: what it waits on, with paths/addresses).
    Never fails the rank: a marker that cannot be written only makes the watchdog see less."""
    rec = {"rank": rank, "pid": os.getpid(), "phase": phase, "detail": detail, "time": round(time.time(), 3)}
    try:
        rd.write_json(rd.phase_file(rank), rec)
    except OSError as e:
        log.warning("could not record start-up phase %r in %s: %s", phase, rd.phase_file(rank), e)


def clear(rd: RunDir, ranks: Sequence[int]) -> None:
    """Remove these ranks' markers before a launch: a marker of an earlier attempt is no progress."""
    for r in ranks:
        rd.phase_file(r).unlink(missing_ok=True)


class StartupWatchdog:
    """Raises :class:`StartupTimeout` (from ``run_supervised``'s ``check``, which kills the process group)
    once some rank of ``ranks`` has not reached ``training`` and its marker has not changed for
    ``timeout_s``; a rank without a marker counts from the watchdog's creation, waiting on ``before``
    (``before_hint``: what to check then)."""

    def __init__(
        self,
        rd: RunDir,
        ranks: Sequence[int],
        timeout_s: float,
        before: str,
        *,
        before_hint: str | None = None,
        clock: Callable[[], float] = time.monotonic,
        every_s: float = 1.0,
    ):
        self.rd, self.ranks, self.timeout_s, self.before = rd, list(ranks), timeout_s, before
        self.clock, self.every_s, self.before_hint = clock, every_s, before_hint
        now = clock()
        self.seen: dict[int, tuple | None] = dict.fromkeys(self.ranks)
        self.since: dict[int, float] = dict.fromkeys(self.ranks, now)
        self.phases: dict[int, dict] = {}
        self.done = False
        self._next = now

    def __call__(self) -> None:
        now = self.clock()
        if self.done or now < self._next:
            return
        self._next = now + self.every_s
        pending = []
        for r in self.ranks:
            rec = self.rd.read_json(self.rd.phase_file(r))
            rec = rec if isinstance(rec, dict) else None
            key = None if rec is None else (rec.get("pid"), rec.get("phase"), rec.get("detail"))
            if key != self.seen[r]:
                self.seen[r], self.since[r] = key, now
                if rec is not None:
                    self.phases[r] = rec
            if rec is None or rec.get("phase") != TRAINING:
                pending.append(r)
        if not pending:
            self.done = True
            return
        stuck = min(pending, key=lambda r: self.since[r])
        if now - self.since[stuck] > self.timeout_s:
            raise StartupTimeout(self.message(stuck, now))

    def describe(self, rank: int, now: float) -> str:
        rec = self.phases.get(rank) if self.seen[rank] is not None else None
        waited = f"for {now - self.since[rank]:.0f}s"
        if rec is None:
            return f"rank {rank} has not started ({waited}): {self.before}"
        detail = f": {rec['detail']}" if rec.get("detail") else ""
        return f"rank {rank} (pid {rec.get('pid')}) is in phase '{rec.get('phase')}' ({waited}){detail}"

    def message(self, stuck: int, now: float) -> str:
        rec = self.phases.get(stuck) if self.seen[stuck] is not None else None
        hint = _HINTS.get(rec.get("phase")) if rec else self.before_hint
        lines = [
            f"training start-up made no progress for {self.timeout_s:g}s (train.startup_timeout_s): "
            + self.describe(stuck, now),
        ]
        others = [self.describe(r, now) for r in self.ranks if r != stuck]
        lines += [f"  {o}" for o in others]
        if hint:
            lines.append(f"Check: {hint}.")
        lines.append(
            "Killed the launch's process group; not retried (a retry would wait on the same thing). "
            "Raise train.startup_timeout_s if this phase is only slow."
        )
        return "\n".join(lines)


def node_ranks(node_rank: int, num_processes: int) -> list[int]:
    """The global ranks a node's launcher starts (torchrun and the deepspeed launcher number them so)."""
    return [node_rank * num_processes + i for i in range(num_processes)]
