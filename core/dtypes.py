"""The config's dtype names (``model.dtype``, ``quant.compute_dtype``) as torch dtypes: one table for
every module that loads or quantizes weights."""

from __future__ import annotations

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
