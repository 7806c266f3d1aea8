"""Packing: rows of a tokenised split into sequences of up to max_seq_len, no token attending across rows.

packed, stats = pack_split(train_ds, max_seq_len=512)   # first-fit decreasing; see docs/packing.md

A packed row holds whole rows back to back with ``position_ids`` restarting at 0 for each of them; batched
without an ``attention_mask`` (core.data.batches.collate), transformers reads the row boundaries from the
position ids and attends within each row only (docs/packing.md).
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from array import array
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from core.data.encode import IGNORE_INDEX
from core.data.errors import DataError

PACKED_COLUMNS = ("input_ids", "labels", "position_ids")
_READ_BATCH = 4096  # rows read (lengths) or bins written per step: what bounds memory


def first_fit_decreasing(lengths: Sequence[int] | np.ndarray, capacity: int) -> list[list[int]]:
    """Bins of row indices, each summing to at most ``capacity``: first-fit decreasing, deterministic.

    Rows are taken longest first (ties: lower index first) and each goes into the first (lowest-numbered)
    bin with room for it, opening a new bin when none has. Bins come in the order they were opened;
    within a bin, rows in the order they were placed.

    Args:
        lengths: tokens of each row, every one in 1..capacity.
        capacity: the most tokens a bin holds (``data.max_seq_len``).

    Raises:
        ValueError: a row is empty or longer than ``capacity``.
    """
    rows, sizes = _ffd(np.asarray(lengths, dtype=np.int64), capacity)
    ends = np.cumsum(sizes)
    return [chunk.tolist() for chunk in np.split(rows, ends[:-1])] if len(rows) else []


def _ffd(lens: np.ndarray, capacity: int) -> tuple[np.ndarray, np.ndarray]:
    """First-fit decreasing as numpy arrays: (row indices bin by bin, (n,); rows per bin, (bins,)).

    A max segment tree over the bins' free space finds the first bin with room in O(log n): 1M rows
    in ~12 s of one core, and a few bytes per row (no Python list per bin).
    """
    n = len(lens)
    if n == 0:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
    too_long = np.flatnonzero(lens > capacity)
    if too_long.size:
        i = int(too_long[0])
        raise ValueError(
            f"row {i} has {int(lens[i])} tokens, more than max_seq_len={capacity} ({too_long.size} such rows); "
            "the prepare stage truncates or drops them per data.truncation before packing"
        )
    if (lens <= 0).any():
        raise ValueError(f"row {int(np.flatnonzero(lens <= 0)[0])} is empty: nothing to pack")
    order = np.argsort(-lens, kind="stable")  # (n,) longest first, ties by index
    size = 1 << max(0, (n - 1).bit_length())  # leaves: at most n bins are ever opened
    free = array("l", [capacity]) * (2 * size)  # free[1] root; leaf b at size + b; internal = max(children)
    bin_of = array("l", bytes(8 * n))  # (n,) in placement order: the bin of the k-th row placed
    for k, need in enumerate(lens[order].tolist()):
        node = 1
        while node < size:  # descend to the leftmost leaf with room (an unopened bin always has room)
            node = 2 * node if free[2 * node] >= need else 2 * node + 1
        bin_of[k] = node - size
        free[node] -= need
        node //= 2
        while node:
            free[node] = max(free[2 * node], free[2 * node + 1])
            node //= 2
    placed = np.frombuffer(bin_of, dtype=np.int64)  # (n,)
    by_bin = np.argsort(placed, kind="stable")  # (n,) placement order kept within a bin
    return order[by_bin], np.bincount(placed)


def row_lengths(ds: datasets.Dataset) -> np.ndarray:
    """``len(input_ids)`` of every row, read from Arrow list lengths batch by batch (no token is read)."""
    out = [
        pc.list_value_length(table.column("input_ids")).to_numpy(zero_copy_only=False)
        for table in ds.select_columns(["input_ids"]).with_format("arrow").iter(batch_size=_READ_BATCH)
    ]
    return np.concatenate(out).astype(np.int64) if out else np.zeros(0, dtype=np.int64)


def pack_split(
    ds: datasets.Dataset, max_seq_len: int, *, scratch_dir: str | Path | None = None
) -> tuple[datasets.Dataset, dict[str, Any]]:
    """Pack the rows of ``ds`` (input_ids, labels, ...) into sequences of at most ``max_seq_len`` tokens.

    First-fit decreasing on the row lengths (:func:`first_fit_decreasing`): a pure function of the rows,
    so the packed split, and with it the rows of every training step, is the same on every rank and
    every resume. A packed row concatenates whole rows: ``input_ids`` and ``labels`` as they are, except
    that the first label of each row is -100 (nothing predicts a row's first token from the row before
    it, and alone that label is never trained either: the loss shifts labels by one), and
    ``position_ids`` restarting at 0 for each row. Other columns (prompt, reference, prompt_len) are
    dropped: the train loop reads none of them, and the eval split is never packed.

    Packed rows are written a batch of bins at a time into an Arrow file (memory-mapped, as datasets'
    own), so memory holds the lengths and the bin lists, not the tokens.

    Args:
        ds: a tokenised split with ``input_ids`` and ``labels`` (lists of equal length per row).
        max_seq_len: the most tokens in one packed row (``data.max_seq_len``).
        scratch_dir: where the packed Arrow file goes (the caller saves the split elsewhere and removes
            it); default a temporary folder removed at process exit.

    Returns:
        The packed split (columns input_ids, labels, position_ids) and its statistics for the prepare
        report: rows, sequences, tokens, fill_ratio (tokens / (sequences * max_seq_len)), max_seq_len.

    Raises:
        DataError: ``ds`` lacks input_ids/labels, or a row is longer than ``max_seq_len``.
    """
    missing = [c for c in ("input_ids", "labels") if c not in ds.column_names]
    if missing:
        raise DataError(f"cannot pack a split without {missing}: it has {ds.column_names}")
    lengths = row_lengths(ds)
    try:
        rows, sizes = _ffd(lengths, max_seq_len)
    except ValueError as e:
        raise DataError(f"packing the train split: {e}") from e
    tokens = int(lengths.sum())
    stats = {
        "algorithm": "first_fit_decreasing",
        "rows": len(ds),
        "sequences": len(sizes),
        "tokens": tokens,
        "max_seq_len": max_seq_len,
        "fill_ratio": round(tokens / (len(sizes) * max_seq_len), 6) if len(sizes) else 0.0,
    }
    features = datasets.Features(
        {
            "input_ids": ds.features["input_ids"],
            "labels": ds.features["labels"],
            "position_ids": datasets.List(datasets.Value("int32")),
        }
    )
    return _write(ds.select_columns(["input_ids", "labels"]), rows, sizes, features, scratch_dir), stats


def _write(
    ds: datasets.Dataset,
    rows: np.ndarray,
    sizes: np.ndarray,
    features: datasets.Features,
    scratch_dir: str | Path | None,
) -> datasets.Dataset:
    """The packed rows in an Arrow file (memory-mapped), written a batch of bins at a time.

    Never through the datasets cache: a packed split is built once per prepare (its cache is the
    prepare stage's), and one cached from older code must never be read back. Without ``scratch_dir``
    the file goes to a temporary folder removed when the process exits, by then saved elsewhere.
    """
    if scratch_dir is None:
        scratch_dir = tempfile.mkdtemp(prefix="deltatune-pack-")
        atexit.register(shutil.rmtree, scratch_dir, ignore_errors=True)
    Path(scratch_dir).mkdir(parents=True, exist_ok=True)
    fd, path = tempfile.mkstemp(prefix="packed-", suffix=".arrow", dir=scratch_dir)
    schema = features.arrow_schema
    with os.fdopen(fd, "wb") as f, pa.ipc.new_stream(f, schema) as writer:  # datasets' own cache format
        for table in _packed_tables(ds, rows, sizes, schema):
            writer.write_table(table)
    return datasets.Dataset.from_file(path, info=datasets.DatasetInfo(features=features))


def _packed_tables(
    ds: datasets.Dataset, rows: np.ndarray, sizes: np.ndarray, schema: pa.Schema
) -> Iterator[pa.Table]:
    """Packed rows, a batch of bins per Arrow table: each bin's rows back to back, the first label of
    each row -100, positions from 0 per row. Arrow and numpy throughout: no token becomes a Python int."""
    if ds._indices is not None:  # a select/shuffle view: row i of ds is row indices[i] of its table
        rows = ds._indices.column(0).to_numpy().astype(np.int64)[rows]
    take = _taker(ds.data.table)
    bin_starts = np.cumsum(sizes) - sizes  # (bins,) first entry of each bin in ``rows``
    for first in range(0, len(sizes), _READ_BATCH):
        last = min(first + _READ_BATCH, len(sizes))
        lo, hi = int(bin_starts[first]), int(bin_starts[last - 1] + sizes[last - 1])
        table = take(rows[lo:hi])  # the chunk's rows, in bin order
        ids = table.column("input_ids").combine_chunks()  # ListArray, one entry per row
        labels = table.column("labels").combine_chunks()
        row_len = pc.list_value_length(ids).to_numpy(zero_copy_only=False).astype(np.int64)  # (rows,)
        row_start = np.cumsum(row_len) - row_len  # (rows,) offset of each row in the chunk's tokens
        label_values = labels.flatten().to_numpy(zero_copy_only=False).copy()  # (tokens,)
        label_values[row_start] = IGNORE_INDEX
        positions = np.arange(int(row_len.sum())) - np.repeat(row_start, row_len)  # (tokens,) 0.. per row
        bin_rows = np.append(bin_starts[first:last], hi) - lo  # (bins + 1,) row offsets of the chunk's bins
        offsets = pa.array(np.append(row_start, row_len.sum())[bin_rows], type=pa.int32())  # token offsets
        columns = {
            "input_ids": ids.flatten(),
            "labels": pa.array(label_values),
            "position_ids": pa.array(positions),
        }
        yield pa.Table.from_arrays(
            [pa.ListArray.from_arrays(offsets, columns[f.name].cast(f.type.value_type)) for f in schema],
            schema=schema,
        )


def _taker(table: pa.Table):
    """``take(indices) -> pa.Table`` of those rows in that order, reading only their record batches.

    ``pa.Table.take`` over a table of many record batches (a memory-mapped split) may first concatenate
    each whole column, i.e. copy the split into memory; this takes from each batch on its own.
    """
    batches = table.to_batches()
    starts = np.cumsum([0] + [len(b) for b in batches])  # (batches + 1,)

    def take(indices: np.ndarray) -> pa.Table:
        which = np.searchsorted(starts, indices, side="right") - 1  # (k,) batch of each index
        by_batch = np.argsort(which, kind="stable")  # (k,)
        parts = []
        for b in np.unique(which).tolist():
            local = indices[by_batch][which[by_batch] == b] - starts[b]
            parts.append(batches[b].take(pa.array(local)))
        grouped = pa.Table.from_batches(parts, schema=table.schema).combine_chunks()  # only the k rows
        return grouped.take(pa.array(np.argsort(by_batch, kind="stable")))  # back to the asked order

    return take
