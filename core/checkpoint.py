"""Step checkpoints that become visible only when complete, and the state needed to resume exactly.

Layout: ``<run>/checkpoints/step-000050/`` with a ``COMPLETE`` file written by rank 0 after every rank
finished writing (DeepSpeed's own ``latest`` tag is written before that barrier: it proves nothing).
"""

from __future__ import annotations

import json
import logging
import random
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from core.fsutil import fsync_path, fsync_tree
from core.run import data_fingerprint, training_fingerprint  # noqa: F401  (re-exported for callers)

log = logging.getLogger(__name__)

COMPLETE = "COMPLETE"
_STEP_DIR = re.compile(r"step-(\d{6,})")


class CheckpointMismatchError(ValueError):
    """A checkpoint in the run directory was written by a different training configuration."""


class UnreadableCheckpointError(ValueError):
    """A complete checkpoint cannot be loaded; a retry would pick the same one (not retryable)."""


@dataclass(frozen=True)
class Checkpoint:
    step: int
    path: Path
    meta: dict[str, Any]


def step_dir_name(step: int) -> str:
    return f"step-{step:06d}"


def list_complete(ckpt_root: Path) -> list[Checkpoint]:
    """Complete checkpoints, oldest first. Directories without ``COMPLETE`` (torn writes) are skipped."""
    out: list[Checkpoint] = []
    if not ckpt_root.is_dir():
        return out
    for d in ckpt_root.iterdir():
        m = _STEP_DIR.fullmatch(d.name)
        if m and d.is_dir() and (d / COMPLETE).is_file():
            try:
                meta = json.loads((d / COMPLETE).read_text())
            except json.JSONDecodeError:
                log.warning("ignoring checkpoint %s: unreadable %s marker", d, COMPLETE)
                continue
            out.append(Checkpoint(int(m.group(1)), d, meta))
    return sorted(out, key=lambda c: c.step)


def latest_complete(
    ckpt_root: Path, fingerprint: str | None = None, data: str | None = None
) -> Checkpoint | None:
    """The newest complete checkpoint; raises if it was written by another configuration or on
    other training data (``data``: :func:`data_fingerprint` of the split this run trains on)."""
    done = list_complete(ckpt_root)
    if not done:
        return None
    last = done[-1]
    fix = f"resume with the original config and data, or start fresh under a new run name (or delete {ckpt_root})"
    if fingerprint is not None and last.meta.get("fingerprint") != fingerprint:
        raise CheckpointMismatchError(
            f"checkpoint {last.path} was written by a different training configuration "
            f"(fingerprint {last.meta.get('fingerprint')} != {fingerprint}); {fix}"
        )
    if data is not None and last.meta.get("data_fingerprint", data) != data:
        raise CheckpointMismatchError(
            f"checkpoint {last.path} was trained on different data (prepared-data fingerprint "
            f"{str(last.meta.get('data_fingerprint'))[:12]} != {data[:12]}); {fix}"
        )
    return last


def discard_finished(ckpt_root: Path, summary: dict[str, Any]) -> bool:
    """Remove ``ckpt_root`` if its checkpoints belong to the finished run ``summary`` describes.

    A finished run needs no resume, so its checkpoints (kept by ``train.keep_checkpoints``, or left
    by a crash between the summary and their removal) must not block a new run under the same name
    with another config or data: only an *unfinished* run's checkpoints are protected by a refusal.
    """
    done = list_complete(ckpt_root)
    if not done:
        return False
    last = done[-1].meta
    if (last.get("fingerprint"), last.get("data_fingerprint")) != (
        summary.get("fingerprint"),
        summary.get("data_fingerprint"),
    ):
        return False
    shutil.rmtree(ckpt_root)
    log.info("removed %s: the checkpoints of a finished run (%s)", ckpt_root, summary.get("fingerprint"))
    return True


def mark_complete(path: Path, meta: dict[str, Any]) -> None:
    """Write the ``COMPLETE`` marker atomically; call only after every rank has finished writing.

    The checkpoint's files are flushed to disk first and the marker after, so that even a power loss
    cannot leave a marker vouching for shards that never reached the disk (and ``prune``, which runs
    next, deletes the predecessor).
    """
    fsync_tree(path)
    tmp = path / (COMPLETE + ".tmp")
    tmp.write_text(json.dumps(meta, indent=2))
    tmp.replace(path / COMPLETE)
    fsync_path(path / COMPLETE)  # the marker itself, and its entry, before any predecessor is pruned
    fsync_path(path)


def prune(ckpt_root: Path, keep_last: int) -> None:
    """Delete torn checkpoints and all but the newest ``keep_last`` complete ones.

    Called only after a new checkpoint is complete, so a predecessor is never removed first.
    """
    done = list_complete(ckpt_root)
    keep = {c.path for c in done[-keep_last:]}
    for d in ckpt_root.iterdir() if ckpt_root.is_dir() else []:
        if _STEP_DIR.fullmatch(d.name) and d.is_dir() and d not in keep:
            shutil.rmtree(d, ignore_errors=True)


# ----------------------------------------------------------------------------------------------------
# RNG state of one rank
# ----------------------------------------------------------------------------------------------------


def rng_state() -> dict[str, Any]:
    """Every random generator this process draws from, in a form ``torch.load(weights_only=True)`` reads."""
    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": (np_state[0], torch.from_numpy(np_state[1].copy()), *np_state[2:]),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    kind, keys, *rest = state["numpy"]
    np.random.set_state((kind, keys.numpy(), *rest))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_rng(path: Path, rank: int) -> None:
    torch.save(rng_state(), path / f"rng_rank{rank}.pt")


def load_rng(path: Path, rank: int) -> None:
    f = path / f"rng_rank{rank}.pt"
    if not f.is_file():
        raise FileNotFoundError(f"{f} missing: the checkpoint was written with fewer ranks than this run has")
    set_rng_state(torch.load(f, weights_only=True))
