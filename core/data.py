"""Prepare stage: validate rows, tokenise with exact prompt/response masks, split, cache by content hash.

prep = prepare_dataset(cfg.data, tokenizer, run_dir / "data")   # -> train/, eval/, prepare_report.json
train = load_split(prep.train_dir); batch = collate(train[:8] rows, pad_id=tokenizer.pad_token_id)
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import os
import random
import re
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets
import torch

from core.config import DataConfig, cache_root
from core.errors import DeltatuneError
from core.fsutil import make_temp_dir, write_json
from core.run import PREPARE_REPORT

logger = logging.getLogger(__name__)

PROMPT_TEMPLATE_ALPACA = "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
PROMPT_TEMPLATE_ALPACA_NO_INPUT = "### Instruction:\n{instruction}\n\n### Response:\n"
# Used for format "chat" when the tokenizer has no chat template: "<|role|>\ncontent\n" per message and
# "<|assistant|>\n" as the generation prompt. Assistant content (plus EOS when add_eos) is trained;
# messages after the last assistant turn are dropped (they would teach nothing).
FALLBACK_CHAT_TURN = "<|{role}|>\n{content}\n"
FALLBACK_CHAT_GENERATION_PROMPT = "<|assistant|>\n"

# Bump whenever the tokenised output for the same inputs changes: it is part of every cache key.
DATA_FORMAT_VERSION = 1
REPORT_NAME = PREPARE_REPORT
IGNORE_INDEX = -100
REJECT_WARN_FRACTION = 0.10

_FIELDS = {
    "alpaca": "instruction, optional input, output",
    "completion": "prompt, completion",
    "text": "text",
    "chat": "messages: [{role, content}, ...] with at least one assistant turn",
}
# The field that tells each format's rows apart, to suggest data.format when every row is rejected.
_TELLTALE = {"alpaca": "instruction", "completion": "completion", "text": "text", "chat": "messages"}
_FILE_KINDS = {".jsonl": "jsonl", ".json": "json", ".csv": "csv", ".parquet": "parquet"}
_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


class DataError(DeltatuneError, ValueError):
    """The training data cannot be prepared; the message says what was wrong and what to do."""


@dataclass
class PreparedData:
    """Paths and counts of a prepared dataset (plain values: safe to return from a Prefect task)."""

    train_dir: Path
    eval_dir: Path | None
    report_path: Path
    fingerprint: str
    num_train: int
    num_eval: int


class _Reject(Exception):
    """A row failed validation; ``reason`` is the key it is counted under in the report."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


# ----------------------------------------------------------------------------------------------------
# Sources: local files, fsspec URIs, hub dataset ids
# ----------------------------------------------------------------------------------------------------


@dataclass
class _Source:
    name: str  # as the user wrote it (for messages and the report)
    kind: str  # "file" (local or fsspec) or "hub"
    file_kind: str | None  # jsonl | json | csv | parquet
    content_hash: str  # sha256 of the raw bytes, or of the hub identity
    data: bytes | None = None
    hub_rows: Any = None


def _file_kind(name: str) -> str:
    path = name.split("?", 1)[0].lower()
    for suffix, kind in _FILE_KINDS.items():
        if path.endswith(suffix):
            return kind
    raise DataError(
        f"{name}: unknown file type; expected one of {', '.join(_FILE_KINDS)} (JSON lines recommended)"
    )


def _looks_like_local_path(name: str) -> bool:
    return name.startswith(("/", "./", "../", "~")) or name.lower().split("?", 1)[0].endswith(
        tuple(_FILE_KINDS)
    )


def _read_uri(name: str, storage_options: dict[str, Any], field: str) -> bytes:
    """The bytes of an fsspec URI (``s3://...``); ``field`` names the setting it came from, for messages."""
    import fsspec

    try:
        with fsspec.open(name, "rb", **storage_options) as f:
            return f.read()
    except FileNotFoundError:
        raise DataError(f"{name} does not exist; check {field}") from None
    except Exception as e:  # auth, endpoint, missing filesystem package: all need the user
        raise DataError(
            f"could not read {name}: {type(e).__name__}: {e}. Check the URI and data.storage_options "
            "(credentials, client_kwargs.endpoint_url)"
        ) from None


def _open_source(name: str, storage_options: dict[str, Any]) -> _Source:
    """Read a source into memory and hash it; hub ids are loaded through ``datasets.load_dataset``."""
    if _SCHEME.match(name):
        kind = _file_kind(name)
        data = _read_uri(name, storage_options, "data.path / data.eval_path")
        return _Source(name, "file", kind, hashlib.sha256(data).hexdigest(), data=data)

    local = Path(name).expanduser()
    if local.is_file():
        data = local.read_bytes()
        return _Source(name, "file", _file_kind(name), hashlib.sha256(data).hexdigest(), data=data)
    if local.exists():
        raise DataError(f"{name} is a directory; point data.path at a .jsonl/.json/.csv/.parquet file")
    if _looks_like_local_path(name):
        raise DataError(f"{name} does not exist; check data.path / data.eval_path (cwd: {Path.cwd()})")
    return _load_hub(name)


def _load_hub(name: str) -> _Source:
    """Load ``id[@revision][:split]`` from the hub (needs network or a warm HF cache)."""
    ident, _, split = name.partition(":")
    ident, _, revision = ident.partition("@")
    split = split or "train"
    try:
        ds = datasets.load_dataset(ident, split=split, revision=revision or None)
    except Exception as e:  # offline, unknown id, gated: the message tells the user what to do
        raise DataError(
            f"{name!r} is not a local file, so it was read as a hub dataset id, and loading it failed: "
            f"{type(e).__name__}: {e}. Hub ids need network access (or a local HF cache); offline, point "
            "data.path at a local .jsonl file or an s3:// URI"
        ) from None
    identity = json.dumps([ident, revision, split, getattr(ds, "_fingerprint", None)])
    return _Source(name, "hub", None, hashlib.sha256(identity.encode()).hexdigest(), hub_rows=ds)


def _iter_rows(src: _Source) -> Iterator[tuple[int, Any]]:
    """Yield ``(line, row)``; ``row`` is a ``_Reject`` for unparseable lines. Lines are 1-based."""
    if src.kind == "hub":
        for i, row in enumerate(src.hub_rows):
            yield i + 1, row
        return
    assert src.data is not None
    if src.file_kind == "parquet":
        import pyarrow.parquet as pq

        try:
            rows = pq.read_table(io.BytesIO(src.data)).to_pylist()
        except Exception as e:
            raise DataError(f"{src.name} is not a readable parquet file: {e}") from None
        yield from ((i + 1, row) for i, row in enumerate(rows))
        return
    try:
        text = src.data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise DataError(f"{src.name} is not UTF-8 text ({e}); re-encode it as UTF-8") from None
    if src.file_kind == "csv":
        reader = csv.DictReader(io.StringIO(text, newline=""))
        if reader.fieldnames is None:  # reads the header: an empty file has none
            return
        start = reader.line_num + 1
        for row in reader:
            yield start, row  # the line the record starts on (quoted fields may span lines)
            start = reader.line_num + 1
        return
    if src.file_kind == "json" and text.lstrip().startswith("["):
        yield from _iter_json_list(src.name, text)
        return
    for i, line in enumerate(text.split("\n")):  # JSON lines (also a .json file that holds JSON lines)
        if not line.strip():
            continue
        try:
            yield i + 1, json.loads(line)
        except json.JSONDecodeError:
            yield i + 1, _Reject("malformed_json")


def _iter_json_list(name: str, text: str) -> Iterator[tuple[int, Any]]:
    """Walk a JSON array element by element so each row keeps the line it starts on."""
    dec = json.JSONDecoder()
    ws = re.compile(r"\s*")
    pos = ws.match(text, text.index("[") + 1).end()
    if text.startswith("]", pos):
        return
    while True:
        try:
            obj, end = dec.raw_decode(text, pos)
        except json.JSONDecodeError as e:
            raise DataError(f"{name} is not valid JSON ({e}); fix it or convert it to JSON lines") from None
        yield text.count("\n", 0, pos) + 1, obj
        pos = ws.match(text, end).end()
        if text.startswith(",", pos):
            pos = ws.match(text, pos + 1).end()
        elif text.startswith("]", pos):
            return
        else:
            line = text.count("\n", 0, pos) + 1
            raise DataError(f"{name} is not valid JSON (expected ',' or ']' at line {line})")


# ----------------------------------------------------------------------------------------------------
# Rows -> segments: (text, trained) pieces tokenised separately so the mask boundary is exact
# ----------------------------------------------------------------------------------------------------


def _field(row: dict, name: str, *, optional: bool = False) -> str:
    value = row.get(name)
    if value is None:  # a JSON null is a missing value: never passed on
        if optional:
            return ""
        raise _Reject(f"missing_field:{name}")
    if not isinstance(value, str):
        raise _Reject(f"wrong_type:{name}")
    return value


def _nonempty(row: dict, name: str) -> str:
    value = _field(row, name)
    if not value.strip():
        raise _Reject(f"empty_{name}")
    return value


@dataclass
class _Segments:
    pieces: list[tuple[str, bool]]  # (text, trained)
    prompt: str  # formatted prompt, for generation metrics
    reference: str  # expected response, no EOS
    templated: bool = False  # rendered by a chat template (BOS/EOS may already be in the text)


def _segments(row: Any, fmt: str, tokenizer: Any) -> _Segments:
    if not isinstance(row, dict):
        raise _Reject("not_an_object")
    if fmt == "alpaca":
        instruction = _nonempty(row, "instruction")
        inp = _field(row, "input", optional=True)
        output = _nonempty(row, "output")
        if inp.strip():
            prompt = PROMPT_TEMPLATE_ALPACA.format(instruction=instruction, input=inp)
        else:
            prompt = PROMPT_TEMPLATE_ALPACA_NO_INPUT.format(instruction=instruction)
        return _Segments([(prompt, False), (output, True)], prompt, output)
    if fmt == "completion":
        prompt = _field(row, "prompt")
        completion = _nonempty(row, "completion")
        return _Segments([(prompt, False), (completion, True)], prompt, completion)
    if fmt == "text":
        text = _nonempty(row, "text")
        return _Segments([(text, True)], "", text)
    if fmt == "chat":
        return _chat_segments(row, tokenizer)
    raise DataError(f"unknown data.format {fmt!r}; expected one of {', '.join(_FIELDS)}")


def _chat_segments(row: dict, tokenizer: Any) -> _Segments:
    messages = row.get("messages")
    if messages is None:
        raise _Reject("missing_field:messages")
    if not isinstance(messages, list):
        raise _Reject("wrong_type:messages")
    if not messages:
        raise _Reject("empty_messages")
    for m in messages:
        if not (isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)):
            raise _Reject("bad_message")
    messages = [{"role": m["role"], "content": m["content"]} for m in messages]
    assistant = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    if not assistant:
        raise _Reject("no_assistant_turn")
    last = assistant[-1]
    if not messages[last]["content"].strip():
        raise _Reject("empty_assistant")
    reference = messages[last]["content"]

    if getattr(tokenizer, "chat_template", None):

        def render(msgs: list[dict], gen: bool) -> str:
            if not msgs:
                return ""
            return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen)

        # Each assistant turn is the difference between the conversation rendered up to it with a
        # generation prompt and rendered including it; that needs the template to be prefix-stable.
        pieces: list[tuple[str, bool]] = []
        done = ""
        for i in assistant:
            before = render(messages[:i], True)
            upto = render(messages[: i + 1], False)
            if not (before.startswith(done) and upto.startswith(before)):
                raise _Reject("chat_template_not_prefix_stable")
            pieces += [(before[len(done) :], False), (upto[len(before) :], True)]
            done = upto
        prompt = render(messages[:last], True)
        return _Segments([p for p in pieces if p[0]], prompt, reference, templated=True)

    pieces = []
    for m in messages[: last + 1]:
        if m["role"] == "assistant":
            pieces += [("<|assistant|>\n", False), (m["content"], True), ("\n", False)]
        else:
            pieces.append((FALLBACK_CHAT_TURN.format(**m), False))
    prompt = (
        "".join(FALLBACK_CHAT_TURN.format(**m) for m in messages[:last]) + FALLBACK_CHAT_GENERATION_PROMPT
    )
    pieces.pop()  # the newline after the last assistant turn teaches nothing
    return _Segments(pieces, prompt, reference)


# ----------------------------------------------------------------------------------------------------
# Tokenisation
# ----------------------------------------------------------------------------------------------------


def _adds_bos(tokenizer: Any) -> bool:
    """True when the tokenizer's own config prepends BOS (observed, not guessed from attributes)."""
    bos = tokenizer.bos_token_id
    if bos is None:
        return False
    with_special = tokenizer("a", add_special_tokens=True)["input_ids"]
    return bool(with_special) and with_special[0] == bos


def _encode(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"]) if text else []


def _encode_row(seg: _Segments, tokenizer: Any, cfg: DataConfig, adds_bos: bool) -> tuple[dict, bool]:
    """Token ids and labels for one row; returns (record, truncated). Raises _Reject('too_long')."""
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    pieces = [(_encode(tokenizer, text), trained) for text, trained in seg.pieces]
    ids: list[int] = []
    labels: list[int] = []
    first = next((p for p, _ in pieces if p), [])
    if adds_bos and not (first and first[0] == bos):  # a chat template may have rendered BOS already
        ids.append(bos)
        labels.append(IGNORE_INDEX)  # BOS is never a target: a causal LM never predicts position 0
    prompt_len = len(ids)  # tokens before the last trained piece: the generation prompt
    last_trained = max(i for i, (_, trained) in enumerate(pieces) if trained)
    for i, (piece, trained) in enumerate(pieces):
        if i == last_trained and cfg.format != "text":
            prompt_len = len(ids)
        ids += piece
        labels += piece if trained or not cfg.mask_prompt else [IGNORE_INDEX] * len(piece)
        if trained and cfg.add_eos and not (seg.templated and eos in piece):
            ids.append(eos)
            labels.append(eos)
    if cfg.format == "text":
        prompt_len = 0  # plain text has no prompt: evaluation scores it by loss only, no generation
    truncated = len(ids) > cfg.max_seq_len
    ids, labels = ids[: cfg.max_seq_len], labels[: cfg.max_seq_len]
    # Position 0 is never predicted, so a row needs a trained label at position >= 1 to teach anything.
    if prompt_len >= cfg.max_seq_len or all(label == IGNORE_INDEX for label in labels[1:]):
        raise _Reject("too_long")
    record = {
        "input_ids": ids,
        "labels": labels,
        "prompt": seg.prompt,
        "reference": seg.reference,
        "prompt_len": prompt_len,
    }
    return record, truncated


def _encode_rows(src: _Source, cfg: DataConfig, tokenizer: Any) -> tuple[list[dict], dict[str, Any]]:
    """Validate and tokenise every row of ``src``; returns (kept records, per-file report)."""
    adds_bos = _adds_bos(tokenizer)
    kept: list[dict] = []
    rejected: dict[str, list[int]] = {}
    truncated: list[int] = []
    total = 0
    fields: set[str] = set()
    for line, row in _iter_rows(src):
        total += 1
        if isinstance(row, dict) and len(fields) < 64:
            fields.update(map(str, row))
        try:
            if isinstance(row, _Reject):
                raise row
            record, was_truncated = _encode_row(
                _segments(row, cfg.format, tokenizer), tokenizer, cfg, adds_bos
            )
        except _Reject as r:
            rejected.setdefault(r.reason, []).append(line)
            continue
        record["source_line"] = line
        kept.append(record)
        if was_truncated:
            truncated.append(line)
    report = {
        "source": src.name,
        "total": total,
        "kept": len(kept),
        "rejected": rejected,
        "rejected_counts": {k: len(v) for k, v in rejected.items()},
        "truncated": truncated,
        "fields": sorted(fields),  # keys seen in its rows, for the format hint of _check_file
    }
    # A file with no usable row is never cached; the reject share is judged on every prepare (cache hit
    # or not) from the stored report, against the run's own data.max_reject_fraction.
    _check_file(src.name, cfg.format, report, 1.0, warn=False)
    return kept, report


def _check_file(name: str, fmt: str, report: dict[str, Any], max_reject: float, *, warn: bool = True) -> None:
    """Fail a file with no usable row, or with more than ``max_reject`` of its rows rejected; warn above
    REJECT_WARN_FRACTION. ``report``: the file's part of prepare_report.json (its ``fields``, the keys
    seen in its rows, suggest the format they look like)."""
    total, kept, rejected = report["total"], report["kept"], report["rejected"]
    fields = set(report.get("fields") or [])
    if total == 0:
        raise DataError(f"{name} is empty: no rows found. Format {fmt!r} expects rows with {_FIELDS[fmt]}")
    top = sorted(rejected.items(), key=lambda kv: -len(kv[1]))[:5]
    summary = "; ".join(
        f"{reason}: {len(lines)} row(s), e.g. line(s) {', '.join(map(str, lines[:5]))}"
        for reason, lines in top
    )
    if kept == 0:
        likely = [f for f, field in _TELLTALE.items() if field in fields and f != fmt]
        hint = (
            f" The rows have a {_TELLTALE[likely[0]]!r} field: set data.format={likely[0]}?" if likely else ""
        )
        raise DataError(
            f"{name}: all {total} rows were rejected ({summary}). Format {fmt!r} expects rows with "
            f"{_FIELDS[fmt]}; fix the rows or set data.format / data.max_seq_len.{hint}"
        )
    if total - kept > max_reject * total:
        raise DataError(
            f"{name}: {total - kept} of {total} rows were rejected ({summary}), more than "
            f"data.max_reject_fraction={max_reject:g} allows; fix the rows, or raise data.max_reject_fraction "
            "to train on the rest"
        )
    if warn and total - kept > REJECT_WARN_FRACTION * total:
        logger.warning("%s: %d of %d rows rejected (%s)", name, total - kept, total, summary)


# ----------------------------------------------------------------------------------------------------
# Fingerprint and cache
# ----------------------------------------------------------------------------------------------------


def tokenizer_identity(tokenizer: Any) -> str:
    """A sha256 of everything about ``tokenizer`` that changes token ids or templates."""
    h = hashlib.sha256(type(tokenizer).__name__.encode())
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        h.update(backend.to_str().encode())
    else:  # slow tokenizer: the vocabulary is the best stable proxy
        h.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    special = {
        "bos": tokenizer.bos_token_id,
        "eos": tokenizer.eos_token_id,
        "pad": tokenizer.pad_token_id,
        "adds_bos": _adds_bos(tokenizer),
        "chat_template": getattr(tokenizer, "chat_template", None),
    }
    h.update(json.dumps(special, sort_keys=True, default=str).encode())
    return h.hexdigest()


def _fingerprint(cfg: DataConfig, tokenizer_id: str, train: _Source, eval_src: _Source | None) -> str:
    # path/eval_path are left out on purpose: the same bytes under another name are the same data.
    key = {
        "version": DATA_FORMAT_VERSION,
        "train": [train.content_hash, train.file_kind],
        "eval": [eval_src.content_hash, eval_src.file_kind] if eval_src else None,
        "tokenizer": tokenizer_id,
        "config": cfg.model_dump(
            include={"format", "eval_fraction", "max_seq_len", "mask_prompt", "add_eos", "seed"}
        ),
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


def _save(records: list[dict], path: Path) -> None:
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
    quiet = datasets.utils.are_progress_bars_disabled()
    datasets.utils.disable_progress_bars()  # one bar per split is noise in task logs
    try:
        datasets.Dataset.from_dict(columns, features=features).save_to_disk(str(path))
    finally:
        if not quiet:
            datasets.utils.enable_progress_bars()


def _build(cfg: DataConfig, tokenizer: Any, train_src: _Source, eval_src: _Source | None, dest: Path) -> None:
    """Tokenise into a temp dir beside ``dest`` and move it into place atomically."""
    records, report = _encode_rows(train_src, cfg, tokenizer)
    eval_report = None
    if eval_src is not None:
        train, (evals, eval_report) = records, _encode_rows(eval_src, cfg, tokenizer)
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
        _save(train, tmp / "train")
        if evals:
            _save(evals, tmp / "eval")
        write_json(tmp / REPORT_NAME, report)
        try:
            os.replace(tmp, dest)
        except OSError:
            if not (dest / REPORT_NAME).is_file():  # a concurrent writer won the race: theirs is equal
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# ----------------------------------------------------------------------------------------------------
# Public API
# ----------------------------------------------------------------------------------------------------


def _open_sources(cfg: DataConfig, tokenizer: Any) -> tuple[_Source, _Source | None, str]:
    if cfg.add_eos and tokenizer.eos_token_id is None:
        raise DataError(
            "data.add_eos is true but the tokenizer has no eos_token; set one or data.add_eos=false"
        )
    train_src = _open_source(cfg.path, cfg.storage_options)
    eval_src = _open_source(cfg.eval_path, cfg.storage_options) if cfg.eval_path else None
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
    _check_file(cfg.path, cfg.format, report, cfg.max_reject_fraction)
    if report.get("eval_source"):
        _check_file(cfg.eval_path, cfg.format, report["eval_source"], cfg.max_reject_fraction)
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


def text_rows(
    location: str, storage_options: dict[str, Any] | None = None, *, tail: float = 1.0
) -> list[str]:
    """The texts of a general-text file: paragraphs (blank-line separated) of a ``.txt``, or the ``text``
    field of each row of a .jsonl/.json/.csv/.parquet file or hub dataset; ``tail`` keeps the last
    share of them (the held-out end of a corpus, as core/tiny.py holds out the end of its stream).

    Raises:
        DataError: the source is missing or unreadable, a row has no text, or nothing is left.
    """
    if location.lower().split("?", 1)[0].endswith(".txt"):
        if _SCHEME.match(location):
            raw = _read_uri(location, storage_options or {}, "eval.forgetting_path")
        elif Path(location).expanduser().is_file():
            raw = Path(location).expanduser().read_bytes()
        else:
            raise DataError(f"{location} does not exist (cwd: {Path.cwd()})")
        texts = [p.strip() for p in raw.decode("utf-8-sig", errors="replace").split("\n\n") if p.strip()]
    else:
        texts = []
        for line, row in _iter_rows(_open_source(location, storage_options or {})):
            if isinstance(row, _Reject) or not isinstance(row, dict) or not isinstance(row.get("text"), str):
                raise DataError(f"{location}:{line}: expected a row with a string field 'text'")
            texts.append(row["text"])
    texts = texts[len(texts) - max(1, round(len(texts) * tail)) :] if texts else []
    if not texts:
        raise DataError(f"{location} holds no text")
    return texts


def load_split(path: str | Path) -> datasets.Dataset:
    """Load a split written by :func:`prepare_dataset` (``datasets.load_from_disk``).

    Raises:
        DataError: ``path`` is not a saved dataset; run the prepare stage first.
    """
    p = Path(path)
    if not (p / "state.json").is_file():
        raise DataError(f"{p} is not a prepared split (no state.json); run the prepare stage first")
    ds = datasets.load_from_disk(str(p))
    if not isinstance(ds, datasets.Dataset):
        raise DataError(f"{p} holds a {type(ds).__name__}, expected one split (a Dataset)")
    return ds


def collate(batch: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a list of rows into ``input_ids``, ``labels`` (-100 pad) and ``attention_mask``, each (B, T).

    Args:
        batch: rows with ``input_ids`` and ``labels`` (lists or 1-D tensors); other keys are ignored.
        pad_id: the id written into padded ``input_ids`` positions (masked out, so any valid id works).
    """
    if not batch:
        raise ValueError("collate got an empty batch")
    T = max(len(row["input_ids"]) for row in batch)
    input_ids = torch.full((len(batch), T), pad_id, dtype=torch.long)  # (B, T)
    labels = torch.full((len(batch), T), IGNORE_INDEX, dtype=torch.long)  # (B, T)
    attention_mask = torch.zeros((len(batch), T), dtype=torch.long)  # (B, T)
    for i, row in enumerate(batch):
        n = len(row["input_ids"])
        if len(row["labels"]) != n:
            raise ValueError(f"row {i}: {n} input_ids but {len(row['labels'])} labels")
        input_ids[i, :n] = torch.as_tensor(row["input_ids"], dtype=torch.long)
        labels[i, :n] = torch.as_tensor(row["labels"], dtype=torch.long)
        attention_mask[i, :n] = 1
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}
