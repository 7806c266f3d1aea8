"""Prepared splits back into tensors: load_split and the padding collate the train and eval loops share."""

from __future__ import annotations

from pathlib import Path

import datasets
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
