"""The evaluate stage: held-out loss/perplexity and the task metric of greedy generations, base vs tuned.

Both models are scored in the same run on the same rows, so the delta is the fine-tune's effect. The task
metric is ``eval.metric`` (core/metrics.py); exact match is always reported beside it.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import StoppingCriteria, StoppingCriteriaList

from core.adapter import load_adapter
from core.config import EvalConfig, RunConfig
from core.data import collate, load_split, text_rows
from core.errors import DeltatuneError
from core.lora import disable_adapters
from core.metrics import metric_fn
from core.metrics import score as score_metric
from core.modeling import load_model, load_tokenizer, pick_device
from core.run import RunDir, digest

log = logging.getLogger(__name__)


def eval_fingerprint(rows: list[dict], cfg: EvalConfig) -> str:
    """What makes two evaluations comparable: the same rows scored with the same metric settings.
    Promotion compares versions on a metric only when their eval fingerprints are equal."""
    settings = cfg.model_dump(mode="json", include={"generation_rows", "max_new_tokens", "metric"})
    # regex and stop only when set: a default config keeps the fingerprint it had before they existed,
    # so versions published before them stay comparable.
    settings |= {k: v for k, v in cfg.model_dump(mode="json", include={"regex", "stop"}).items() if v}
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
        batch_nll, batch_tokens = next_token_nll(logits, batch["labels"])
        nll, tokens = nll + batch_nll, tokens + batch_tokens
    loss = nll / max(tokens, 1)
    return {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), "tokens": tokens}


def next_token_nll(logits: torch.Tensor, labels: torch.Tensor) -> tuple[float, int]:
    """Summed NLL of each next token over the trained (label != -100) positions, and their count."""
    shift_logits = logits[:, :-1].float()  # (B, T-1, V): position t predicts token t+1
    shift_labels = labels[:, 1:]  # (B, T-1)
    nll = nn.functional.cross_entropy(
        shift_logits.reshape(-1, shift_logits.size(-1)),
        shift_labels.reshape(-1),
        ignore_index=-100,
        reduction="sum",
    )
    return float(nll), int((shift_labels != -100).sum())


def cut_at_stop(text: str, stop: Sequence[str]) -> str:
    """``text`` up to (not including) the earliest occurrence of any stop string."""
    cut = min((i for i in (text.find(st) for st in stop) if i >= 0), default=len(text))
    return text[:cut]


class StopInContinuation(StoppingCriteria):
    """Ends a row once the text it generated (the tokens after column ``width``) holds a stop string.

    Not ``generate(stop_strings=...)``: its ``StopStringCriteria`` matches the end of the whole sequence,
    so a stop string that starts in the prompt (e.g. '\\n\\n' after a prompt ending in '\\n') also ends a
    row, which the cut of the decoded continuation then cannot see. Decoding the continuation each step
    is what the cut reads too; for eval sizes (tens of rows, tens of tokens) it costs little.
    """

    def __init__(self, tokenizer: Any, stop: Sequence[str], width: int):
        self.tokenizer, self.stop, self.width = tokenizer, list(stop), width

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs) -> torch.BoolTensor:
        texts = self.tokenizer.batch_decode(input_ids[:, self.width :], skip_special_tokens=True)  # (B,)
        done = [any(s in t for s in self.stop) for t in texts]
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)  # (B,)


@torch.no_grad()
def greedy_generate(
    model: nn.Module,
    prompts: list[list[int]],
    tokenizer: Any,
    max_new_tokens: int,
    batch_size: int,
    stop: Sequence[str] = (),
) -> list[str]:
    """Greedy continuations of token-id prompts, decoded without special tokens, cut at the first stop string.

    Batches are left-padded (every row's next token sits in the last column) and decoded with the KV cache.
    With stop strings, :class:`StopInContinuation` ends a row once its continuation holds one, and
    ``generate`` ends the batch once every row has met one or EOS; the token that completed a stop string
    may run past it, so each decoded continuation is then cut at its first stop string.

    Args:
        prompts: token ids of each prompt, unpadded.
        max_new_tokens: the most tokens generated per row.
        batch_size: rows per ``generate`` call.
        stop: stop strings; empty for none.
    """
    device = next(model.parameters()).device
    pad_id = tokenizer.pad_token_id
    outs: list[str] = []
    for i in range(0, len(prompts), batch_size):
        chunk = prompts[i : i + batch_size]
        width = max(len(p) for p in chunk)
        ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)  # (B, T), left-padded
        mask = torch.zeros_like(ids)  # (B, T), 1 on prompt tokens
        for j, p in enumerate(chunk):
            ids[j, width - len(p) :] = torch.tensor(p)
            mask[j, width - len(p) :] = 1
        stopping = StoppingCriteriaList([StopInContinuation(tokenizer, stop, width)] if stop else [])
        gen = model.generate(
            input_ids=ids.to(device),
            attention_mask=mask.to(device),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            use_cache=True,
            pad_token_id=pad_id,
            eos_token_id=tokenizer.eos_token_id,
            stopping_criteria=stopping,
        )  # (B, T + new): a finished row is padded with pad_id to the batch's length
        texts = tokenizer.batch_decode(gen[:, width:], skip_special_tokens=True)
        outs += [cut_at_stop(t, stop) for t in texts]
    return outs


def _mean(xs: list[float]) -> float | None:
    return sum(xs) / len(xs) if xs else None


def score_model(model: nn.Module, rows: list[dict], tokenizer: Any, cfg: EvalConfig) -> dict[str, Any]:
    """Loss and perplexity of one model on the eval rows; on the first ``generation_rows`` rows with a
    prompt, the mean of ``eval.metric`` (``task_metric``) and of exact match over greedy generations, and
    the first ``sample_rows`` of them row by row (``samples``).

    Plain text rows (``data.format: text``, prompt_len 0) have nothing to answer: ``task_metric`` and
    ``exact_match`` are None for them.
    """
    model.eval()
    t0 = time.perf_counter()
    out = heldout_loss(model, rows, tokenizer.pad_token_id, cfg.batch_size)
    gen_rows = [r for r in rows if r["prompt_len"] > 0][: cfg.generation_rows]
    prompts = [list(r["input_ids"][: r["prompt_len"]]) for r in gen_rows]
    preds = (
        greedy_generate(model, prompts, tokenizer, cfg.max_new_tokens, cfg.batch_size, cfg.stop)
        if prompts
        else []
    )
    refs = [r["reference"] for r in gen_rows]
    task = score_metric(cfg.metric, preds, refs, cfg)
    # Always computed: gates and readers of older eval.json files use exact_match.
    exact = task if cfg.metric == "exact_match" else score_metric("exact_match", preds, refs, cfg)
    out.update(
        task_metric=_mean(task),
        task_metric_name=cfg.metric,
        exact_match=_mean(exact),
        generated=len(preds),
        seconds=round(time.perf_counter() - t0, 2),
        samples=[
            {
                "prompt": r["prompt"],
                "reference": r["reference"],
                "prediction": p,
                "score": s,
                "match": e == 1.0,
            }
            for r, p, s, e in list(zip(gen_rows, preds, task, exact, strict=True))[: cfg.sample_rows]
        ],
    )
    return out


class MergedModelError(DeltatuneError, RuntimeError):
    """The merged model answers worse than the adapter it came from, beyond ``merge.max_metric_drop``
    (not retryable: the same weights score the same)."""


def forgetting_rows(cfg: RunConfig, tokenizer: Any) -> list[dict] | None:
    """``eval.forgetting_path``'s texts as rows whose every token is scored (None when it is unset),
    each cut to ``data.max_seq_len`` tokens; texts of fewer than 2 tokens predict nothing and are dropped."""
    if cfg.eval.forgetting_path is None:
        return None
    texts = text_rows(cfg.eval.forgetting_path, cfg.data.storage_options, tail=cfg.eval.forgetting_tail)
    rows = []
    for text in texts[: cfg.eval.forgetting_rows]:
        ids = tokenizer(text)["input_ids"][: cfg.data.max_seq_len]
        if len(ids) >= 2:
            rows.append({"input_ids": ids, "labels": ids})
    if not rows:
        raise ValueError(f"eval.forgetting_path={cfg.eval.forgetting_path} holds no text of 2 tokens or more")
    return rows


def evaluate(
    cfg: RunConfig,
    run_dir: str | Path,
    eval_data: str | Path,
    trained: str | Path,
    merged: str | Path | None = None,
) -> dict[str, Any]:
    """Score the base model, the tuned one (adapter or full model dir) and the merged model on the same
    rows and write ``eval.json``.

    Args:
        cfg: the resolved run config.
        run_dir: where ``eval.json`` is written.
        eval_data: the prepared eval split.
        trained: ``adapter/`` (lora, qlora) or ``model/`` (full) from the train stage.
        merged: the merge stage's ``merged/`` (plain transformers weights), scored as ``merged``
            with its delta to the tuned model (``merged_vs_tuned``); None: not scored.
    """
    run_dir, trained = Path(run_dir), Path(trained)
    rows = list(load_split(eval_data))
    if cfg.eval.max_eval_rows:
        rows = rows[: cfg.eval.max_eval_rows]
    if not rows:
        raise ValueError(f"eval split {eval_data} is empty; set data.eval_fraction > 0 or data.eval_path")
    metric_fn(cfg.eval.metric, cfg.eval)  # a user function that does not import fails before any model loads
    tokenizer = load_tokenizer(cfg.model)
    general = forgetting_rows(cfg, tokenizer)
    device = pick_device()
    quant = cfg.quant if cfg.method == "qlora" else None
    results: dict[str, Any] = {
        "method": cfg.method,
        "rows": len(rows),
        "metric": cfg.eval.metric,
        "eval_fingerprint": eval_fingerprint(rows, cfg.eval),
    }
    general_loss: dict[str, float] = {}

    def score(side: str, model: nn.Module) -> None:
        results[side] = score_model(model, rows, tokenizer, cfg.eval)
        if general is not None:
            general_loss[side] = heldout_loss(model, general, tokenizer.pad_token_id, cfg.eval.batch_size)[
                "loss"
            ]

    if cfg.method == "full":
        if cfg.eval.compare_base:
            base = load_model(cfg.model, device=device)
            score("base", base)
            del base
        tuned = load_model(cfg.model, source=str(trained), device=device)
        score("tuned", tuned)
        del tuned
    else:
        # One model: the base is the same weights with the adapters bypassed (for QLoRA, the same
        # 4-bit base the adapter was trained on).
        model = load_model(cfg.model, quant=quant, device=device)
        if cfg.eval.compare_base and cfg.lora.modules_to_save:
            # Loading the adapter overwrites the modules_to_save weights (embeddings, head): bypassing
            # the LoRA layers would not give the base back, so score it before.
            score("base", model)
        load_adapter(model, trained)
        if cfg.eval.compare_base and "base" not in results:
            with disable_adapters(model):
                score("base", model)
        score("tuned", model)
        del model
    if merged is not None:  # what users deploy: the merged weights, loaded as any transformers model
        score("merged", load_model(cfg.model, source=str(merged), device=device))
        results["merged_vs_tuned"] = {
            k: results["merged"][k] - results["tuned"][k]
            for k in ("loss", "task_metric", "exact_match")
            if results["merged"][k] is not None and results["tuned"][k] is not None
        }
        drop = -results["merged_vs_tuned"].get("task_metric", 0.0)
        limit = cfg.merge.max_metric_drop
        if limit is not None and not drop <= limit:  # NaN fails too
            RunDir.write_json(RunDir(run_dir).eval_report, results)  # kept to look at; nothing publishes
            raise MergedModelError(
                f"the merged model's {cfg.eval.metric} is {results['merged']['task_metric']:.4f} against the "
                f"tuned model's {results['tuned']['task_metric']:.4f} on the same {len(rows)} rows, a drop of "
                f"{drop:.4f} over merge.max_metric_drop={limit:g} (see {RunDir(run_dir).eval_report}); merge "
                "in float32 (merge.dtype), for QLoRA try merge.base: dequantized, or raise merge.max_metric_drop"
            )
    if general is not None:
        results["forgetting"] = {
            "source": cfg.eval.forgetting_path,
            "rows": len(general),
            **{f"{side}_loss": loss for side, loss in general_loss.items()},
            "delta": general_loss["tuned"] - general_loss["base"] if "base" in general_loss else None,
        }
    if "base" in results:
        results["delta"] = {
            k: results["tuned"][k] - results["base"][k]
            for k in ("loss", "perplexity", "task_metric", "exact_match")
            if results["tuned"][k] is not None
        }
    RunDir.write_json(RunDir(run_dir).eval_report, results)
    b, t = results.get("base", {}), results["tuned"]

    def fmt(side: dict[str, Any], key: str) -> str:
        return f"{side[key]:.3f}" if side and side.get(key) is not None else "-"

    log.info(
        "eval: loss %s -> %.4f, %s %s -> %s, exact match %s -> %s (%d rows, %d generated)",
        f"{b['loss']:.4f}" if b else "-",
        t["loss"],
        cfg.eval.metric,
        fmt(b, "task_metric"),
        fmt(t, "task_metric"),
        fmt(b, "exact_match"),
        fmt(t, "exact_match"),
        len(rows),
        t["generated"],
    )
    if "merged" in results:
        log.info("eval: merged model vs tuned: %s", results["merged_vs_tuned"])
    if "forgetting" in results:
        log.info("eval: forgetting on %s: %s", cfg.eval.forgetting_path, results["forgetting"])
    return results
