"""Prepared splits back into tensors: load_split and the padding collate the train and eval loops share."""

from __future__ import annotations

from pathlib import Path

import datasets
import numpy as np
import pyarrow.compute as pc
import torch

from core.data.encode import IGNORE_INDEX
from core.data.errors import DataError


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


def trained_tokens(ds: datasets.Dataset, batch_size: int = 4096) -> torch.Tensor:
    """Tokens each row trains, (num_rows,): labels after the causal shift (``labels[1:] != -100``).

    The same count for a row packed or alone (core.data.packing sets each packed row's first label to
    -100). Read from Arrow a batch of rows at a time: no label becomes a Python int.
    """
    out = [np.zeros(0, dtype=np.int64)]
    for table in ds.select_columns(["labels"]).with_format("arrow").iter(batch_size=batch_size):
        labels = table.column("labels").combine_chunks()  # ListArray, one entry per row
        lens = pc.list_value_length(labels).to_numpy(zero_copy_only=False).astype(np.int64)  # (rows,)
        trained = labels.flatten().to_numpy(zero_copy_only=False) != IGNORE_INDEX  # (tokens,)
        starts = np.cumsum(lens) - lens  # (rows,)
        trained[starts[lens > 0]] = False  # a row's first label is never predicted
        running = np.concatenate([[0], np.cumsum(trained, dtype=np.int64)])  # (tokens + 1,)
        out.append(running[starts + lens] - running[starts])  # (rows,)
    return torch.from_numpy(np.concatenate(out))


def collate(batch: list[dict], pad_id: int, *, flatten: bool = False) -> dict[str, torch.Tensor]:
    """Right-pad a list of rows into ``input_ids``, ``labels`` (-100 pad) and a mask, each (B, T).

    Plain rows get an ``attention_mask``. Packed rows (with ``position_ids``, core.data.packing) get
    ``position_ids`` and no ``attention_mask``: transformers then finds the packed rows from the
    position ids (``find_packed_sequence_indices`` in transformers/masking_utils.py, a new row wherever
    the position does not step by 1) and builds a block-diagonal causal mask, so no token attends
    across rows. A padded position gets position id 0, so each pad token is a one-token row of its own:
    it attends only to itself, nothing attends to it, and its label is -100 (no token).

    Args:
        batch: rows with ``input_ids`` and ``labels`` (lists or 1-D tensors), and ``position_ids`` when
            packed; other keys are ignored.
        pad_id: the id written into padded ``input_ids`` positions (masked out, so any valid id works).
        flatten: packed rows only: one (1, sum of lengths) row with no padding at all, the layout
            flash-attention-2 needs (its position-id varlen path, ``_is_packed_sequence`` in
            transformers/modeling_flash_attention_utils.py, takes batch size 1 only).

    Raises:
        ValueError: an empty batch, a row whose columns differ in length, or a mix of packed and plain rows.
    """
    if not batch:
        raise ValueError("collate got an empty batch")
    packed = ["position_ids" in row for row in batch]
    if any(packed) != all(packed):
        raise ValueError("collate got packed rows (position_ids) mixed with plain rows")
    if flatten and not packed[0]:
        raise ValueError("collate(flatten=True) needs packed rows (with position_ids)")
    cols = ("input_ids", "labels", "position_ids") if packed[0] else ("input_ids", "labels")
    for i, row in enumerate(batch):
        n = len(row["input_ids"])
        for c in cols[1:]:
            if len(row[c]) != n:
                raise ValueError(f"row {i}: {n} input_ids but {len(row[c])} {c}")
    if flatten:
        return {
            c: torch.cat([torch.as_tensor(row[c], dtype=torch.long) for row in batch]).unsqueeze(0)  # (1, ΣT)
            for c in cols
        }
    T = max(len(row["input_ids"]) for row in batch)
    input_ids = torch.full((len(batch), T), pad_id, dtype=torch.long)  # (B, T)
    labels = torch.full((len(batch), T), IGNORE_INDEX, dtype=torch.long)  # (B, T)
    mask = torch.zeros((len(batch), T), dtype=torch.long)  # (B, T): attention_mask, or position_ids if packed
    for i, row in enumerate(batch):
        n = len(row["input_ids"])
        input_ids[i, :n] = torch.as_tensor(row["input_ids"], dtype=torch.long)
        labels[i, :n] = torch.as_tensor(row["labels"], dtype=torch.long)
        mask[i, :n] = torch.as_tensor(row["position_ids"], dtype=torch.long) if packed[0] else 1
    key = "position_ids" if packed[0] else "attention_mask"
    return {"input_ids": input_ids, "labels": labels, key: mask}
