"""Step checkpoints that become visible only when complete and intact, and the state to resume exactly.

Layout: ``<run>/checkpoints/step-000050/`` with a ``COMPLETE`` marker written by rank 0 after every rank
finished writing (DeepSpeed's own ``latest`` tag is written before that barrier: it proves nothing). The
marker lists every file of the checkpoint with its size (and sha256 up to ``HASH_MAX_BYTES``), so that a
file truncated or replaced after the marker is found before resuming, and the checkpoint before it used.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from core.errors import DeltatuneError
from core.fsutil import atomic_write, fsync_path, fsync_tree, read_json, write_json

log = logging.getLogger(__name__)

COMPLETE = "COMPLETE"
# Written into a complete checkpoint that failed to load, so that no attempt picks it again.
UNREADABLE = "UNREADABLE"
# Files up to this size are hashed as well as sized: RNG states, LoRA/QLoRA trainable weights and
# optimizer states of small models (sha256 runs at about 1.3 GB/s on the CI CPU: 12 ms for 16 MiB). The
# ZeRO shards of a real model are tens of GB: their size is checked, and a load failure catches the rest.
HASH_MAX_BYTES = 16 * 2**20
_STEP_DIR = re.compile(r"step-(\d{6,})")
_DAMAGED_SUFFIX = ".damaged"


class CheckpointMismatchError(DeltatuneError, ValueError):
    """A checkpoint in the run directory was written by a different training configuration or on other
    data; resuming from it would continue another run, so a retry would refuse it again."""

    retryable = False


class UnreadableCheckpointError(DeltatuneError, ValueError):
    """A complete checkpoint could not be loaded. It is marked ``UNREADABLE`` first, so a retry resumes
    from the checkpoint before it (or starts fresh when none is left)."""

    retryable = True


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
                meta = read_json(d / COMPLETE)
            except (json.JSONDecodeError, UnicodeDecodeError):
                log.warning("ignoring checkpoint %s: unreadable %s marker", d, COMPLETE)
                continue
            out.append(Checkpoint(int(m.group(1)), d, meta))
    return sorted(out, key=lambda c: c.step)


def latest_complete(
    ckpt_root: Path, fingerprint: str | None = None, data: str | None = None
) -> Checkpoint | None:
    """The newest complete checkpoint; raises if it was written by another configuration or on
    other training data (``data``: ``core.run.data_fingerprint`` of the split this run trains on).

    Its files are not checked here: :func:`newest_intact` picks the checkpoint to resume from.
    """
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


# ----------------------------------------------------------------------------------------------------
# Integrity: the marker lists what was written; a checkpoint resumes only if its files still match
# ----------------------------------------------------------------------------------------------------


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def file_manifest(path: Path) -> dict[str, dict[str, Any]]:
    """``{relative path: {"size": bytes, "sha256": hex}}`` of every file under ``path`` but the marker;
    files over ``HASH_MAX_BYTES`` get their size only."""
    files: dict[str, dict[str, Any]] = {}
    for f in sorted(path.rglob("*")):
        if not f.is_file() or f.parent == path and f.name in (COMPLETE, UNREADABLE):
            continue
        size = f.stat().st_size
        entry: dict[str, Any] = {"size": size}
        if size <= HASH_MAX_BYTES:
            entry["sha256"] = _sha256(f)
        files[f.relative_to(path).as_posix()] = entry
    return files


def verify(c: Checkpoint) -> str | None:
    """What is wrong with complete checkpoint ``c`` (a file missing, of another size or content, or an
    earlier failure to load it), or None when every file its marker lists matches."""
    note = c.path / UNREADABLE
    if note.is_file():
        return f"an earlier attempt could not load it ({note.read_text().strip()})"
    files = c.meta.get("files")
    if files is None:  # a marker written before markers listed files: nothing to compare against
        return None
    for rel, want in sorted(files.items()):
        f = c.path / rel
        if not f.is_file():
            return f"{rel} is missing"
        size = f.stat().st_size
        if size != want["size"]:
            return f"{rel} has {size} bytes, expected {want['size']}"
        digest = _sha256(f) if "sha256" in want else None
        if digest != want.get("sha256"):
            return f"{rel} has other content than was written (sha256 {digest[:12]}, expected {want['sha256'][:12]})"
    return None


def newest_intact(
    done: list[Checkpoint], *, report: bool = True
) -> tuple[Checkpoint | None, list[Checkpoint]]:
    """The newest of ``done`` (oldest first, as ``list_complete`` gives) whose files all match its
    marker, and the newer ones that do not, each reported with a warning (``report``) that names what
    is wrong and which checkpoint is used instead.

    Nothing is deleted here: a damaged checkpoint is removed only once a newer one is complete.
    """
    damaged: list[tuple[Checkpoint, str]] = []
    chosen = None
    for c in reversed(done):
        problem = verify(c)
        if problem is None:
            chosen = c
            break
        damaged.append((c, problem))
    if report:
        instead = (
            f"resuming from {chosen.path.name} instead"
            if chosen is not None
            else "no intact checkpoint is left, so training starts again from step 0"
        )
        for c, problem in damaged:
            log.warning(
                "checkpoint %s is damaged: %s; %s. It is deleted once a newer checkpoint is complete "
                "(copy it elsewhere first to inspect it); if this recurs, check the disk that holds "
                "output_dir (free space, I/O errors)",
                c.path,
                problem,
                instead,
            )
    return chosen, [c for c, _ in damaged]


def mark_unreadable(c: Checkpoint, error: BaseException) -> None:
    """Record in ``c`` that it failed to load, so that :func:`verify` rejects it from now on."""
    atomic_write(c.path / UNREADABLE, f"{type(error).__name__}: {error}\n")


def set_aside(path: Path) -> Path:
    """Rename a damaged checkpoint out of the way of a new one of the same step; ``prune`` deletes it
    once that new one is complete."""
    aside = path.with_name(f".{path.name}{_DAMAGED_SUFFIX}")
    shutil.rmtree(aside, ignore_errors=True)
    os.replace(path, aside)
    return aside


def mark_complete(path: Path, meta: dict[str, Any]) -> None:
    """Write the ``COMPLETE`` marker, listing every file of the checkpoint; call only after every
    rank has finished writing.

    The checkpoint's files are flushed to disk first and the marker after, so that even a power loss
    cannot leave a marker vouching for shards that never reached the disk (and ``prune``, which runs
    next, deletes the predecessor).
    """
    files = file_manifest(path)
    fsync_tree(path)
    write_json(path / COMPLETE, {**meta, "files": files})  # flushed, renamed in, its directory flushed
    fsync_path(path.parent)  # the step directory's own entry, before any predecessor is pruned


def prune(ckpt_root: Path, keep_last: int) -> None:
    """Delete torn checkpoints, damaged ones set aside, and all but the newest ``keep_last`` complete ones.

    Called only after a new checkpoint is complete, so a predecessor is never removed first.
    """
    done = list_complete(ckpt_root)
    keep = {c.path for c in done[-keep_last:]}
    for d in ckpt_root.iterdir() if ckpt_root.is_dir() else []:
        if not d.is_dir() or d in keep:
            continue
        if _STEP_DIR.fullmatch(d.name) or (d.name.startswith(".step-") and d.name.endswith(_DAMAGED_SUFFIX)):
            shutil.rmtree(d, ignore_errors=True)


def remove(checkpoints: list[Path]) -> None:
    """Delete damaged checkpoints (call once a newer one is complete)."""
    for path in checkpoints:
        if path.exists():
            shutil.rmtree(path, ignore_errors=True)
            log.info("removed damaged checkpoint %s", path)


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
