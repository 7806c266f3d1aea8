"""The prepare stage: validate, tokenise, split and cache by content hash (core.data's entry point)."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets

from core.config import DataConfig, cache_root
from core.data.encode import IGNORE_INDEX, Encoder, tokenizer_identity
from core.data.errors import DataError, Reject
from core.data.formats import FORMAT_FIELDS, TELLTALE
from core.data.packing import pack_split
from core.data.sources import Source, iter_rows, open_source
from core.data.templates import template_key
from core.fsutil import make_temp_dir, write_json
from core.run import PREPARE_REPORT

logger = logging.getLogger(__name__)

# Bump whenever the tokenised output for the same inputs changes: it is part of every cache key.
DATA_FORMAT_VERSION = 1
REPORT_NAME = PREPARE_REPORT
REJECT_WARN_FRACTION = 0.10


@dataclass
class PreparedData:
    """Paths and counts of a prepared dataset (plain values: safe to return from a Prefect task)."""

    train_dir: Path
    eval_dir: Path | None
    report_path: Path
    fingerprint: str
    num_train: int
    num_eval: int


def encode_rows(src: Source, cfg: DataConfig, tokenizer: Any) -> tuple[list[dict], dict[str, Any]]:
    """Validate and tokenise every row of ``src``; returns (kept records, per-file report)."""
    encoder = Encoder(cfg, tokenizer)
    kept: list[dict] = []
    rejected: dict[str, list[int]] = {}
    truncated: list[int] = []
    total = 0
    fields: set[str] = set()
    for line, row in iter_rows(src):
        total += 1
        if isinstance(row, dict) and len(fields) < 64:
            fields.update(map(str, row))
        try:
            if isinstance(row, Reject):
                raise row
            record, notes = encoder.encode(row, line)
        except Reject as r:
            rejected.setdefault(r.reason, []).append(line)
            continue
        record["source_line"] = line
        kept.append(record)
        if "truncated" in notes:
            truncated.append(line)
    report = {
        "source": src.name,
        "total": total,
        "kept": len(kept),
        "rejected": rejected,
        "rejected_counts": {k: len(v) for k, v in rejected.items()},
        "truncated": truncated,
        "fields": sorted(fields),  # keys seen in its rows, for the format hint of check_file
    }
    # A file with no usable row is never cached; the reject share is judged on every prepare (cache hit
    # or not) from the stored report, against the run's own data.max_reject_fraction.
    check_file(src.name, cfg.format, report, 1.0, warn=False)
    return kept, report


def check_file(name: str, fmt: str, report: dict[str, Any], max_reject: float, *, warn: bool = True) -> None:
    """Fail a file with no usable row, or with more than ``max_reject`` of its rows rejected; warn above
    REJECT_WARN_FRACTION. ``report``: the file's part of prepare_report.json (its ``fields``, the keys
    seen in its rows, suggest the format they look like)."""
    total, kept, rejected = report["total"], report["kept"], report["rejected"]
    fields = set(report.get("fields") or [])
    if total == 0:
        raise DataError(
            f"{name} is empty: no rows found. Format {fmt!r} expects rows with {FORMAT_FIELDS[fmt]}"
        )
    top = sorted(rejected.items(), key=lambda kv: -len(kv[1]))[:5]
    summary = "; ".join(
        f"{reason}: {len(lines)} row(s), e.g. line(s) {', '.join(map(str, lines[:5]))}"
        for reason, lines in top
    )
    if kept == 0:
        likely = [f for f, field in TELLTALE.items() if field in fields and f != fmt]
        hint = (
            f" The rows have a {TELLTALE[likely[0]]!r} field: set data.format={likely[0]}?" if likely else ""
        )
        raise DataError(
            f"{name}: all {total} rows were rejected ({summary}). Format {fmt!r} expects rows with "
            f"{FORMAT_FIELDS[fmt]}; fix the rows or set data.format / data.max_seq_len.{hint}"
        )
    if total - kept > max_reject * total:
        raise DataError(
            f"{name}: {total - kept} of {total} rows were rejected ({summary}), more than "
            f"data.max_reject_fraction={max_reject:g} allows; fix the rows, or raise data.max_reject_fraction "
            "to train on the rest"
        )
    if warn and total - kept > REJECT_WARN_FRACTION * total:
        logger.warning("%s: %d of %d rows rejected (%s)", name, total - kept, total, summary)


def _fingerprint(cfg: DataConfig, tokenizer_id: str, train: Source, eval_src: Source | None) -> str:
    # path/eval_path are left out on purpose: the same bytes under another name are the same data.
    key = {
        "version": DATA_FORMAT_VERSION,
        "train": [train.content_hash, train.file_kind],
        "eval": [eval_src.content_hash, eval_src.file_kind] if eval_src else None,
        "tokenizer": tokenizer_id,
        "config": cfg.model_dump(
            include={
                "format",
                "fields",
                "eval_fraction",
                "max_seq_len",
                "truncation",
                "mask_prompt",
                "add_eos",
                "system_prompt",
                "train_on_last_turn_only",
                "drop_duplicates",
                "decode_errors",
                "packing",
                "seed",
            }
        ),
        "chat_template": template_key(cfg),
    }
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()


def data_cache_dir(cfg: DataConfig, cache_dir: str | Path | None = None) -> Path:
    """Directory of tokenized splits: ``<cache_dir or cfg.cache_dir>/data``, else ``cache_root()/data``.

    Args:
        cfg: the data section; its ``cache_dir`` applies when ``cache_dir`` is not given.
        cache_dir: overrides ``cfg.cache_dir``; the default is ``$DELTATUNE_CACHE`` or ~/.cache/deltatune.
    """
    root = cache_dir or cfg.cache_dir
    return (Path(root).expanduser() if root else cache_root()) / "data"


def _split(records: list[dict], fraction: float, seed: int) -> tuple[list[dict], list[dict]]:
    """Deterministic split: a seeded shuffle of row positions; both parts keep file order."""
    n = len(records)
    if fraction <= 0 or n < 2:
        return records, []
    n_eval = min(n - 1, max(1, round(fraction * n)))
    order = list(range(n))
    random.Random(seed).shuffle(order)
    eval_idx = set(order[:n_eval])
    return [r for i, r in enumerate(records) if i not in eval_idx], [records[i] for i in sorted(eval_idx)]


def _dataset(records: list[dict]) -> datasets.Dataset:
    features = datasets.Features(
        {
            "input_ids": datasets.Sequence(datasets.Value("int32")),
            "labels": datasets.Sequence(datasets.Value("int32")),
            "prompt": datasets.Value("string"),
            "reference": datasets.Value("string"),
            "prompt_len": datasets.Value("int32"),
            "source_line": datasets.Value("int32"),
        }
    )
    columns = {name: [r[name] for r in records] for name in features}
    return datasets.Dataset.from_dict(columns, features=features)


def _save(ds: datasets.Dataset, path: Path) -> None:
    quiet = datasets.utils.are_progress_bars_disabled()
    datasets.utils.disable_progress_bars()  # one bar per split is noise in task logs
    try:
        ds.save_to_disk(str(path))
    finally:
        if not quiet:
            datasets.utils.enable_progress_bars()


def _build(cfg: DataConfig, tokenizer: Any, train_src: Source, eval_src: Source | None, dest: Path) -> None:
    """Tokenise into a temp dir beside ``dest`` and move it into place atomically."""
    records, report = encode_rows(train_src, cfg, tokenizer)
    eval_report = None
    if eval_src is not None:
        train, (evals, eval_report) = records, encode_rows(eval_src, cfg, tokenizer)
    else:
        train, evals = _split(records, cfg.eval_fraction, cfg.seed)
        if cfg.eval_fraction > 0 and not evals:
            logger.warning("%s: only %d usable row(s), no eval split made", train_src.name, len(records))
    report.update(
        {
            "format": cfg.format,
            "max_seq_len": cfg.max_seq_len,
            "train": len(train),
            "eval": len(evals),
            "eval_source": eval_report,
            "train_tokens": sum(len(r["input_ids"]) for r in train),
            "train_trained_tokens": sum(sum(x != IGNORE_INDEX for x in r["labels"]) for r in train),
        }
    )
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = make_temp_dir(dest.parent, f".tmp-{dest.name[:12]}-")  # not mkdtemp's 0700: a shared cache
    try:
        train_ds = _dataset(train)
        if cfg.packing:  # the eval split stays one row per sequence: it is scored and generated row by row
            train_ds, report["packing"] = pack_split(train_ds, cfg.max_seq_len, cfg.seed)
        _save(train_ds, tmp / "train")
        if evals:
            _save(_dataset(evals), tmp / "eval")
        write_json(tmp / REPORT_NAME, report)  # after packing: it adds its statistics
        try:
            os.replace(tmp, dest)
        except OSError:
            if not (dest / REPORT_NAME).is_file():  # a concurrent writer won the race: theirs is equal
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _open_sources(cfg: DataConfig, tokenizer: Any) -> tuple[Source, Source | None, str]:
    if cfg.add_eos and tokenizer.eos_token_id is None:
        raise DataError(
            "data.add_eos is true but the tokenizer has no eos_token; set one or data.add_eos=false"
        )
    train_src = open_source(cfg.path, cfg.storage_options)
    eval_src = open_source(cfg.eval_path, cfg.storage_options) if cfg.eval_path else None
    return train_src, eval_src, _fingerprint(cfg, tokenizer_identity(tokenizer), train_src, eval_src)


def source_fingerprint(cfg: DataConfig, tokenizer: Any) -> str:
    """The fingerprint ``prepare_dataset`` gives these sources with this tokenizer and these options:
    the sources are read and hashed, nothing is tokenised (the prepare stage's cache key).

    Raises:
        DataError: a source is missing or unreadable.
    """
    return _open_sources(cfg, tokenizer)[2]


def prepare_dataset(
    cfg: DataConfig, tokenizer: Any, out_dir: str | Path, *, cache_dir: str | Path | None = None
) -> PreparedData:
    """Validate, tokenise and split ``cfg.path`` (and ``cfg.eval_path``), reusing the content-hash cache.

    The splits are built once per fingerprint under ``data_cache_dir(cfg, cache_dir)/<fingerprint>/`` and
    copied into ``out_dir`` (``train/``, ``eval/``, ``prepare_report.json``) so a run directory is
    self-contained.

    Args:
        cfg: the data section of the run config.
        tokenizer: a transformers tokenizer (fast or slow); needs ``eos_token_id`` when ``cfg.add_eos``.
        out_dir: the run's data directory.
        cache_dir: overrides ``cfg.cache_dir`` / ``$DELTATUNE_CACHE`` / ``~/.cache/deltatune``.

    Returns:
        PreparedData with the split directories in ``out_dir``, the fingerprint and the row counts.

    Raises:
        DataError: a source is missing, unreadable or empty, or every row of it was rejected.
    """
    train_src, eval_src, fingerprint = _open_sources(cfg, tokenizer)
    cached = data_cache_dir(cfg, cache_dir) / fingerprint
    hit = (cached / REPORT_NAME).is_file()
    if hit:
        logger.info("data cache hit %s (%s)", fingerprint[:12], cached)
    else:
        if cached.exists():  # no report: left by something other than _build; rebuild it
            shutil.rmtree(cached)
        logger.info("tokenising %s -> %s", cfg.path, cached)
        _build(cfg, tokenizer, train_src, eval_src, cached)

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for split in ("train", "eval"):
        shutil.rmtree(out / split, ignore_errors=True)
        if (cached / split).is_dir():
            shutil.copytree(cached / split, out / split)
    report = json.loads((cached / REPORT_NAME).read_text())
    report.update(
        {"source": cfg.path, "fingerprint": fingerprint, "cache_hit": hit, "cache_path": str(cached)}
    )
    if report.get("eval_source"):
        report["eval_source"]["source"] = cfg.eval_path
    report_path = write_json(out / REPORT_NAME, report)
    # Every prepare judges the reject share, cache hit or not (the threshold is not in the cache key).
    check_file(cfg.path, cfg.format, report, cfg.max_reject_fraction)
    if report.get("eval_source"):
        check_file(cfg.eval_path, cfg.format, report["eval_source"], cfg.max_reject_fraction)
    logger.info(
        "prepared %s: %d train / %d eval rows, %d rejected",
        cfg.path,
        report["train"],
        report["eval"],
        report["total"] - report["kept"],
    )
    return PreparedData(
        train_dir=out / "train",
        eval_dir=out / "eval" if (out / "eval").is_dir() else None,
        report_path=report_path,
        fingerprint=fingerprint,
        num_train=report["train"],
        num_eval=report["eval"],
    )
