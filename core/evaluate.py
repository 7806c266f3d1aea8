"""The evaluate stage: held-out loss/perplexity and exact match of greedy generations, base vs tuned.

Both models are scored in the same run on the same rows, so the delta is the fine-tune's effect.
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from core.adapter import load_adapter
from core.config import EvalConfig, RunConfig
from core.data import collate, load_split
from core.lora import disable_adapters
from core.modeling import load_model, load_tokenizer, pick_device
from core.run import RunDir, digest

log = logging.getLogger(__name__)


def eval_fingerprint(rows: list[dict], cfg: EvalConfig) -> str:
    """What makes two evaluations comparable: the same rows scored with the same metric settings.
    Promotion compares versions on a metric only when their eval fingerprints are equal."""
    settings = cfg.model_dump(mode="json", include={"generation_rows", "max_new_tokens", "metric"})
    return digest({"rows": [[r["input_ids"], r["labels"]] for r in rows], "settings": settings})


@torch.no_grad()
def heldout_loss(model: nn.Module, rows: list[dict], pad_id: int, batch_size: int) -> dict[str, float]:
    """Token-weighted mean NLL over the trained (label != -100) tokens, and its perplexity."""
    device = next(model.parameters()).device
    nll, tokens = 0.0, 0
    for i in range(0, len(rows), batch_size):
        batch = {k: v.to(device) for k, v in collate(rows[i : i + batch_size], pad_id).items()}
        logits = model(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
        ).logits  # (B, T, V)
        shift_logits = logits[:, :-1].float()  # position t predicts token t+1
        shift_labels = batch["labels"][:, 1:]  # (B, T-1)
        nll += float(
            nn.functional.cross_entropy(
                shift_logits.reshape(-1, shift_logits.size(-1)),
                shift_labels.reshape(-1),
                ignore_index=-100,
                reduction="sum",
            )
        )
        tokens += int((shift_labels != -100).sum())
    loss = nll / max(tokens, 1)
    return {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), "tokens": tokens}


def _normalize(text: str) -> str:
    return " ".join(text.split())


@torch.no_grad()
def greedy_generate(
    model: nn.Module, prompts: list[list[int]], tokenizer: Any, max_new_tokens: int, batch_size: int
) -> list[str]:
    """Greedy continuations of token-id prompts (left-padded batches), decoded without special tokens."""
    device = next(model.parameters()).device
    pad_id = tokenizer.pad_token_id
    outs: list[str] = []
    for i in range(0, len(prompts), batch_size):
        chunk = prompts[i : i + batch_size]
        width = max(len(p) for p in chunk)
        ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)  # (B, T), left-padded
        mask = torch.zeros_like(ids)
        for j, p in enumerate(chunk):
            ids[j, width - len(p) :] = torch.tensor(p)
            mask[j, width - len(p) :] = 1
        gen = model.generate(
            input_ids=ids.to(device),
            attention_mask=mask.to(device),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=pad_id,
            eos_token_id=tokenizer.eos_token_id,
        )  # (B, T + new)
        outs += tokenizer.batch_decode(gen[:, width:], skip_special_tokens=True)
    return outs


def score_model(model: nn.Module, rows: list[dict], tokenizer: Any, cfg: EvalConfig) -> dict[str, Any]:
    """Loss, perplexity and exact match of one model on the eval rows."""
    model.eval()
    t0 = time.perf_counter()
    out = heldout_loss(model, rows, tokenizer.pad_token_id, cfg.batch_size)
    # Rows with a prompt only: plain text (prompt_len 0) has nothing to answer, so no exact match.
    gen_rows = [r for r in rows if r["prompt_len"] > 0][: cfg.generation_rows]
    prompts = [list(r["input_ids"][: r["prompt_len"]]) for r in gen_rows]
    preds = greedy_generate(model, prompts, tokenizer, cfg.max_new_tokens, cfg.batch_size) if prompts else []
    hits = [_normalize(p) == _normalize(r["reference"]) for p, r in zip(preds, gen_rows, strict=True)]
    out.update(
        exact_match=sum(hits) / len(hits) if hits else None,
        generated=len(hits),
        seconds=round(time.perf_counter() - t0, 2),
        samples=[
            {"prompt": r["prompt"], "reference": r["reference"], "prediction": p, "match": h}
            for r, p, h in list(zip(gen_rows, preds, hits, strict=True))[:5]
        ],
    )
    return out


def evaluate(
    cfg: RunConfig, run_dir: str | Path, eval_data: str | Path, trained: str | Path
) -> dict[str, Any]:
    """Score the base model and the tuned one (adapter or full model dir) and write ``eval.json``.

    Args:
        cfg: the resolved run config.
        run_dir: where ``eval.json`` is written.
        eval_data: the prepared eval split.
        trained: ``adapter/`` (lora, qlora) or ``model/`` (full) from the train stage.
    """
    run_dir, trained = Path(run_dir), Path(trained)
    rows = list(load_split(eval_data))
    if cfg.eval.max_eval_rows:
        rows = rows[: cfg.eval.max_eval_rows]
    if not rows:
        raise ValueError(f"eval split {eval_data} is empty; set data.eval_fraction > 0 or data.eval_path")
    tokenizer = load_tokenizer(cfg.model)
    device = pick_device()
    quant = cfg.quant if cfg.method == "qlora" else None
    results: dict[str, Any] = {
        "method": cfg.method,
        "rows": len(rows),
        "metric": cfg.eval.metric,
        "eval_fingerprint": eval_fingerprint(rows, cfg.eval),
    }
    if cfg.method == "full":
        if cfg.eval.compare_base:
            base = load_model(cfg.model, device=device)
            results["base"] = score_model(base, rows, tokenizer, cfg.eval)
            del base
        tuned = load_model(cfg.model, source=str(trained), device=device)
        results["tuned"] = score_model(tuned, rows, tokenizer, cfg.eval)
    else:
        # One model: the base is the same weights with the adapters bypassed (for QLoRA, the same
        # 4-bit base the adapter was trained on).
        model = load_model(cfg.model, quant=quant, device=device)
        if cfg.eval.compare_base and cfg.lora.modules_to_save:
            # Loading the adapter overwrites the modules_to_save weights (embeddings, head): bypassing
            # the LoRA layers would not give the base back, so score it before.
            results["base"] = score_model(model, rows, tokenizer, cfg.eval)
        load_adapter(model, trained)
        if cfg.eval.compare_base and "base" not in results:
            with disable_adapters(model):
                results["base"] = score_model(model, rows, tokenizer, cfg.eval)
        results["tuned"] = score_model(model, rows, tokenizer, cfg.eval)
    if "base" in results:
        results["delta"] = {
            k: results["tuned"][k] - results["base"][k]
            for k in ("loss", "perplexity", "exact_match")
            if results["tuned"][k] is not None
        }
    RunDir.write_json(RunDir(run_dir).eval_report, results)
    b, t = results.get("base", {}), results["tuned"]
    log.info(
        "eval: loss %s -> %.4f, exact match %s -> %s (%d rows)",
        f"{b['loss']:.4f}" if b else "-",
        t["loss"],
        f"{b['exact_match']:.3f}" if b and b["exact_match"] is not None else "-",
        f"{t['exact_match']:.3f}" if t["exact_match"] is not None else "-",
        len(rows),
    )
    return results
