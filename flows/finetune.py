"""The finetune pipeline: prepare -> train -> merge -> evaluate -> publish, one Prefect task each.

deltatune run deploy/runs/demo.yaml --set train.lr=1e-3      # again: every finished stage is reused
prefect deploy --prefect-file deploy/prefect.yaml     # entrypoint flows/finetune.py:finetune

Every stage is keyed by the content that determines it (core.stages) and its result persisted, so a new
flow run of the same config redoes nothing that finished and publishes no second copy (docs/caching.md).
"""

from __future__ import annotations

from functools import partial

from prefect import flow, get_run_logger
from prefect.runtime import flow_run

from core.config import load_config
from core.launch import node_rank
from core.preflight import preflight
from core.publish import still_published, version_metadata, version_sources
from core.run import RunDir
from core.secretkeys import ConfigRef, Override
from core.stages import stage_keys
from core.store import check_store
from core.trackers import log_results
from flows.promote import promote_published
from tasks._cache import Stages
from tasks._report import report_run
from tasks.evaluate import evaluate
from tasks.merge import merge
from tasks.prepare import prepare
from tasks.publish import publish
from tasks.train import train


@flow(name="finetune")
def finetune(
    config: ConfigRef | None = None, overrides: list[Override] | None = None, refresh: bool = False
) -> dict:
    """Fine-tune per the run config (a YAML path; none = the bundled demo) with dotted overrides.

    The parameters take no credentials (docs/secrets.md): ``Override`` and ``ConfigRef`` are plain
    strings whose schema refuses them, so a deployment's server refuses such a flow run before storing it.

    ``refresh`` reruns every stage even where a result of the same content exists (a new version).
    Returns paths and small summaries of every stage, the published version's URI, and ``stages``:
    which stages ran and which were reused.
    """
    cfg = load_config(config, overrides)
    rd = RunDir.create(cfg)
    logger = get_run_logger()
    logger.info("run %s (%s) in %s", cfg.name, cfg.method, rd.path)

    # Multi-node: the flow runs on every node (started by the cluster's scheduler); each prepares its
    # own copy of the data and launches its ranks; node 0 alone evaluates, merges and publishes.
    node = node_rank(cfg) if cfg.train.num_nodes > 1 else 0
    if cfg.publish.enabled and node == 0:  # an unreachable store fails the run now, not after training
        check_store(cfg.publish.store, cfg.publish.storage_options)
    # Targets, ranks and 4-bit shapes against the model's architecture (meta device, no weights): a
    # config that does not fit fails here in seconds, before prepare and the launch (core/preflight.py).
    checked = preflight(cfg)
    keys = stage_keys(cfg, node=node)
    stage = Stages(cfg.cache, refresh=refresh, run_name=cfg.name)  # task runs named train-<run>, ...
    run_dir = str(rd.path)
    data = stage(prepare, keys.prepare)(run_dir, node=node)
    trained = stage(
        train, keys.train, retries=cfg.train.retries, retry_delay_seconds=cfg.train.retry_delay_s
    )(run_dir, data["train_dir"], node_rank=node, refresh=refresh)
    out: dict = {
        "run_dir": run_dir,
        "keys": keys.to_dict(),
        "data": data,
        "train": trained,
        "preflight": checked,  # what the run adapts, and the trainable count r·(d + k) implies
        "stages": stage.status,
    }
    if node != 0:
        logger.info("node %d: training done; node 0 evaluates, merges and publishes", node)
        return out
    if cfg.method != "full" and cfg.merge.enabled:
        # The gap compares merged with adapter-on-base logits: training rows serve when there is no eval split.
        out["merge"] = stage(merge, keys.merge)(
            run_dir, trained["output_dir"], data["eval_dir"] or data["train_dir"]
        )
    if cfg.eval.enabled and data["eval_dir"]:
        # After the merge, so that the merged model (what gets deployed) is scored on the same rows too.
        merged = out["merge"]["merged_dir"] if "merge" in out else None
        out["eval"] = stage(evaluate, keys.eval)(
            run_dir, data["eval_dir"], trained["output_dir"], merged=merged
        )
    if cfg.publish.enabled:
        done = {"prepare": data, "train": trained, **{k: out[k] for k in ("eval", "merge") if k in out}}
        sources = version_sources(cfg, rd, done)
        metadata = version_metadata(cfg, done, keys, flow_run_id=flow_run.id)
        out["publish"] = stage(publish, keys.publish, check=partial(still_published, cfg.publish))(
            run_dir, sources, metadata
        )
    if cfg.publish.enabled and cfg.promote.alias:
        # Gates decide; a refusal is reported and fails the run only with promote.fail_on_gate.
        out["promote"] = promote_published(cfg, out["publish"])
    log_results(cfg, rd.path, out)  # report_to: eval metrics and the version URI (never fails the run)
    report_run(cfg, out, stage)  # Prefect artifacts: summary, sample generations, version link
    logger.info("stages: %s", ", ".join(f"{k} {v}" for k, v in stage.status.items()))
    return out
