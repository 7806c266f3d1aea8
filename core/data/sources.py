"""Sources of rows: local files, fsspec URIs (s3://...) and hub dataset ids; rows keep their 1-based line."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets

from core.data.errors import DataError, Reject

FILE_KINDS = {".jsonl": "jsonl", ".json": "json", ".csv": "csv", ".parquet": "parquet"}
SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


@dataclass
class Source:
    name: str  # as the user wrote it (for messages and the report)
    kind: str  # "file" (local or fsspec) or "hub"
    file_kind: str | None  # jsonl | json | csv | parquet
    content_hash: str  # sha256 of the raw bytes, or of the hub identity
    data: bytes | None = None
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


def read_uri(name: str, storage_options: dict[str, Any], field: str) -> bytes:
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


def open_source(name: str, storage_options: dict[str, Any]) -> Source:
    """Read a source into memory and hash it; hub ids are loaded through ``datasets.load_dataset``."""
    if SCHEME.match(name):
        kind = file_kind(name)
        data = read_uri(name, storage_options, "data.path / data.eval_path")
        return Source(name, "file", kind, hashlib.sha256(data).hexdigest(), data=data)

    local = Path(name).expanduser()
    if local.is_file():
        data = local.read_bytes()
        return Source(name, "file", file_kind(name), hashlib.sha256(data).hexdigest(), data=data)
    if local.exists():
        raise DataError(f"{name} is a directory; point data.path at a .jsonl/.json/.csv/.parquet file")
    if looks_like_local_path(name):
        raise DataError(f"{name} does not exist; check data.path / data.eval_path (cwd: {Path.cwd()})")
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


def iter_rows(src: Source) -> Iterator[tuple[int, Any]]:
    """Yield ``(line, row)``; ``row`` is a ``Reject`` for unparseable lines. Lines are 1-based."""
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
        yield from iter_json_list(src.name, text)
        return
    for i, line in enumerate(text.split("\n")):  # JSON lines (also a .json file that holds JSON lines)
        if not line.strip():
            continue
        try:
            yield i + 1, json.loads(line)
        except json.JSONDecodeError:
            yield i + 1, Reject("malformed_json")


def iter_json_list(name: str, text: str) -> Iterator[tuple[int, Any]]:
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
        for line, row in iter_rows(open_source(location, storage_options or {})):
            if isinstance(row, Reject) or not isinstance(row, dict) or not isinstance(row.get("text"), str):
                raise DataError(f"{location}:{line}: expected a row with a string field 'text'")
            texts.append(row["text"])
    texts = texts[len(texts) - max(1, round(len(texts) * tail)) :] if texts else []
    if not texts:
        raise DataError(f"{location} holds no text")
    return texts
