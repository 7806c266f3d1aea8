"""Packing: rows of a tokenised split into sequences of up to max_seq_len, no token attending across rows.

packed, stats = pack_split(train_ds, max_seq_len=512, seed=0)   # first-fit decreasing; see docs/data.md
"""

from __future__ import annotations

from typing import Any

import datasets


def pack_split(ds: datasets.Dataset, max_seq_len: int, seed: int) -> tuple[datasets.Dataset, dict[str, Any]]:
    """Pack the rows of ``ds`` (input_ids, labels, ...) into sequences of at most ``max_seq_len`` tokens.

    Returns the packed split (with per-row ``position_ids`` restarting at 0) and its statistics for the
    prepare report.
    """
    raise NotImplementedError("data.packing is being built (issue 10)")
