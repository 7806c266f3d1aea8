"""The merge stage: fold the adapter into the base (W + s·B·A; DoRA: m/||W + s·B·A||·(W + s·B·A))
and measure the post-merge gap. GPT-2's Conv1D bases merge the transposed update (core.lora).

The gap is measured, not assumed: logits of the saved merged model, reloaded with plain
transformers, against the adapter-on-base model on held-out rows.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from core.adapter import load_adapter
from core.config import RunConfig
from core.data import collate, load_split
from core.dtypes import DTYPES
from core.errors import DeltatuneError
from core.evaluate import heldout_loss
from core.fsutil import writing_dir
from core.lora import merge_and_unload
from core.modeling import load_model, load_tokenizer
from core.run import RunDir

log = logging.getLogger(__name__)

GAP_ROWS = 16


class MergeGapError(DeltatuneError, RuntimeError):
    """The merged model does not reproduce the adapter-on-base model within tolerance (a retry merges
    the same weights the same way: not retryable)."""


@torch.no_grad()
def _logits(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits  # (B, T, V)
    return out.float() * batch["attention_mask"][..., None]  # padded positions compare as 0


def _gap(merged_dir, batch, ref, rows, ref_loss, cfg: RunConfig, pad_id: int) -> dict[str, Any]:
    """Reload the saved merged model with nothing of ours involved (what a user of it gets) and
    compare its logits and loss with the adapter-on-base model's."""
    from transformers import AutoModelForCausalLM

    reloaded = AutoModelForCausalLM.from_pretrained(
        merged_dir, dtype=DTYPES[cfg.merge.dtype], use_safetensors=True
    )
    reloaded.eval()
    diff = (_logits(reloaded, batch) - ref).abs()  # (B, T, V), zero at padding
    merged_loss = heldout_loss(reloaded, rows, pad_id, GAP_ROWS)["loss"]
    gap = {
        "max_logit_gap": float(diff.max()),
        "mean_logit_gap": float(diff.sum() / (batch["attention_mask"].sum() * diff.size(-1))),
        "loss_adapter": ref_loss,
        "loss_merged": merged_loss,
        "loss_gap": merged_loss - ref_loss,
    }
    if gap["max_logit_gap"] > cfg.merge.max_logit_gap:
        raise MergeGapError(
            f"merged model differs from adapter-on-base by {gap['max_logit_gap']:.3g} in logits "
            f"(allowed {cfg.merge.max_logit_gap:g}; loss {ref_loss:.4f} -> {merged_loss:.4f}). "
            "A low-precision merge.dtype or non-finite adapter weights cause this; merge in float32 "
            "or raise merge.max_logit_gap if the loss gap is acceptable"
        )
    return gap


def _vs_4bit(cfg: RunConfig, adapter_dir, merged_dir, batch, rows, pad_id: int) -> dict[str, float]:
    """QLoRA only: the merged model against the model that was trained and evaluated, the adapter on
    the 4-bit base. Reported, not gated: this is the NF4 approximation error, which merging into
    the original weights removes (for better or worse), not a merge defect."""
    from transformers import AutoModelForCausalLM

    trained = load_model(cfg.model, quant=cfg.quant)
    load_adapter(trained, adapter_dir)
    trained.eval()
    merged = AutoModelForCausalLM.from_pretrained(
        merged_dir, dtype=DTYPES[cfg.merge.dtype], use_safetensors=True
    )
    merged.eval()
    diff = (_logits(merged, batch) - _logits(trained, batch)).abs()
    loss_trained = heldout_loss(trained, rows, pad_id, GAP_ROWS)["loss"]
    loss_merged = heldout_loss(merged, rows, pad_id, GAP_ROWS)["loss"]
    return {
        "max_logit_gap": float(diff.max()),
        "loss_4bit_trained": loss_trained,
        "loss_merged": loss_merged,
        "loss_gap": loss_merged - loss_trained,
    }


def merge(
    cfg: RunConfig, run_dir: str | Path, adapter_dir: str | Path, eval_data: str | Path | None
) -> dict[str, Any]:
    """Merge ``adapter_dir`` into a fresh copy of the base and save ``run_dir/merged`` (HF format).

    The base is loaded unquantized in ``merge.dtype`` (also for QLoRA: the 4-bit base was only a
    training-time approximation of these weights, and the gap check reports what that costs).

    Raises:
        MergeGapError: max |logits(merged) - logits(adapter-on-base)| exceeds ``merge.max_logit_gap``.
    """
    rd = RunDir(run_dir)
    tokenizer = load_tokenizer(cfg.model)
    model = load_model(cfg.model, dtype=DTYPES[cfg.merge.dtype])
    load_adapter(model, adapter_dir)
    model.eval()
    rows = list(load_split(eval_data))[:GAP_ROWS] if eval_data else []
    batch = collate(rows, tokenizer.pad_token_id) if rows else None
    ref = _logits(model, batch) if batch is not None else None
    ref_loss = heldout_loss(model, rows, tokenizer.pad_token_id, GAP_ROWS)["loss"] if rows else None

    merge_and_unload(model)
    out = rd.merged
    report: dict[str, Any] = {
        "dtype": cfg.merge.dtype,
        "gap_rows": len(rows),
        "max_logit_gap_allowed": cfg.merge.max_logit_gap,
    }
    with writing_dir(out) as tmp:  # a merge that fails its gap check never replaces a good one
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        if batch is not None:
            report.update(_gap(tmp, batch, ref, rows, ref_loss, cfg, tokenizer.pad_token_id))
        if batch is not None and cfg.method == "qlora":
            report["vs_4bit_trained"] = _vs_4bit(cfg, adapter_dir, tmp, batch, rows, tokenizer.pad_token_id)
    report["merged_dir"] = str(out)
    rd.write_json(rd.merge_report, report)
    log.info("merged into %s: max logit gap %s", out, report.get("max_logit_gap"))
    return report
