"""The merge stage: fold the adapter into the base (W + s·B·A; DoRA: m/||W + s·B·A||·(W + s·B·A)), write a
plain HF model to ``run_dir/merged`` and measure the post-merge gap (docs/merge.md).

report = merge(cfg, "runs/x", "runs/x/adapter", "runs/x/data/eval")

``merge.mode: streaming`` (sharded.py) reads the base one tensor at a time; ``in_memory`` (memory.py) loads
it whole. The gap (gap.py) is measured, not assumed: the saved merged model, reloaded with plain
transformers, against the adapter-on-base model on held-out rows, one model in memory at a time. For QLoRA,
``merge.base`` chooses the weights merged into: the original ones, dequant(NF4(W)), or (auto) whichever of
the two lands closer to the adapter-on-4-bit model that was trained.
"""

from __future__ import annotations

import gc
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any

from core.config import RunConfig
from core.data import load_split
from core.dtypes import DTYPES
from core.fsutil import writing_dir
from core.merge.gap import (
    GAP_ROWS,
    MergeGapError,
    Outputs,
    Probe,
    check,
    compare,
    outputs,
    peak_rss,
    reload,
)
from core.merge.memory import Base, adapted_model, save_merged, trained_model
from core.merge.sharded import BaseView, base_dir, dequantized_view, skeleton, stream_merge
from core.modeling import load_tokenizer
from core.run import RunDir

log = logging.getLogger(__name__)

__all__ = ["GAP_ROWS", "MergeGapError", "candidates", "choose", "merge", "merge_weights"]


def candidates(cfg: RunConfig, has_rows: bool) -> list[Base]:
    """The bases to merge into: ``merge.base`` for QLoRA (auto: both, or dequantized when there are no rows
    to choose by), the original weights for every other method."""
    if cfg.method != "qlora" or cfg.merge.base == "original":
        return ["original"]
    if cfg.merge.base == "dequantized" or not has_rows:
        return ["dequantized"]
    return ["original", "dequantized"]


def choose(results: dict[str, dict[str, Any]]) -> str:
    """The candidate whose merged model is closest to the adapter-on-4-bit model: smallest |loss delta|, then
    smallest max logit gap. Loss first: it averages every probe token and is what eval and the gates read,
    while the max logit gap is one extreme element (and an fp32 dequantized merge wins it by construction)."""
    return min(
        results,
        key=lambda b: (
            abs(results[b]["vs_4bit_trained"]["loss_gap"]),
            results[b]["vs_4bit_trained"]["max_logit_gap"],
        ),
    )


def merge_weights(
    cfg: RunConfig, adapter_dir: str | Path, out_dir: str | Path, base: Base = "original"
) -> dict[str, Any]:
    """Write the merged weights, config and generation config into ``out_dir`` in ``merge.mode`` (no
    tokenizer, no gap), measuring the peak RSS and the time of the merge itself.

    in_memory counts from loading the base (the whole model is the cost); streaming from the first read.
    """
    mc = cfg.merge
    t0 = time.perf_counter()
    with peak_rss() as rss:
        if mc.mode == "in_memory":
            model = adapted_model(cfg, adapter_dir, base)
            save_merged(model, out_dir, mc.max_shard_bytes)
            del model
            info: dict[str, Any] = {}
        else:
            src = base_dir(cfg.model)
            skel = skeleton(src, trust_remote_code=cfg.model.trust_remote_code)
            dtype = DTYPES[mc.dtype]
            view = (
                dequantized_view(skel, cfg.quant, dtype, DTYPES[cfg.model.dtype])
                if base == "dequantized"
                else BaseView(dtype)
            )
            info = stream_merge(src, adapter_dir, out_dir, view, mc.max_shard_bytes, model=skel)
        gc.collect()
    return {
        **info,
        "peak_rss_mb": round(rss.peak_mb, 1),
        "peak_rss_delta_mb": round(rss.delta_mb, 1),
        "peak_rss_method": rss.method,
        "merge_seconds": round(time.perf_counter() - t0, 3),
    }


def _reference(cfg: RunConfig, adapter_dir, base: Base, probe: Probe) -> Outputs:
    model = adapted_model(cfg, adapter_dir, base)
    ref = outputs(model, probe)
    del model
    gc.collect()
    return ref


def _measure(cfg: RunConfig, merged_dir: Path, probe: Probe, ref: Outputs, trained: Outputs | None) -> dict:
    model = reload(merged_dir, cfg.merge.dtype)
    got = outputs(model, probe)
    del model
    gc.collect()
    out = {"gap": compare(got, ref, probe)}
    if trained is not None:
        out["vs_4bit_trained"] = compare(got, trained, probe, ref_name="4bit_trained")
    return out


def merge(
    cfg: RunConfig,
    run_dir: str | Path,
    adapter_dir: str | Path,
    eval_data: str | Path | None,
) -> dict[str, Any]:
    """Merge ``adapter_dir`` into the base and save ``run_dir/merged`` (HF format), gap-checked.

    Order, so that no two models are ever in memory together: the references first (QLoRA: the
    adapter-on-4-bit outputs; then the adapter on each candidate base), each model freed before the next;
    then each candidate merged and reloaded alone. Nothing replaces ``merged/`` unless every check passes.

    Raises:
        MergeGapError: a gap over ``merge.max_logit_gap`` or ``merge.max_loss_gap``.
    """
    rd = RunDir(run_dir)
    mc = cfg.merge
    tokenizer = load_tokenizer(cfg.model)
    probe = Probe.of(list(load_split(eval_data))[:GAP_ROWS], tokenizer.pad_token_id) if eval_data else None
    bases = candidates(cfg, probe is not None)
    trained = None
    if probe is not None and cfg.method == "qlora":
        model = trained_model(cfg, adapter_dir)
        trained = outputs(model, probe)
        del model
        gc.collect()
    refs = {b: _reference(cfg, adapter_dir, b, probe) for b in bases} if probe is not None else {}

    report: dict[str, Any] = {
        "mode": mc.mode,
        "dtype": mc.dtype,
        "gap_rows": len(probe.rows) if probe else 0,
        "max_logit_gap_allowed": mc.max_logit_gap,
        "max_loss_gap_allowed": mc.max_loss_gap,
    }
    results: dict[str, dict[str, Any]] = {}
    with writing_dir(rd.merged) as tmp:  # a merge that fails its gap check never replaces a good one
        for b in bases:
            dest = tmp if len(bases) == 1 else tmp / f".candidate-{b}"
            results[b] = merge_weights(cfg, adapter_dir, dest, b)
            tokenizer.save_pretrained(dest)
            if probe is not None:
                results[b] |= _measure(cfg, dest, probe, refs[b], trained)
        chosen = choose(results) if len(bases) > 1 else bases[0]
        if len(bases) > 1:
            for p in (tmp / f".candidate-{chosen}").iterdir():
                os.replace(p, tmp / p.name)
            for b in bases:
                shutil.rmtree(tmp / f".candidate-{b}", ignore_errors=True)
        res = results[chosen]
        if probe is not None:
            report |= check(res["gap"], mc)
        report |= {k: v for k, v in res.items() if k != "gap"}
        if cfg.method == "qlora":
            report |= {"base": chosen, "base_requested": mc.base}
            if len(bases) > 1:
                report["candidates"] = results
    report["merged_dir"] = str(rd.merged)
    rd.write_json(rd.merge_report, report)
    log.info(
        "merged into %s (%s): max logit gap %s, peak RSS %s MB",
        rd.merged,
        mc.mode,
        report.get("max_logit_gap"),
        report.get("peak_rss_mb"),
    )
    return report
