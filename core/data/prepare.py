"""The prepare stage: read sources streaming, tokenise in parallel into Arrow shards, validate, dedupe, mix,
split and cache by content hash (core.data's entry point); docs/data.md describes the report."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import multiprocessing
import os
import random
import shutil
from array import array
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import pyarrow as pa
from datasets.arrow_writer import ArrowWriter

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
DATA_FORMAT_VERSION = 2
REPORT_NAME = PREPARE_REPORT
REJECT_WARN_FRACTION = 0.10
# Lines kept per reason and note in the report (the counts stay exact): a 1M-row report stays small.
LINES_CAP = 100
BATCH = 1000  # rows per tokenisation batch and per Arrow record batch: peak memory is bounded by it
SMALL_INPUT_ROWS = 20_000  # below this, data.num_proc=None tokenises in-process (forking costs more)
MAX_AUTO_PROC = 8
SHARD_ROWS = 10_000  # rows per Arrow shard: the unit of work of one tokenising process

SPLIT_FEATURES = datasets.Features(
    {
        "input_ids": datasets.Sequence(datasets.Value("int32")),
        "labels": datasets.Sequence(datasets.Value("int32")),
        "prompt": datasets.Value("string"),
        "reference": datasets.Value("string"),
        "prompt_len": datasets.Value("int32"),
        "source_line": datasets.Value("int32"),
    }
)
RAW_FEATURES = datasets.Features(
    {
        "source_line": datasets.Value("int32"),
        "row": datasets.Value("string"),  # the row as JSON ("" for a line that could not be read)
        "reject": datasets.Value("string"),  # "" or the reason the source reader gave
        "notes": datasets.Sequence(datasets.Value("string")),
    }
)
ENCODED_FEATURES = datasets.Features(
    {
        **SPLIT_FEATURES,
        "reject": datasets.Value("string"),
        "notes": datasets.Sequence(datasets.Value("string")),
        "key": datasets.Value("string"),  # content hash after whitespace normalisation (dedupe, overlap)
        "n_tokens": datasets.Value("int32"),
        "n_trained": datasets.Value("int32"),
    }
)


@dataclass
class PreparedData:
    """Paths and counts of a prepared dataset (plain values: safe to return from a Prefect task)."""

    train_dir: Path
    eval_dir: Path | None
    report_path: Path
    fingerprint: str
    num_train: int
    num_eval: int


@dataclass
class Part:
    """One source of the run as the prepare stage reads it: data.path, one of data.sources, or eval_path."""

    src: Source
    fmt: str
    fields: dict[str, str]
    weight: float | None = None
    rows: int | None = None
    index: int = 0
    setting: str = "data.path"  # the config key that names it, for messages

    def key(self) -> list[Any]:
        return [self.src.content_hash, self.src.file_kind, self.fmt, self.fields, self.weight, self.rows]


@dataclass
class Plan:
    train: list[Part]
    eval: Part | None
    fingerprint: str
    mixture: bool = False


# ----------------------------------------------------------------------------------------------------
# Tokenisation: rows -> Arrow shards, in parallel
# ----------------------------------------------------------------------------------------------------


def _normalise(value: Any) -> Any:
    if isinstance(value, str):
        return " ".join(value.split())
    if isinstance(value, dict):
        return {str(k): _normalise(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_normalise(v) for v in value]
    return value


def content_key(row: Any) -> str:
    """The dedupe key of a row: a hash of its content with every run of whitespace made one space."""
    text = json.dumps(_normalise(row), sort_keys=True, default=str)  # ASCII: lone surrogates are escaped
    return hashlib.blake2b(text.encode(), digest_size=8).hexdigest()  # 1M rows: ~3e-8 odds of a collision


class EncodeBatch:
    """Raw rows (a batch of RAW_FEATURES columns) -> records (ENCODED_FEATURES columns); one per worker.
    The batch's rows are tokenised together (``Encoder.encode_batch``): one tokenizer call per batch."""

    def __init__(self, encoder: Encoder):
        self.encoder = encoder

    def __call__(self, batch: dict[str, list]) -> dict[str, list]:
        out: dict[str, list] = {name: [] for name in ENCODED_FEATURES}
        lines, rejects, notes = batch["source_line"], list(batch["reject"]), [list(n) for n in batch["notes"]]
        keys = [""] * len(lines)
        records: list[dict[str, Any] | None] = [None] * len(lines)  # None: rejected (no tokens)
        todo = [i for i, reject in enumerate(rejects) if not reject]  # the rows the source reader kept
        rows = [json.loads(batch["row"][i]) for i in todo]
        results = self.encoder.encode_batch([(row, lines[i]) for i, row in zip(todo, rows, strict=True)])
        for i, row, result in zip(todo, rows, results, strict=True):
            keys[i] = content_key(row)
            if isinstance(result, Reject):
                rejects[i] = result.reason
            else:
                records[i], more = result
                notes[i] += more
        for line, record, reject, note, key in zip(lines, records, rejects, notes, keys, strict=True):
            if record is None:
                record = {"input_ids": [], "labels": [], "prompt": "", "reference": "", "prompt_len": 0}
            for name in SPLIT_FEATURES:
                if name != "source_line":
                    out[name].append(record[name])
            out["source_line"].append(line)
            out["reject"].append(reject)
            out["notes"].append(note)
            out["key"].append(key)
            out["n_tokens"].append(len(record["input_ids"]))
            out["n_trained"].append(sum(x != IGNORE_INDEX for x in record["labels"]))
        return out


def _read_batches(path: Path, columns: list[str] | None = None) -> Iterator[pa.RecordBatch]:
    """The record batches of an Arrow stream file, read (not memory-mapped: a 1M-row file does not stay
    resident in the process), one at a time."""
    with pa.OSFile(str(path)) as f:
        for rb in pa.ipc.open_stream(f):
            yield rb.select(columns) if columns else rb


def _write_raw(part: Part, cfg: DataConfig, work: Path, tag: str) -> tuple[list[Path], int, list[str]]:
    """Stream the rows of ``part`` into Arrow shards of SHARD_ROWS rows (record batches of BATCH rows);
    returns (shard paths, rows, field names seen)."""
    fields: set[str] = set()
    shards: list[Path] = []
    total = 0
    writer: ArrowWriter | None = None
    cols: dict[str, list] = {name: [] for name in RAW_FEATURES}

    def flush() -> None:
        nonlocal cols
        if cols["row"] and writer is not None:
            writer.write_batch(cols)
        cols = {name: [] for name in RAW_FEATURES}

    for line, row, notes in iter_rows(part.src, cfg.decode_errors):
        if writer is None:
            shards.append(work / f"{tag}-raw-{len(shards):05d}.arrow")
            writer = ArrowWriter(features=RAW_FEATURES, path=str(shards[-1]), writer_batch_size=BATCH)
        total += 1
        if isinstance(row, dict) and len(fields) < 64:
            fields.update(map(str, row))
        reject = row.reason if isinstance(row, Reject) else ""
        cols["source_line"].append(line)
        cols["row"].append("" if reject else json.dumps(row, default=str))
        cols["reject"].append(reject)
        cols["notes"].append(list(notes))
        if len(cols["row"]) == BATCH:
            flush()
        if total % SHARD_ROWS == 0:
            flush()
            writer.finalize()
            writer.close()
            writer = None
    if writer is not None:
        flush()
        writer.finalize()
        writer.close()
    return shards, total, sorted(fields)


_WORKER: list[EncodeBatch] = []


def _init_worker(fn: EncodeBatch) -> None:
    _WORKER[:] = [fn]


def _encode_shard(paths: tuple[str, str]) -> str:
    """Tokenise one raw shard into an encoded shard (in a worker process, or in-process)."""
    raw, out = paths
    with ArrowWriter(features=ENCODED_FEATURES, path=out, writer_batch_size=BATCH) as writer:
        for rb in _read_batches(Path(raw)):
            writer.write_batch(_WORKER[0](rb.to_pydict()))
        writer.finalize()
    return out


def num_proc_for(cfg: DataConfig, rows: int) -> int:
    """data.num_proc, or by size: 1 under SMALL_INPUT_ROWS rows, else min(cpus, 8)."""
    if cfg.num_proc is not None:
        return cfg.num_proc
    return 1 if rows < SMALL_INPUT_ROWS else max(1, min(os.cpu_count() or 1, MAX_AUTO_PROC))


def encode_rows(part: Part, cfg: DataConfig, tokenizer: Any, work: Path) -> tuple[list[Path], dict[str, Any]]:
    """Read ``part`` streaming into raw Arrow shards, then tokenise the shards in ``num_proc_for``
    processes (shard by shard, in file order whatever their number: the same bytes for any num_proc).

    Returns:
        The encoded shard paths (every row, with its reject reason and notes) and the source's report
        without the counts (see ``_scan``): rows, field names seen, processes used.
    """
    raw, total, fields = _write_raw(part, cfg, work, f"part{part.index}")
    fn = EncodeBatch(Encoder(cfg, tokenizer, part.fmt, part.fields))
    nproc = min(num_proc_for(cfg, total), len(raw))
    tasks = [(str(p), str(p).replace("-raw-", "-encoded-")) for p in raw]
    if nproc > 1:
        # The platform's start method (fork on Linux: the workers share the caller's pages instead of
        # importing torch again; measured in bench/prepare.py). imap keeps the shards' order; the encoder
        # (it pickles with its tokenizer where workers are spawned) goes to each worker once.
        with multiprocessing.get_context().Pool(nproc, initializer=_init_worker, initargs=(fn,)) as pool:
            encoded = [Path(p) for p in pool.imap(_encode_shard, tasks)]
    else:
        _init_worker(fn)
        encoded = [Path(_encode_shard(t)) for t in tasks]
    _WORKER.clear()
    for p in raw:
        p.unlink()
    return encoded, {"total": total, "fields": fields, "num_proc": nproc}


@dataclass
class Rows:
    """The usable rows of one source, in file order (numpy arrays: a 1M-row source takes ~28 MB): where
    each is among the source's encoded rows, its content key, line and token counts."""

    pos: np.ndarray
    key: np.ndarray
    line: np.ndarray
    n_tokens: np.ndarray
    n_trained: np.ndarray

    def __len__(self) -> int:
        return len(self.pos)

    def subset(self, mask: np.ndarray) -> Rows:
        return Rows(*(getattr(self, f.name)[mask] for f in dataclasses.fields(self)))


SCAN_COLUMNS = ["source_line", "reject", "notes", "key", "n_tokens", "n_trained"]


def _scan(encoded: list[Path], part: Part, counts: dict[str, Any]) -> tuple[dict[str, Any], Rows]:
    """Count rejects and notes by reason (lines capped at LINES_CAP), in one pass over the shards;
    returns the source's report and its usable rows."""
    rejected: dict[str, list[int]] = {}
    rejected_counts: dict[str, int] = {}
    notes: dict[str, list[int]] = {}
    note_counts: dict[str, int] = {}
    cols = {
        "pos": array("q"),
        "key": array("Q"),
        "line": array("i"),
        "n_tokens": array("i"),
        "n_trained": array("i"),
    }
    pos = -1
    for path in encoded:
        for rb in _read_batches(path, SCAN_COLUMNS):
            b = rb.to_pydict()
            for line, reject, row_notes, key, n_tok, n_train in zip(
                *(b[c] for c in SCAN_COLUMNS), strict=True
            ):
                pos += 1
                if reject:
                    rejected_counts[reject] = rejected_counts.get(reject, 0) + 1
                    lines = rejected.setdefault(reject, [])
                    if len(lines) < LINES_CAP:
                        lines.append(line)
                    continue
                for note in row_notes:
                    note_counts[note] = note_counts.get(note, 0) + 1
                    lines = notes.setdefault(note, [])
                    if len(lines) < LINES_CAP:
                        lines.append(line)
                cols["pos"].append(pos)
                cols["key"].append(int(key, 16))
                cols["line"].append(line)
                cols["n_tokens"].append(n_tok)
                cols["n_trained"].append(n_train)
    rows = Rows(**{name: np.frombuffer(values, dtype=values.typecode) for name, values in cols.items()})
    total = counts["total"]
    report = {
        "source": part.src.name,
        "format": part.fmt,
        "total": total,
        "kept": total - sum(rejected_counts.values()),
        "rejected": rejected,
        "rejected_counts": rejected_counts,
        "notes": notes,
        "note_counts": note_counts,
        "truncated": notes.get("truncated", []),  # also under notes; kept for readers of the old report
        "fields": counts["fields"],  # keys seen in its rows, for the format hint of check_file
        "num_proc": counts["num_proc"],
    }
    return report, rows


def _dedupe(rows: list[Rows], reports: list[dict[str, Any]], drop: bool) -> list[Rows]:
    """Count the rows whose content key an earlier row (of any source) has, in each source's report
    (lines capped at LINES_CAP); leave them out when ``drop``."""
    keys = np.concatenate([r.key for r in rows])
    _, first = np.unique(keys, return_index=True)  # index of each key's first occurrence
    dup = np.ones(len(keys), dtype=bool)
    dup[first] = False
    out, start = [], 0
    for r, report in zip(rows, reports, strict=True):
        d = dup[start : start + len(r)]
        start += len(r)
        report.update({"duplicate_count": int(d.sum()), "duplicates": r.line[d][:LINES_CAP].tolist()})
        out.append(r.subset(~d) if drop else r)
    return out


# ----------------------------------------------------------------------------------------------------
# Checks: run on every prepare, cache hit or not, from the stored report
# ----------------------------------------------------------------------------------------------------


def check_file(name: str, fmt: str, report: dict[str, Any], max_reject: float, *, warn: bool = True) -> None:
    """Fail a file with no usable row, or with more than ``max_reject`` of its rows rejected; warn above
    REJECT_WARN_FRACTION. ``report``: the file's part of prepare_report.json (its ``fields``, the keys
    seen in its rows, suggest the format they look like)."""
    total, kept, rejected = report["total"], report["kept"], report["rejected"]
    counts = report.get("rejected_counts") or {k: len(v) for k, v in rejected.items()}
    fields = set(report.get("fields") or [])
    if total == 0:
        raise DataError(
            f"{name} is empty: no rows found. Format {fmt!r} expects rows with {FORMAT_FIELDS[fmt]}"
        )
    top = sorted(counts.items(), key=lambda kv: -kv[1])[:5]
    summary = "; ".join(
        f"{reason}: {n} row(s), e.g. line(s) {', '.join(map(str, rejected.get(reason, [])[:5]))}"
        for reason, n in top
    )
    if kept == 0:
        likely = [f for f, field_name in TELLTALE.items() if field_name in fields and f != fmt]
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


def _part_reports(report: dict[str, Any]) -> list[dict[str, Any]]:
    return list(report["sources"]) if "sources" in report else [report]


def check_report(report: dict[str, Any], max_reject: float, *, warn: bool = True) -> None:
    """Every verdict on whether the run may go on, from a prepare report (fresh or from the cache): each
    source's reject share and usable rows, an empty training set, an eval set that is the training set.

    Raises:
        DataError: saying what was found and what to set.
    """
    for part in _part_reports(report):
        check_file(part["source"], part["format"], part, max_reject, warn=warn)
    if report.get("eval_source"):
        ev = report["eval_source"]
        check_file(ev["source"], ev["format"], ev, max_reject, warn=warn)
    if report.get("train", 0) == 0:
        raise DataError(
            f"no training rows are left ({report.get('duplicate_count', 0)} duplicate(s) dropped, "
            f"{report.get('eval', 0)} eval row(s)); set data.drop_duplicates=false, lower data.eval_fraction "
            "or add rows"
        )
    overlap = report.get("eval_overlap") or {}
    if report.get("eval_source") and report["eval"] and overlap.get("count", 0) >= report["eval"]:
        raise DataError(
            f"every one of the {report['eval']} eval rows of {report['eval_source']['source']} also occurs in "
            "the training data: the eval set is the training set and would measure nothing. Point "
            "data.eval_path at held-out rows, or unset it to hold out data.eval_fraction of the training data"
        )
    if not warn:
        return
    counts = report.get("note_counts") or {}
    if counts.get("truncated"):
        logger.warning(
            "%d row(s) were truncated to data.max_seq_len=%s (%d lost their EOS), e.g. line(s) %s; raise "
            "data.max_seq_len or set data.truncation=drop",
            counts["truncated"],
            report.get("max_seq_len"),
            counts.get("lost_eos", 0),
            ", ".join(map(str, (report.get("notes") or {}).get("truncated", [])[:5])),
        )
    if report.get("duplicate_count"):
        logger.warning(
            "%d duplicate row(s) (same content up to whitespace), e.g. line(s) %s; %s",
            report["duplicate_count"],
            ", ".join(map(str, report.get("duplicates", [])[:5])),
            "dropped"
            if report.get("duplicates_dropped")
            else "kept: set data.drop_duplicates=true to drop them",
        )
    if overlap.get("count"):
        logger.warning(
            "%d of %d eval row(s) also occur in the training data (e.g. eval line(s) %s): eval loss "
            "overstates generalisation; set data.drop_duplicates=true or use held-out rows",
            overlap["count"],
            report["eval"],
            ", ".join(map(str, overlap.get("lines", [])[:5])),
        )


# ----------------------------------------------------------------------------------------------------
# Sources, fingerprint, cache
# ----------------------------------------------------------------------------------------------------


def _fingerprint(cfg: DataConfig, tokenizer_id: str, plan: Plan) -> str:
    # Paths are left out on purpose: the same bytes under another name are the same data.
    key = {
        "version": DATA_FORMAT_VERSION,
        "eval": plan.eval.key() if plan.eval else None,
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
    if plan.mixture:
        key["sources"] = [p.key() for p in plan.train]
    else:
        key["train"] = [plan.train[0].src.content_hash, plan.train[0].src.file_kind]
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()


def data_cache_dir(cfg: DataConfig, cache_dir: str | Path | None = None) -> Path:
    """Directory of tokenized splits: ``<cache_dir or cfg.cache_dir>/data``, else ``cache_root()/data``.

    Args:
        cfg: the data section; its ``cache_dir`` applies when ``cache_dir`` is not given.
        cache_dir: overrides ``cfg.cache_dir``; the default is ``$DELTATUNE_CACHE`` or ~/.cache/deltatune.
    """
    root = cache_dir or cfg.cache_dir
    return (Path(root).expanduser() if root else cache_root()) / "data"


def _plan(cfg: DataConfig, tokenizer: Any) -> Plan:
    if cfg.add_eos and tokenizer.eos_token_id is None:
        raise DataError(
            "data.add_eos is true but the tokenizer has no eos_token; set one or data.add_eos=false"
        )
    if cfg.sources:
        train = [
            Part(
                open_source(s.path, cfg.storage_options, f"data.sources[{i}].path"),
                s.format or cfg.format,
                # data.fields applies to the sources of data.format that have no fields of their own
                dict(s.fields or (cfg.fields if (s.format or cfg.format) == cfg.format else {})),
                s.weight,
                s.rows,
                i,
                f"data.sources[{i}]",
            )
            for i, s in enumerate(cfg.sources)
        ]
    else:
        train = [Part(open_source(cfg.path, cfg.storage_options, "data.path"), cfg.format, dict(cfg.fields))]
    eval_part = None
    if cfg.eval_path:
        eval_src = open_source(cfg.eval_path, cfg.storage_options, "data.eval_path")
        eval_part = Part(eval_src, cfg.format, dict(cfg.fields), index=len(train), setting="data.eval_path")
    plan = Plan(train, eval_part, "", mixture=bool(cfg.sources))
    plan.fingerprint = _fingerprint(cfg, tokenizer_identity(tokenizer), plan)
    return plan


def source_fingerprint(cfg: DataConfig, tokenizer: Any) -> str:
    """The fingerprint ``prepare_dataset`` gives these sources with this tokenizer and these options:
    the sources are read and hashed in chunks, nothing is parsed or tokenised (the prepare stage's cache key).

    Raises:
        DataError: a source is missing or unreadable.
    """
    return _plan(cfg, tokenizer).fingerprint


def _same_bytes_check(plan: Plan) -> None:
    if plan.eval is None:
        return
    for part in plan.train:
        if part.src.content_hash == plan.eval.src.content_hash:
            raise DataError(
                f"data.eval_path {plan.eval.src.name} holds the same bytes as {part.setting} {part.src.name}: "
                "the eval set is the training set and would measure nothing. Point data.eval_path at "
                "held-out rows, or unset it to hold out data.eval_fraction of the training data"
            )


# ----------------------------------------------------------------------------------------------------
# Build: encode, dedupe, mix, split, save
# ----------------------------------------------------------------------------------------------------


def _split_positions(n: int, fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Deterministic split: a seeded shuffle of row positions; both parts keep their order."""
    if fraction <= 0 or n < 2:
        return list(range(n)), []
    n_eval = min(n - 1, max(1, round(fraction * n)))
    order = list(range(n))
    random.Random(seed).shuffle(order)
    eval_idx = sorted(order[:n_eval])
    taken = set(eval_idx)
    return [i for i in range(n) if i not in taken], eval_idx


def _mix(cfg: DataConfig, parts: list[Part], rows: list[Rows]) -> tuple[np.ndarray, np.ndarray]:
    """The training pool as (source index, usable-row index) pairs: one source as it is; several by rows
    (a seeded sample of each), by weight (datasets.interleave_datasets by seed, stopping when a source
    runs out: no row repeats) or all rows of each."""
    if parts[0].rows is not None:
        which, idx = [], []
        for i, (part, r) in enumerate(zip(parts, rows, strict=True)):
            assert part.rows is not None
            if len(r) < part.rows:
                raise DataError(
                    f"{part.setting} ({part.src.name}) has {len(r)} usable row(s), fewer than its rows="
                    f"{part.rows}; lower {part.setting}.rows, or give the sources weights instead"
                )
            order = list(range(len(r)))
            random.Random(f"{cfg.seed}:{part.index}").shuffle(order)
            which.append(np.full(part.rows, i, dtype=np.int64))
            idx.append(np.sort(np.asarray(order[: part.rows], dtype=np.int64)))
        return np.concatenate(which), np.concatenate(idx)
    if len(parts) > 1 and parts[0].weight is not None:
        # Only the (source, row) pairs are interleaved, in memory: the rows stay in their shards.
        pools = [
            datasets.Dataset.from_dict({"s": np.full(len(r), i, dtype=np.int64), "j": np.arange(len(r))})
            for i, r in enumerate(rows)
        ]
        total = sum(p.weight or 0.0 for p in parts)
        mixed = datasets.interleave_datasets(
            pools,
            probabilities=[(p.weight or 0.0) / total for p in parts],
            seed=cfg.seed,
            stopping_strategy="first_exhausted",
        ).with_format("numpy")
        return np.asarray(mixed["s"], dtype=np.int64), np.asarray(mixed["j"], dtype=np.int64)
    which = np.concatenate([np.full(len(r), i, dtype=np.int64) for i, r in enumerate(rows)])
    return which, np.concatenate([np.arange(len(r), dtype=np.int64) for r in rows])


class _Cursor:
    """Forward-only random access to the rows of one source's encoded shards (one batch in memory)."""

    def __init__(self, files: list[Path]):
        self.batches = (rb for f in files for rb in _read_batches(f, list(SPLIT_FEATURES)))
        self.start, self.rb = 0, None

    def get(self, pos: int) -> tuple[pa.RecordBatch, int]:
        while self.rb is None or pos >= self.start + self.rb.num_rows:
            if self.rb is not None:
                self.start += self.rb.num_rows
            self.rb = next(self.batches)
        return self.rb, pos - self.start


def _write_split(
    files: list[list[Path]],
    rows: list[Rows],
    which: np.ndarray,
    idx: np.ndarray,
    dest: Path,
    fingerprint: str,
) -> None:
    """Write the rows ``(which[k], idx[k])`` as a saved dataset (``datasets.load_from_disk`` layout) in
    record batches of BATCH rows, reading the shards as a stream: memory stays at a few batches."""
    dest.mkdir(parents=True)
    arrow = dest / "data-00000-of-00001.arrow"
    cursors = [_Cursor(f) for f in files]
    with ArrowWriter(features=SPLIT_FEATURES, path=str(arrow), writer_batch_size=BATCH) as writer:
        for start in range(0, len(which), BATCH):
            # Take each run of rows from its batch as soon as the run ends: a sparse selection (an eval
            # split) would otherwise hold every batch it touches.
            pieces: list[pa.RecordBatch] = []
            run_rb, run_ix = None, []
            for s, j in zip(
                which[start : start + BATCH].tolist(), idx[start : start + BATCH].tolist(), strict=True
            ):
                rb, local = cursors[s].get(int(rows[s].pos[j]))
                if rb is not run_rb:
                    if run_rb is not None:
                        pieces.append(run_rb.take(pa.array(run_ix)))
                    run_rb, run_ix = rb, []
                run_ix.append(local)
            assert run_rb is not None
            pieces.append(run_rb.take(pa.array(run_ix)))
            del run_rb
            writer.write_table(pa.Table.from_batches(pieces))
        writer.finalize()
    # The two files Dataset.save_to_disk writes beside its data (datasets/arrow_dataset.py, save_to_disk).
    info = dataclasses.asdict(datasets.Dataset.from_file(str(arrow)).info)
    state = {
        "_data_files": [{"filename": arrow.name}],
        "_fingerprint": hashlib.sha256(f"{fingerprint}:{dest.name}".encode()).hexdigest()[:16],
        "_format_columns": None,
        "_format_kwargs": {},
        "_format_type": None,
        "_output_all_columns": False,
        "_split": None,
    }
    (dest / datasets.config.DATASET_STATE_JSON_FILENAME).write_text(
        json.dumps(state, indent=2, sort_keys=True)
    )
    (dest / datasets.config.DATASET_INFO_FILENAME).write_text(
        json.dumps({k: info[k] for k in sorted(info)}, indent=2)
    )


def _build(cfg: DataConfig, tokenizer: Any, plan: Plan, dest: Path, report: dict[str, Any]) -> None:
    """Tokenise into a temp dir beside ``dest`` and move it into place atomically; ``report`` is filled as
    the build goes (a failed build's report says how far it got)."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = make_temp_dir(dest.parent, f".tmp-{dest.name[:12]}-")  # not mkdtemp's 0700: a shared cache
    work = tmp / "work"  # every intermediate Arrow file: never under ~/.cache/huggingface
    work.mkdir()
    try:
        files, rows, part_reports = [], [], []
        for part in plan.train:
            encoded, counts = encode_rows(part, cfg, tokenizer, work)
            part_report, part_rows = _scan(encoded, part, counts)
            if plan.mixture:
                part_report.update({"fields_mapped": part.fields, "weight": part.weight, "rows": part.rows})
                report.setdefault("sources", []).append(part_report)
            else:
                report.update(part_report)
            check_file(part.src.name, part.fmt, part_report, 1.0, warn=False)  # no usable row: never cached
            files.append(encoded)
            rows.append(part_rows)
            part_reports.append(part_report)
        rows = _dedupe(rows, part_reports, cfg.drop_duplicates)
        if not plan.mixture:
            report.update(part_reports[0])
        which, idx = _mix(cfg, plan.train, rows)

        eval_files, eval_rows, eval_report = None, None, None
        if plan.eval is not None:
            eval_files, counts = encode_rows(plan.eval, cfg, tokenizer, work)
            eval_report, eval_rows = _scan(eval_files, plan.eval, counts)
            (eval_rows,) = _dedupe([eval_rows], [eval_report], cfg.drop_duplicates)
            report["eval_source"] = eval_report
            check_file(plan.eval.src.name, plan.eval.fmt, eval_report, 1.0, warn=False)
            train = (which, idx)
            evals = (np.zeros(len(eval_rows), dtype=np.int64), np.arange(len(eval_rows), dtype=np.int64))
        else:
            train_pos, eval_pos = _split_positions(len(which), cfg.eval_fraction, cfg.seed)
            train = (which[train_pos], idx[train_pos]) if eval_pos else (which, idx)
            evals = (which[eval_pos], idx[eval_pos])
            if not eval_pos and cfg.eval_fraction > 0:
                logger.warning("only %d usable row(s), no eval split made", len(which))

        train_keys = np.concatenate([r.key[train[1][train[0] == s]] for s, r in enumerate(rows)])
        used = np.bincount(train[0], minlength=len(plan.train)).tolist()
        tokens = sum(int(r.n_tokens[train[1][train[0] == s]].sum()) for s, r in enumerate(rows))
        trained = sum(int(r.n_trained[train[1][train[0] == s]].sum()) for s, r in enumerate(rows))
        eval_of = [eval_rows] if eval_rows is not None else rows
        eval_keys = np.zeros(len(evals[0]), dtype=np.uint64)
        eval_lines = np.zeros(len(evals[0]), dtype=np.int64)
        for s, r in enumerate(eval_of):
            mask = evals[0] == s
            eval_keys[mask], eval_lines[mask] = r.key[evals[1][mask]], r.line[evals[1][mask]]
        in_train = np.isin(eval_keys, train_keys)
        overlap, overlap_lines = int(in_train.sum()), eval_lines[in_train][:LINES_CAP].tolist()
        del train_keys
        for part_report, n in zip(part_reports, used, strict=True):
            part_report["used"] = n
        report.update(
            {
                "format": cfg.format,
                "max_seq_len": cfg.max_seq_len,
                "train": len(train[0]),
                "eval": len(evals[0]),
                "eval_source": eval_report,
                "train_tokens": tokens,
                "train_trained_tokens": trained,
                "duplicates_dropped": cfg.drop_duplicates,
                "eval_overlap": {"count": overlap, "lines": overlap_lines},
            }
        )
        if plan.mixture:
            _sum_parts(report)
        if eval_report is not None:  # duplicates within the eval file count with the rest
            report["duplicate_count"] += eval_report["duplicate_count"]
        check_report(report, 1.0, warn=False)  # nothing to train on: never cached

        if cfg.packing:  # the eval split stays one row per sequence: it is scored and generated row by row
            _write_split(files, rows, *train, work / "train", plan.fingerprint)
            packed, report["packing"] = pack_split(
                datasets.load_from_disk(str(work / "train")), cfg.max_seq_len, scratch_dir=work / "packed"
            )
            packed.save_to_disk(str(tmp / "train"))
            del packed
        else:
            _write_split(files, rows, *train, tmp / "train", plan.fingerprint)
        if len(evals[0]):
            if eval_files is not None and eval_rows is not None:
                _write_split([eval_files], [eval_rows], *evals, tmp / "eval", plan.fingerprint)
            else:
                _write_split(files, rows, *evals, tmp / "eval", plan.fingerprint)
        shutil.rmtree(work)
        write_json(tmp / REPORT_NAME, report)  # after packing: it adds its statistics
        try:
            os.replace(tmp, dest)
        except OSError:
            if not (dest / REPORT_NAME).is_file():  # a concurrent writer won the race: theirs is equal
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _sum_parts(report: dict[str, Any]) -> None:
    """The totals of a mixture over its sources (lines are ``<source index>:<line>``)."""
    parts = report["sources"]
    rejected: dict[str, list[str]] = {}
    counts: dict[str, int] = {}
    note_counts: dict[str, int] = {}
    for i, part in enumerate(parts):
        for reason, n in part["rejected_counts"].items():
            counts[reason] = counts.get(reason, 0) + n
            rejected.setdefault(reason, []).extend(f"{i}:{line}" for line in part["rejected"][reason])
        for note, n in part["note_counts"].items():
            note_counts[note] = note_counts.get(note, 0) + n
    report.update(
        {
            "total": sum(p["total"] for p in parts),
            "kept": sum(p["kept"] for p in parts),
            "rejected": {k: v[:LINES_CAP] for k, v in rejected.items()},
            "rejected_counts": counts,
            "note_counts": note_counts,
            "notes": {},
            "duplicate_count": sum(p["duplicate_count"] for p in parts),
            "duplicates": [],
        }
    )


def prepare_dataset(
    cfg: DataConfig, tokenizer: Any, out_dir: str | Path, *, cache_dir: str | Path | None = None
) -> PreparedData:
    """Validate, tokenise and split ``cfg.path`` or the mixture ``cfg.sources`` (and ``cfg.eval_path``),
    reusing the content-hash cache.

    The splits are built once per fingerprint under ``data_cache_dir(cfg, cache_dir)/<fingerprint>/`` and
    copied into ``out_dir`` (``train/``, ``eval/``, ``prepare_report.json``) so a run directory is
    self-contained. Every verdict (reject share, usable rows, eval set = training set) is judged on every
    call from the report, cache hit or not; a refused prepare still writes its report, with ``error``.

    Args:
        cfg: the data section of the run config.
        tokenizer: a transformers tokenizer (fast or slow); needs ``eos_token_id`` when ``cfg.add_eos``.
        out_dir: the run's data directory.
        cache_dir: overrides ``cfg.cache_dir`` / ``$DELTATUNE_CACHE`` / ``~/.cache/deltatune``.

    Returns:
        PreparedData with the split directories in ``out_dir``, the fingerprint and the row counts.

    Raises:
        DataError: a source is missing, unreadable or empty, too many of its rows were rejected, nothing
            is left to train on, or the eval set is the training set.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    names: Any = [s.path for s in cfg.sources] if cfg.sources else cfg.path
    report: dict[str, Any] = {"source": names}
    try:
        plan = _plan(cfg, tokenizer)
        report["fingerprint"] = plan.fingerprint
        _same_bytes_check(plan)
        cached = data_cache_dir(cfg, cache_dir) / plan.fingerprint
        hit = (cached / REPORT_NAME).is_file()
        if hit:
            logger.info("data cache hit %s (%s)", plan.fingerprint[:12], cached)
        else:
            if cached.exists():  # no report: left by something other than _build; rebuild it
                shutil.rmtree(cached)
            logger.info("tokenising %s -> %s", names, cached)
            _build(cfg, tokenizer, plan, cached, report)
        for split in ("train", "eval"):
            shutil.rmtree(out / split, ignore_errors=True)
            if (cached / split).is_dir():
                shutil.copytree(cached / split, out / split)
        report = json.loads((cached / REPORT_NAME).read_text())
        report.update(
            {"source": names, "fingerprint": plan.fingerprint, "cache_hit": hit, "cache_path": str(cached)}
        )
        if plan.mixture:
            for part, src in zip(report["sources"], cfg.sources, strict=True):
                part["source"] = src.path
        if report.get("eval_source"):
            report["eval_source"]["source"] = cfg.eval_path
        report_path = write_json(out / REPORT_NAME, report)
        check_report(report, cfg.max_reject_fraction)
    except DataError as e:
        # The verdict's evidence is kept: the report of a refused prepare is in its run directory.
        write_json(out / REPORT_NAME, {**report, "error": str(e)})
        raise
    logger.info(
        "prepared %s: %d train / %d eval rows, %d rejected",
        names,
        report["train"],
        report["eval"],
        report["total"] - report["kept"],
    )
    return PreparedData(
        train_dir=out / "train",
        eval_dir=out / "eval" if (out / "eval").is_dir() else None,
        report_path=report_path,
        fingerprint=plan.fingerprint,
        num_train=report["train"],
        num_eval=report["eval"],
    )
