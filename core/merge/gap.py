"""The post-merge gap: a model's logits and loss on the probe rows, how far two such outputs lie apart, and
the limits (``merge.max_logit_gap``, ``merge.max_loss_gap``) that fail the stage. The task metric of the
merged model is the evaluate stage's (``merge.max_metric_drop``, core/evaluate.py).

Also the peak-RSS meter the merge report quotes (docs/merge.md).
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from core.config import MergeConfig
from core.data import collate
from core.dtypes import DTYPES
from core.errors import DeltatuneError
from core.evaluate import next_token_nll

GAP_ROWS = 16


class MergeGapError(DeltatuneError, RuntimeError):
    """The merged model does not reproduce the adapter-on-base model within tolerance (a retry merges
    the same weights the same way: not retryable)."""


@dataclass
class Probe:
    """The probe rows, collated once: every model of the stage is scored on exactly these."""

    rows: list[dict]
    batch: dict[str, torch.Tensor]

    @classmethod
    def of(cls, rows: list[dict], pad_id: int) -> Probe | None:
        rows = rows[:GAP_ROWS]
        return cls(rows, collate(rows, pad_id)) if rows else None


@dataclass
class Outputs:
    """What a model computed on the probe: fp32 logits (B, T, V), zero at padding, and the mean loss."""

    logits: torch.Tensor
    loss: float


@torch.no_grad()
def outputs(model: nn.Module, probe: Probe) -> Outputs:
    """``model``'s logits and held-out loss on ``probe`` (eval mode), from one forward pass."""
    model.eval()
    b = probe.batch
    logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits  # (B, T, V)
    nll, tokens = next_token_nll(logits, b["labels"])
    logits = logits.float() * b["attention_mask"][..., None]  # padded positions compare as 0
    return Outputs(logits, nll / max(tokens, 1))


def reload(merged_dir: str | Path, dtype: str):
    """The saved merged model as a user gets it: plain transformers, nothing of ours involved."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(merged_dir, dtype=DTYPES[dtype], use_safetensors=True)


def compare(got: Outputs, ref: Outputs, probe: Probe, *, ref_name: str = "adapter") -> dict[str, float]:
    """Max and mean |logit| difference over real tokens and the loss delta ``got - ref``."""
    diff = (got.logits - ref.logits).abs()  # (B, T, V), zero at padding
    tokens = probe.batch["attention_mask"].sum() * diff.size(-1)
    return {
        "max_logit_gap": float(diff.max()),
        "mean_logit_gap": float(diff.sum() / tokens),
        f"loss_{ref_name}": ref.loss,
        "loss_merged": got.loss,
        "loss_gap": got.loss - ref.loss,
    }


def check(gap: dict[str, Any], cfg: MergeConfig) -> dict[str, Any]:
    """``gap``, or MergeGapError naming every limit exceeded.

    Raises:
        MergeGapError: max logit gap over ``merge.max_logit_gap``, or |loss gap| over ``merge.max_loss_gap``
            (when set).
    """
    problems = []
    if not gap["max_logit_gap"] <= cfg.max_logit_gap:  # NaN fails too
        problems.append(
            f"max logit gap {gap['max_logit_gap']:.3g} over merge.max_logit_gap={cfg.max_logit_gap:g}"
        )
    if cfg.max_loss_gap is not None and not abs(gap["loss_gap"]) <= cfg.max_loss_gap:
        problems.append(f"|loss gap| {abs(gap['loss_gap']):.3g} over merge.max_loss_gap={cfg.max_loss_gap:g}")
    if problems:
        raise MergeGapError(
            "the merged model does not reproduce the adapter-on-base model: "
            + "; ".join(problems)
            + f" (loss {gap['loss_merged']:.4f} merged vs {gap.get('loss_adapter', float('nan')):.4f}). "
            "A low-precision merge.dtype or non-finite adapter weights cause this; set merge.dtype: float32, "
            "or raise the limit if the gap is acceptable. Nothing was written to merged/"
        )
    return dict(gap)


# ----------------------------------------------------------------------------------------------------
# Peak RSS
# ----------------------------------------------------------------------------------------------------


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _hwm_bytes() -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _reset_hwm() -> bool:
    """Reset the kernel's peak-RSS mark to the current RSS (``/proc/PID/clear_refs``, value 5, Linux >= 4.0:
    Documentation/filesystems/proc.rst); False where that is not allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


@dataclass
class PeakRSS:
    """Peak resident set size over a block, in MiB: ``ru_maxrss`` covers the whole process lifetime, so
    the kernel's mark is reset on entry where allowed, and a thread samples /proc/self/statm every
    ``interval`` seconds besides (a sample can miss a short spike; the reset mark cannot)."""

    peak_mb: float = 0.0
    start_mb: float = 0.0  # RSS on entry: the interpreter, torch and transformers already imported
    method: str = "sampled"

    @property
    def delta_mb(self) -> float:
        """What the block added on top of the RSS it started at."""
        return self.peak_mb - self.start_mb


@contextmanager
def peak_rss(interval: float = 0.005) -> Iterator[PeakRSS]:
    result = PeakRSS()
    stop = threading.Event()
    peak = [_rss_bytes()]
    result.start_mb = peak[0] / 2**20

    def sample() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], _rss_bytes())
            time.sleep(interval)

    hwm = _reset_hwm()
    thread = threading.Thread(target=sample, daemon=True, name="peak-rss")
    thread.start()
    try:
        yield result
    finally:
        stop.set()
        thread.join()
        peak[0] = max(peak[0], _rss_bytes())
        mark = _hwm_bytes() if hwm else None
        if mark is not None:
            peak[0], result.method = max(peak[0], mark), "vmhwm"
        result.peak_mb = peak[0] / 2**20
