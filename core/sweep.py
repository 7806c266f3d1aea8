"""The sweep's measurements: one row per variant from its finetune result, the recommendation, the table
and the pictures. flows/sweep.py runs the variants; everything here is plain functions.

row = variant_row(name, cfg, result, result["preflight"]["trainable_formula"], measure_latency(cfg, result))
rec = recommend(rows, cfg.sweep)                                # the smallest variant within tolerance
write_outputs(rows, rec, out_dir)                               # sweep.csv, sweep.md, sweep.json, PNGs

The comparison is the LoRA-vs-full-fine-tuning article's (README, "Sweeps"): trainable share, memory,
time, delta size, quality against rank (the rank-1 collapse), forgetting, merged latency, merge gap.
"""

from __future__ import annotations

import csv
import io
import logging
import math
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from core.config import RunConfig, SweepConfig
from core.fsutil import atomic_write
from core.run import RunDir
from core.stages import snapshot_bytes

log = logging.getLogger(__name__)

# (key, header, format) of the table's columns, in order.
COLUMNS: list[tuple[str, str, str]] = [
    ("variant", "variant", "{}"),
    ("method", "method", "{}"),
    ("r", "r", "{}"),
    ("targets", "targets", "{}"),
    ("status", "status", "{}"),
    ("trainable_params", "trainable", "{:,}"),
    ("trainable_share", "share", "{:.3%}"),
    ("formula_ok", "= r·(d+k)", "{}"),
    ("peak_mem_mb", "peak MB", "{:.0f}"),
    ("wall_time_s", "train s", "{:.1f}"),
    ("tokens_per_s", "tok/s", "{:.0f}"),
    ("delta_mb", "delta MB", "{:.2f}"),
    ("eval_loss", "eval loss", "{:.4f}"),
    ("task_metric", "task metric", "{:.3f}"),
    ("merge_gap", "merge gap", "{:.2e}"),
    ("forgetting_delta", "forgetting Δloss", "{:+.4f}"),
    ("latency_ratio", "latency vs base", "{:.3f}"),
    ("error", "error", "{}"),
]
PICTURES = ("quality.png", "cost.png")


def _targets(cfg: RunConfig) -> str:
    if cfg.method == "full":
        return "every weight"
    t = cfg.lora.target_modules
    return t if isinstance(t, str) else ",".join(t)


def failed_row(name: str, cfg: RunConfig | None, error: str) -> dict[str, Any]:
    """The row of a variant that did not finish: its settings and the error, every measure empty."""
    row: dict[str, Any] = dict.fromkeys(k for k, _, _ in COLUMNS)
    row.update(variant=name, status="failed", error=" ".join(error.split()) or "failed")
    if cfg is not None:
        row.update(method=cfg.method, r=None if cfg.method == "full" else cfg.lora.r, targets=_targets(cfg))
    return row


def variant_row(
    name: str, cfg: RunConfig, result: dict[str, Any], formula: int | None, latency: float | None = None
) -> dict[str, Any]:
    """One finished variant's measurements, from its finetune flow's result.

    Args:
        result: what ``flows.finetune.finetune`` returned (each stage's summary, also when reused).
        formula: the trainable-parameter count the architecture implies (core.preflight's
            ``trainable_formula``: r·(d + k) per adapted matrix, every weight for full fine-tuning).
        latency: the merged (or fully tuned) model's forward time over the base's (:func:`measure_latency`).
    """
    summary = result["train"]
    ev = result.get("eval") or {}
    merge = result.get("merge") or {}
    tuned = ev.get("tuned") or {}
    trainable = summary.get("trainable_params")
    wall = summary.get("wall_time_s")
    row = failed_row(name, cfg, "")
    row.update(
        status="ok",
        error=None,
        trainable_params=trainable,
        trainable_share=summary.get("trainable_share"),
        formula_ok=None if formula is None or trainable is None else trainable == formula,
        peak_mem_mb=summary.get("peak_mem_mb"),
        wall_time_s=wall,
        tokens_per_s=summary["tokens"] / wall if wall and summary.get("tokens") else None,
        # What a version of this variant adds on disk: the adapter, or for full fine-tuning the whole model.
        delta_mb=(snapshot_bytes(summary.get("files"), summary["output_dir"]) or 0) / 2**20,
        eval_loss=tuned.get("loss"),
        task_metric=tuned.get("task_metric", tuned.get("exact_match")),
        merge_gap=merge.get("max_logit_gap", 0.0 if cfg.method == "full" else None),
        forgetting_delta=(ev.get("forgetting") or {}).get("delta"),
        latency_ratio=latency,
        formula=formula,
    )
    return row


# ----------------------------------------------------------------------------------------------------
# The recommendation
# ----------------------------------------------------------------------------------------------------


def recommend(rows: list[dict[str, Any]], cfg: SweepConfig) -> dict[str, Any]:
    """The variant with the fewest trainable parameters whose quality is within ``cfg.tolerance`` of the
    best (among those that forget at most ``cfg.max_forgetting``, when set), and the warnings the numbers
    call for.

    Quality is the task metric (higher is better, absolute tolerance) where the eval scored one, else
    the eval loss (lower is better, relative tolerance). Warnings: the rank-1 collapse (r=1's metric below
    ``collapse_ratio`` of r=4's for the same method and targets, the article's catastrophe: the loss can
    look fine while the answers are wrong), and the best adapter trailing full fine-tuning by more than
    the tolerance.
    """
    ok = [r for r in rows if r["status"] == "ok"]
    out: dict[str, Any] = {"variant": None, "warnings": [], "tolerance": cfg.tolerance}
    if not ok:
        out["reason"] = "no variant finished"
        return out
    if cfg.max_forgetting is not None:
        forgot = [
            r for r in ok if r["forgetting_delta"] is None or r["forgetting_delta"] > cfg.max_forgetting
        ]
        out["warnings"] += [
            f"{r['variant']} is not recommended: its general-text loss rose by "
            f"{'an unmeasured amount' if r['forgetting_delta'] is None else format(r['forgetting_delta'], '.3f')}"
            f" (sweep.max_forgetting {cfg.max_forgetting:g})"
            for r in forgot
        ]
        ok = [r for r in ok if r not in forgot]
        if not ok:
            out["reason"] = (
                f"every finished variant forgets more than sweep.max_forgetting={cfg.max_forgetting:g}"
            )
            return out
    by_metric = all(r["task_metric"] is not None for r in ok)
    if not by_metric and any(r["eval_loss"] is None for r in ok):
        out["reason"] = "the variants were not evaluated (eval.enabled is false): nothing to compare"
        return out
    if by_metric:
        best = max(r["task_metric"] for r in ok)
        close = [r for r in ok if r["task_metric"] >= best - cfg.tolerance]
        criterion = f"task metric within {cfg.tolerance:g} of the best ({best:.3f})"
    else:
        best = min(r["eval_loss"] for r in ok)
        close = [r for r in ok if r["eval_loss"] <= best * (1 + cfg.tolerance)]
        criterion = (
            f"eval loss within {cfg.tolerance:.0%} of the best ({best:.4f}); no task metric was scored"
        )
    pick = min(close, key=lambda r: (r["trainable_params"] or math.inf, r["variant"]))
    out.update(
        variant=pick["variant"],
        metric="task_metric" if by_metric else "eval_loss",
        best=best,
        reason=f"fewest trainable parameters ({pick['trainable_params']:,}) with {criterion}",
    )
    key = "task_metric" if by_metric else "eval_loss"
    lora = {(r["method"], r["targets"], r["r"]): r for r in ok if r["method"] != "full"}
    for (method, targets, rank), r1 in lora.items():
        r4 = lora.get((method, targets, 4))
        if by_metric and rank == 1 and r4 and r1[key] < cfg.collapse_ratio * r4[key]:
            out["warnings"].append(
                f"rank-1 collapse: {r1['variant']} scores {r1[key]:.3f} against {r4['variant']}'s {r4[key]:.3f} "
                f"(eval loss {r1['eval_loss']:.4f} vs {r4['eval_loss']:.4f}): r=1 is too low a rank for this "
                "task; use r >= 4"
            )
    full = [r for r in ok if r["method"] == "full"]
    adapters = [r for r in ok if r["method"] != "full"]
    if full and adapters:
        f = full[0][key]
        b = max(r[key] for r in adapters) if by_metric else min(r[key] for r in adapters)
        gap = f - b if by_metric else (b - f) / f
        if gap > cfg.tolerance:
            out["warnings"].append(
                f"the best adapter trails full fine-tuning by {gap:.3g} "
                f"({'task metric' if by_metric else 'relative eval loss'}): {b:.4g} vs {f:.4g}; try a higher "
                "rank, more target modules, or full fine-tuning"
            )
    return out


# ----------------------------------------------------------------------------------------------------
# Latency: merged (or fully tuned) model vs base, same inputs, interleaved
# ----------------------------------------------------------------------------------------------------


@torch.no_grad()
def latency_ratio(tuned: nn.Module, base: nn.Module, ids: torch.Tensor, rounds: int = 7) -> float:
    """Forward time tuned ÷ base on ``ids`` (B, T): the fastest of ``rounds`` of each, the two timed
    alternately so that machine noise hits both; the minimum is the run least disturbed by other work
    (a merged model has the base's architecture: ~1.0 is expected)."""
    tuned.eval()
    base.eval()
    for m in (tuned, base):  # warm-up: allocator, kernels
        m(input_ids=ids)
    best = [math.inf, math.inf]
    for _ in range(rounds):
        for i, m in enumerate((tuned, base)):
            t0 = time.perf_counter()
            m(input_ids=ids)
            best[i] = min(best[i], time.perf_counter() - t0)
    return best[0] / best[1]


def measure_latency(cfg: RunConfig, result: dict[str, Any], rows: int = 8) -> float | None:
    """``latency_ratio`` of the variant's deployable model (the merged model, or the fully tuned one)
    against the base, on up to ``rows`` rows of its eval (else train) split; None when the variant
    produced no such model (merge disabled)."""
    from transformers import AutoModelForCausalLM

    from core.data import collate, load_split
    from core.modeling import load_model, load_tokenizer

    tuned_dir = (
        result["train"]["output_dir"]
        if cfg.method == "full"
        else (result.get("merge") or {}).get("merged_dir")
    )
    if not tuned_dir or not (Path(tuned_dir) / "config.json").is_file():
        return None
    split = result["data"]["eval_dir"] or result["data"]["train_dir"]
    batch = collate(list(load_split(split))[:rows], load_tokenizer(cfg.model).pad_token_id)
    base = load_model(cfg.model)
    dtype = next(base.parameters()).dtype
    tuned = AutoModelForCausalLM.from_pretrained(tuned_dir, dtype=dtype, use_safetensors=True)
    return latency_ratio(tuned, base, batch["input_ids"])


# ----------------------------------------------------------------------------------------------------
# Outputs: table (CSV, markdown), pictures, JSON
# ----------------------------------------------------------------------------------------------------


def _cell(row: dict[str, Any], key: str, fmt: str) -> str:
    v = row.get(key)
    if v is None:
        return "—"
    if isinstance(v, bool):
        return "yes" if v else "NO"
    text = fmt.format(v).replace("|", "\\|")
    return text if len(text) <= 160 else text[:159] + "…"  # the whole error is in sweep.csv/json


def to_csv(rows: list[dict[str, Any]]) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=[k for k, _, _ in COLUMNS], extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    w.writerows(rows)
    return buf.getvalue()


def to_markdown(rows: list[dict[str, Any]], rec: dict[str, Any], pictures: list[str] | None = None) -> str:
    cols = [c for c in COLUMNS if c[0] != "error" or any(r.get("error") for r in rows)]
    lines = [
        "| " + " | ".join(h for _, h, _ in cols) + " |",
        "|" + "---|" * len(cols),
        *("| " + " | ".join(_cell(r, k, f) for k, _, f in cols) + " |" for r in rows),
        "",
    ]
    if rec.get("variant"):
        lines.append(f"**Recommended: `{rec['variant']}`**: {rec['reason']}.")
    else:
        lines.append(f"**No recommendation**: {rec.get('reason')}.")
    lines += [f"\n> warning: {w}" for w in rec["warnings"]]
    lines += [f"\n![{p}]({p})" for p in pictures or []]
    return "\n".join(lines) + "\n"


def plot(rows: list[dict[str, Any]], out_dir: Path) -> list[str]:
    """quality.png (task metric and eval loss against trainable parameters, log x, full fine-tuning a
    dashed reference line) and cost.png (peak memory and train time per variant); returns their names."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    ok = [r for r in rows if r["status"] == "ok" and r["trainable_params"]]
    if not ok:
        return []
    adapters = [r for r in ok if r["method"] != "full"]
    full = next((r for r in ok if r["method"] == "full"), None)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, key, label in (
        (axes[0], "task_metric", "task metric (tuned)"),
        (axes[1], "eval_loss", "eval loss"),
    ):
        pts = [r for r in adapters if r[key] is not None]
        if not pts and (full is None or full[key] is None):
            ax.text(0.5, 0.5, f"no {label} was scored", ha="center", transform=ax.transAxes)
            continue
        for method, marker in (("lora", "o"), ("qlora", "s")):
            sel = [r for r in pts if r["method"] == method]
            ax.scatter(
                [r["trainable_params"] for r in sel], [r[key] for r in sel], marker=marker, label=method
            )
        for r in pts:
            ax.annotate(
                r["variant"],
                (r["trainable_params"], r[key]),
                fontsize=7,
                xytext=(3, 3),
                textcoords="offset points",
            )
        if full is not None and full[key] is not None:
            ax.axhline(full[key], linestyle="--", color="gray", label="full fine-tuning")
        if pts:
            ax.set_xscale("log")
        ax.set_xlabel("trainable parameters (log)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out_dir / PICTURES[0], dpi=110)
    plt.close(fig)

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    names = [r["variant"] for r in ok]
    for ax, key, label in (
        (axes[0], "peak_mem_mb", "peak memory (MB)"),
        (axes[1], "wall_time_s", "train time (s)"),
    ):
        ax.bar(
            names, [r[key] or 0 for r in ok], color=["gray" if r["method"] == "full" else "C0" for r in ok]
        )
        ax.set_ylabel(label)
        ax.tick_params(axis="x", rotation=45, labelsize=8)
        ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(out_dir / PICTURES[1], dpi=110)
    plt.close(fig)
    return list(PICTURES)


def write_outputs(rows: list[dict[str, Any]], rec: dict[str, Any], out_dir: str | Path) -> dict[str, str]:
    """sweep.csv, sweep.md, sweep.json and the PNGs in ``out_dir``; returns their paths by kind."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    pictures = plot(rows, out)
    paths = {
        "csv": atomic_write(out / "sweep.csv", to_csv(rows)),
        "markdown": atomic_write(out / "sweep.md", to_markdown(rows, rec, pictures)),
        "json": RunDir.write_json(out / "sweep.json", {"rows": rows, "recommendation": rec}),
    }
    paths.update({p.removesuffix(".png"): out / p for p in pictures})
    return {k: str(v) for k, v in paths.items()}
