"""Sources of rows: local files, fsspec URIs (s3://...) and hub dataset ids, read streaming; rows keep their
1-based line, and a row whose bytes are not UTF-8 is rejected alone (``not_utf8``) or decoded with U+FFFD."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import datasets

from core.data.errors import DataError, Reject

FILE_KINDS = {".jsonl": "jsonl", ".json": "json", ".csv": "csv", ".parquet": "parquet"}
SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
# Bytes that are not UTF-8 are decoded with surrogateescape (PEP 383): each becomes one lone surrogate
# U+DC80..U+DCFF, so a row can be judged on its own and the rest of the file read on.
_ESCAPED = re.compile("[\udc80-\udcff]")
NOTE_REPLACED = "not_utf8_replaced"  # data.decode_errors=replace: the row was kept with U+FFFD in it
PARQUET_BATCH = 1024


@dataclass
class Source:
    name: str  # as the user wrote it (for messages and the report)
    kind: str  # "file" (local or fsspec) or "hub"
    file_kind: str | None  # jsonl | json | csv | parquet
    content_hash: str  # sha256 of the raw bytes, or of the hub identity
    opener: Callable[[], Any] | None = field(
        default=None, repr=False
    )  # -> a context manager of a binary file
    hub_rows: Any = None


def file_kind(name: str) -> str:
    path = name.split("?", 1)[0].lower()
    for suffix, kind in FILE_KINDS.items():
        if path.endswith(suffix):
            return kind
    raise DataError(
        f"{name}: unknown file type; expected one of {', '.join(FILE_KINDS)} (JSON lines recommended)"
    )


def looks_like_local_path(name: str) -> bool:
    return name.startswith(("/", "./", "../", "~")) or name.lower().split("?", 1)[0].endswith(
        tuple(FILE_KINDS)
    )


@contextmanager
def _uri(name: str, storage_options: dict[str, Any], field_name: str) -> Iterator[IO[bytes]]:
    import fsspec

    try:
        f = fsspec.open(name, "rb", **storage_options).open()
    except FileNotFoundError:
        raise DataError(f"{name} does not exist; check {field_name}") from None
    except Exception as e:  # auth, endpoint, missing filesystem package: all need the user
        raise DataError(
            f"could not read {name}: {type(e).__name__}: {e}. Check the URI and data.storage_options "
            "(credentials, client_kwargs.endpoint_url)"
        ) from None
    try:
        yield f
    finally:
        f.close()


def read_uri(name: str, storage_options: dict[str, Any], field_name: str) -> bytes:
    """The bytes of an fsspec URI (``s3://...``); ``field_name`` names the setting it came from, for messages."""
    with _uri(name, storage_options, field_name) as f:
        return f.read()


def _hash(opener: Callable[[], Any]) -> str:
    with opener() as f:
        return hashlib.file_digest(f, "sha256").hexdigest()  # reads in chunks, never the whole file


def open_source(
    name: str, storage_options: dict[str, Any], field_name: str = "data.path / data.eval_path"
) -> Source:
    """Find a source and hash its bytes in chunks (nothing is parsed); hub ids are loaded through
    ``datasets.load_dataset`` (Arrow on disk, read lazily)."""
    if SCHEME.match(name):
        kind = file_kind(name)

        def opener() -> Any:
            return _uri(name, storage_options, field_name)

        return Source(name, "file", kind, _hash(opener), opener=opener)

    local = Path(name).expanduser()
    if local.is_file():
        kind = file_kind(name)

        def local_opener() -> Any:
            return local.open("rb")

        return Source(name, "file", kind, _hash(local_opener), opener=local_opener)
    if local.exists():
        raise DataError(f"{name} is a directory; point {field_name} at a .jsonl/.json/.csv/.parquet file")
    if looks_like_local_path(name):
        raise DataError(f"{name} does not exist; check {field_name} (cwd: {Path.cwd()})")
    return load_hub(name)


def load_hub(name: str) -> Source:
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
    return Source(name, "hub", None, hashlib.sha256(identity.encode()).hexdigest(), hub_rows=ds)


def _decoded(text: str, decode_errors: str) -> tuple[str, tuple[str, ...]]:
    """``text`` read with surrogateescape: as it is, or repaired with U+FFFD (a note), or Reject."""
    if not _ESCAPED.search(text):
        return text, ()
    if decode_errors != "replace":
        raise Reject("not_utf8")
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "replace"), (NOTE_REPLACED,)


def iter_rows(src: Source, decode_errors: str = "reject") -> Iterator[tuple[int, Any, tuple[str, ...]]]:
    """Yield ``(line, row, notes)`` lazily; ``row`` is a ``Reject`` for a line that cannot be parsed or
    is not UTF-8 (``decode_errors="replace"`` keeps it, with the note ``not_utf8_replaced``). Lines are
    1-based: the line a row starts on."""
    if src.kind == "hub":
        for i, row in enumerate(src.hub_rows):
            yield i + 1, row, ()
        return
    assert src.opener is not None
    with src.opener() as raw:
        if src.file_kind == "parquet":
            yield from _parquet_rows(src.name, raw)
            return
        text = io.TextIOWrapper(raw, encoding="utf-8-sig", errors="surrogateescape", newline="")
        if src.file_kind == "csv":
            yield from _csv_rows(text, decode_errors)
            return
        if src.file_kind == "json":
            head = text.read(4096)
            if head.lstrip().startswith("["):  # a JSON array: parsed whole (JSON lines stream)
                yield from iter_json_list(src.name, head + text.read(), decode_errors)
                return
            lines: Iterator[str] = _lines(head, text)
        else:
            lines = _lines("", text)
        # JSON lines (also a .json file that holds JSON lines); only "\n" ends a line, as before: a stray
        # "\r" inside a line is JSON whitespace, and CRLF leaves a "\r" json.loads ignores.
        for i, line in enumerate(lines):
            if not line.strip():
                continue
            try:
                line, notes = _decoded(line, decode_errors)
                yield i + 1, json.loads(line), notes
            except Reject as r:
                yield i + 1, r, ()
            except json.JSONDecodeError:
                yield i + 1, Reject("malformed_json"), ()


def _lines(head: str, text: io.TextIOWrapper) -> Iterator[str]:
    """Lines split on "\\n" only (TextIOWrapper's newline="" would also split on a lone "\\r")."""
    carry = head
    while True:
        chunk = text.read(1 << 20)
        if not chunk:
            break
        carry += chunk
        *done, carry = carry.split("\n")
        yield from done
    yield carry


def _csv_rows(text: io.TextIOWrapper, decode_errors: str) -> Iterator[tuple[int, Any, tuple[str, ...]]]:
    reader = csv.DictReader(text)
    if reader.fieldnames is None:  # reads the header: an empty file has none
        return
    if any(_ESCAPED.search(name or "") for name in reader.fieldnames):
        raise DataError("the CSV header is not UTF-8 text; re-encode the file as UTF-8")
    start = reader.line_num + 1
    for row in reader:
        # the line the record starts on (quoted fields may span lines)
        try:
            notes: tuple[str, ...] = ()
            for k, v in row.items():
                if isinstance(v, str) and _ESCAPED.search(v):
                    row[k], notes = _decoded(v, decode_errors)
            yield start, row, notes
        except Reject as r:
            yield start, r, ()
        start = reader.line_num + 1


def _parquet_rows(name: str, raw: IO[bytes]) -> Iterator[tuple[int, Any, tuple[str, ...]]]:
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(raw)
    except Exception as e:
        raise DataError(f"{name} is not a readable parquet file: {e}") from None
    line = 0
    for batch in pf.iter_batches(batch_size=PARQUET_BATCH):
        for row in batch.to_pylist():
            line += 1
            yield line, row, ()


def iter_json_list(
    name: str, text: str, decode_errors: str = "reject"
) -> Iterator[tuple[int, Any, tuple[str, ...]]]:
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
        line = text.count("\n", 0, pos) + 1
        try:
            fixed, notes = _decoded(text[pos:end], decode_errors)
            yield line, (json.loads(fixed) if notes else obj), notes
        except Reject as r:
            yield line, r, ()
        pos = ws.match(text, end).end()
        if text.startswith(",", pos):
            pos = ws.match(text, pos + 1).end()
        elif text.startswith("]", pos):
            return
        else:
            line = text.count("\n", 0, pos) + 1
            raise DataError(f"{name} is not valid JSON (expected ',' or ']' at line {line})")


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
        if SCHEME.match(location):
            raw = read_uri(location, storage_options or {}, "eval.forgetting_path")
        elif Path(location).expanduser().is_file():
            raw = Path(location).expanduser().read_bytes()
        else:
            raise DataError(f"{location} does not exist (cwd: {Path.cwd()})")
        texts = [p.strip() for p in raw.decode("utf-8-sig", errors="replace").split("\n\n") if p.strip()]
    else:
        texts = []
        src = open_source(location, storage_options or {}, "eval.forgetting_path")
        for line, row, _ in iter_rows(src, "replace"):
            if isinstance(row, Reject) or not isinstance(row, dict) or not isinstance(row.get("text"), str):
                raise DataError(f"{location}:{line}: expected a row with a string field 'text'")
            texts.append(row["text"])
    texts = texts[len(texts) - max(1, round(len(texts) * tail)) :] if texts else []
    if not texts:
        raise DataError(f"{location} holds no text")
    return texts
