"""What decides each stage's result, as a key, and whether a result kept from an earlier run still holds.

    keys = stage_keys(cfg)                 # prepare/train/eval/merge/publish keys, before anything runs
    result = {..., "files": snapshot([adapter_dir, summary])}
    intact(result)                         # False once a file it names is gone or changed

A key is a hash of the content that determines the stage, never of names or paths: prepare by the data
bytes, tokenizer and options; train by the prepared-data fingerprint, the base model's identity and the
training settings; evaluate, merge and publish by their upstream keys and their own settings. Every key
also holds the code version (a hash of deltatune's sources). The orchestrator (tasks/_cache.py) keys
Prefect's persisted results with them (docs/caching.md).
"""

from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from core.config import ModelConfig, RunConfig
from core.data import source_fingerprint
from core.modeling import load_tokenizer, resolve_source
from core.run import code_version, digest, trajectory

log = logging.getLogger(__name__)

_CHUNK = 1 << 20


@dataclass(frozen=True)
class StageKeys:
    """The key of every stage of one run, plus the identities they were made from (for lineage)."""

    data_fingerprint: str
    model_identity: dict[str, Any]
    prepare: str
    train: str
    eval: str
    merge: str
    publish: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def stage_keys(cfg: RunConfig, *, node: int = 0) -> StageKeys:
    """Compute every stage key of ``cfg``: reads (hashes) the data and the base model's files, loads the
    tokenizer, trains nothing. ``node`` > 0 keys a multi-node run's other nodes apart: their prepare and
    train results are paths on their own disks and summaries without outputs."""
    data_fp = source_fingerprint(cfg.data, load_tokenizer(cfg.model))
    model = model_identity(cfg.model)
    code = code_version()["source_sha256"]
    # The reject threshold decides the verdict, not the data: in the stage's key, not the data fingerprint.
    verdict = {"max_reject_fraction": cfg.data.max_reject_fraction}
    prepare = digest({"stage": "prepare", "data": data_fp, "verdict": verdict, "code": code, "node": node})
    # The training trajectory without names and paths: the data enter as their content hash, the
    # base model as its identity.
    run = trajectory(cfg)
    run["data"] = run["model"]["name_or_path"] = run["model"]["storage_options"] = None
    train = digest(
        {"stage": "train", "data": data_fp, "model": model, "run": run, "code": code, "node": node}
    )
    merge = digest(
        {"stage": "merge", "train": train, "data": data_fp, "merge": cfg.merge.model_dump(mode="json")}
    )
    merges = cfg.method != "full" and cfg.merge.enabled
    ev = digest(
        {
            "stage": "eval",
            "train": train,
            "merge": merge if merges else None,  # the merged model is scored too
            "eval": cfg.eval.model_dump(mode="json", exclude={"batch_size"}),
            "forgetting": _location_identity(cfg.eval.forgetting_path),
        }
    )
    p = cfg.publish
    publish = digest(
        {
            "stage": "publish",
            "train": train,
            "eval": ev if cfg.eval.enabled else None,
            "merge": merge if merges else None,
            "store": p.store,
            "model": p.model_name or cfg.name,
            "version": p.version,
            "include": p.include,
            "code": code,
        }
    )
    return StageKeys(data_fp, model, prepare, train, ev, merge, publish)


# ----------------------------------------------------------------------------------------------------
# Identity of the base model
# ----------------------------------------------------------------------------------------------------


def model_identity(cfg: ModelConfig) -> dict[str, Any]:
    """What the base model *is*, not what it is called: the sha256 of its files for a local directory,
    a built-in model or an s3:// copy; the resolved commit for a hub id (the requested revision when
    the hub cannot be asked, e.g. offline)."""
    source = resolve_source(cfg.name_or_path, storage_options=cfg.storage_options)
    if Path(source).is_dir():
        return {"files": tree_digest(source)}
    return {"hub": cfg.name_or_path, "revision": _hub_commit(cfg.name_or_path, cfg.revision)}


def _hub_commit(repo_id: str, revision: str | None) -> str:
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes"):
        return revision or "main"
    try:
        from huggingface_hub import HfApi

        return HfApi().model_info(repo_id, revision=revision, timeout=10).sha or revision or "main"
    except Exception as e:  # offline, gated without a token: the name and revision are all we know
        log.info("could not resolve %s@%s on the hub (%s); keying by the revision name", repo_id, revision, e)
        return revision or "main"


def _location_identity(location: str | None) -> str | None:
    """A local file by its content; a remote one by its URI (read only when the stage runs)."""
    if location and Path(location).expanduser().is_file():
        return file_sha256(Path(location).expanduser())
    return location


def tree_digest(root: str | os.PathLike[str]) -> str:
    """A sha256 over every file under ``root`` (relative path and content), in sorted order."""
    root = Path(root)
    h = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        rel = path.relative_to(root).as_posix()
        if rel.startswith(".") or "/." in rel:  # caches' own markers and temp files
            continue
        h.update(rel.encode() + b"\0" + file_sha256(path).encode() + b"\0")
    return h.hexdigest()[:16]


def file_sha256(path: str | os.PathLike[str]) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


# ----------------------------------------------------------------------------------------------------
# Results that name files: still valid only while those files are
# ----------------------------------------------------------------------------------------------------


def snapshot(paths: list[str | os.PathLike[str] | None]) -> dict[str, list]:
    """``{absolute path: [size, mtime_ns, sha256]}`` of every file in ``paths`` (files or directories)."""
    out: dict[str, list] = {}
    for p in paths:
        if p is None:
            continue
        p = Path(p).resolve()
        files = [p] if p.is_file() else sorted(f for f in p.rglob("*") if f.is_file())
        for f in files:
            st = f.stat()
            out[str(f)] = [st.st_size, st.st_mtime_ns, file_sha256(f)]
    return out


def snapshot_bytes(files: dict[str, Any] | None, root: str | os.PathLike[str] | None) -> int | None:
    """Bytes under ``root`` per a stage's ``snapshot`` (None when the snapshot holds nothing there)."""
    if not files or not root:
        return None
    prefix = str(Path(root).resolve()).rstrip("/") + "/"
    sizes = [v[0] for p, v in files.items() if p.startswith(prefix)]
    return sum(sizes) if sizes else None


def intact(result: Any) -> bool:
    """Whether every file a stage result names (``result["files"]``, from ``snapshot``) is still there
    with the same content: same size, and the same sha256 unless its mtime is unchanged (re-hashing
    only what was touched keeps the check cheap for a multi-GB model)."""
    files = result.get("files") if isinstance(result, dict) else None
    if not isinstance(files, dict) or not files:
        return False
    for path, (size, mtime_ns, sha) in files.items():
        try:
            st = os.stat(path)
        except OSError:
            log.info("cached result names %s, which is gone", path)
            return False
        if st.st_size != size or (st.st_mtime_ns != mtime_ns and file_sha256(path) != sha):
            log.info("cached result names %s, which has changed since", path)
            return False
    return True
