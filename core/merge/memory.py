"""The models the merge stage scores, one at a time: adapter on the base it merges into (original weights, or
QLoRA's dequant(NF4(W))), adapter on the 4-bit base that was trained; and the in-memory merge of the first.

model = adapted_model(cfg, "runs/x/adapter", "dequantized"); save_merged(model, "runs/x/merged", 2 * 10**9)
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import torch
from torch import nn

from core.adapter import load_adapter
from core.config import RunConfig
from core.dtypes import DTYPES
from core.lora import merge_and_unload
from core.modeling import load_model
from core.targets import is_conv1d

Base = Literal["original", "dequantized"]


def _dequantize_in_place(model: nn.Module, cfg: RunConfig) -> None:
    """Replace every weight core.quant.quantize_model would make 4-bit by dequant(quant(W)), then cast every
    parameter to merge.dtype: the base the QLoRA adapter was trained against, at full size."""
    from core.quant import quantizable, roundtrip_4bit  # at call time: bitsandbytes, which only QLoRA needs

    named, _ = quantizable(model, cfg.quant.skip_modules)
    with torch.no_grad():
        for _, layer in named:
            w = layer.weight.data
            if is_conv1d(layer):  # (in, out): quantized as (out, in), as quantize_model does
                layer.weight.data = roundtrip_4bit(w.t(), cfg.quant).t().contiguous()
            else:
                layer.weight.data = roundtrip_4bit(w, cfg.quant)
        dtype = DTYPES[cfg.merge.dtype]
        for p in model.parameters():  # unique parameters: a tied pair is cast once and stays tied
            if p.is_floating_point():
                p.data = p.data.to(dtype)


def adapted_model(cfg: RunConfig, adapter_dir: str | Path, base: Base = "original") -> nn.Module:
    """The adapter on the base it is merged into, in ``merge.dtype`` (eval mode).

    ``original``: the base weights loaded in merge.dtype. ``dequantized`` (QLoRA): loaded in model.dtype, as
    training loaded them, the 4-bit layers replaced by dequant(quant(W)), then cast to merge.dtype.
    """
    if base == "original":
        model = load_model(cfg.model, dtype=DTYPES[cfg.merge.dtype])
    else:
        model = load_model(cfg.model)
        _dequantize_in_place(model, cfg)
    load_adapter(model, adapter_dir)
    return model.eval()


def trained_model(cfg: RunConfig, adapter_dir: str | Path) -> nn.Module:
    """QLoRA: the adapter on the 4-bit base, the model that was trained and evaluated (eval mode)."""
    model = load_model(cfg.model, quant=cfg.quant)
    load_adapter(model, adapter_dir)
    return model.eval()


def save_merged(model: nn.Module, out_dir: str | Path, max_shard_bytes: int) -> None:
    """Today's merge: merge_and_unload the adapted model in place and save_pretrained it (weights, config,
    generation config). The model holds the merged weights afterwards."""
    merge_and_unload(model)
    model.save_pretrained(out_dir, safe_serialization=True, max_shard_size=max_shard_bytes)
