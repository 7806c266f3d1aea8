"""The finetune pipeline: prepare -> train -> evaluate -> merge -> publish, one Prefect task each.

deltatune run deploy/runs/demo.yaml --set train.lr=1e-3
prefect deploy --prefect-file deploy/prefect.yaml     # entrypoint flows/finetune.py:finetune
"""

from __future__ import annotations

from pathlib import Path

from prefect import flow, get_run_logger

from core.config import RUN_CONFIG_NAME, load_config, write_resolved
from core.launch import node_rank
from core.store import check_store
from tasks.evaluate import evaluate
from tasks.merge import merge
from tasks.prepare import prepare
from tasks.publish import publish
from tasks.train import train


@flow(name="finetune")
def finetune(config: str | None = None, overrides: list[str] | None = None) -> dict:
    """Fine-tune per the run config (a YAML path; none = the bundled demo) with dotted overrides.

    Returns paths and small summaries of every stage, including the published version's URI.
    """
    cfg = load_config(config, overrides)
    run_dir = str(cfg.run_dir.resolve())
    write_resolved(cfg, run_dir)
    logger = get_run_logger()
    logger.info("run %s (%s) in %s", cfg.name, cfg.method, run_dir)

    # Multi-node: the flow runs on every node (started by the cluster's scheduler); each prepares its
    # own copy of the data and launches its ranks; node 0 alone evaluates, merges and publishes.
    node = node_rank(cfg) if cfg.train.num_nodes > 1 else 0
    if cfg.publish.enabled and node == 0:  # an unreachable store fails the run now, not after training
        check_store(cfg.publish.store, cfg.publish.storage_options)
    data = prepare(run_dir, "data" if node == 0 else f"data-node{node}")
    trained = train.with_options(retries=cfg.train.retries, retry_delay_seconds=cfg.train.retry_delay_s)(
        run_dir, data["train_dir"], node_rank=node
    )
    out: dict = {"run_dir": run_dir, "data": data, "train": trained}
    if node != 0:
        logger.info("node %d: training done; node 0 evaluates, merges and publishes", node)
        return out
    if cfg.eval.enabled and data["eval_dir"]:
        out["eval"] = evaluate(run_dir, data["eval_dir"], trained["output_dir"])
    if cfg.method != "full" and cfg.merge.enabled:
        # The gap compares merged with adapter-on-base logits: training rows serve when there is no eval split.
        out["merge"] = merge(run_dir, trained["output_dir"], data["eval_dir"] or data["train_dir"])
    if cfg.publish.enabled:
        out["publish"] = publish(run_dir, _sources(cfg, run_dir, out), _metadata(cfg, out))
    return out


def _sources(cfg, run_dir: str, out: dict) -> dict[str, str]:
    run = Path(run_dir)
    sources = {RUN_CONFIG_NAME: run / RUN_CONFIG_NAME, "train_summary.json": run / "train_summary.json"}
    sources["prepare_report.json"] = Path(out["data"]["report_path"])
    # Only what this flow run produced: a stale report from an earlier run of the name never ships.
    if "eval" in out:
        sources["eval.json"] = run / "eval.json"
    if "merge" in out:
        sources["merge_report.json"] = run / "merge_report.json"
    trained = Path(out["train"]["output_dir"])
    include = set(cfg.publish.include or ["adapter", "merged", "model"])
    if cfg.method == "full":
        if include & {"model", "merged"}:
            sources["model"] = trained
    else:
        if "adapter" in include:
            sources["adapter"] = trained
        if "merged" in include and "merge" in out:
            sources["merged"] = Path(out["merge"]["merged_dir"])
    return {k: str(v) for k, v in sources.items()}


def _metadata(cfg, out: dict) -> dict:
    meta: dict = {"run": cfg.name, "method": cfg.method, "base_model": cfg.model.name_or_path}
    meta["data_fingerprint"] = out["data"]["fingerprint"]
    t = out["train"]
    meta["train"] = {k: t[k] for k in ("steps", "final_loss", "trainable_share", "wall_time_s") if k in t}
    if "eval" in out:
        meta["eval"] = {
            side: {k: out["eval"][side][k] for k in ("loss", "perplexity", "exact_match")}
            for side in ("base", "tuned")
            if side in out["eval"]
        }
    if "merge" in out:
        meta["merge"] = {k: out["merge"].get(k) for k in ("max_logit_gap", "loss_gap")}
    return meta
