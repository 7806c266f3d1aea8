"""train: launch core.train under the configured launcher; a retry resumes from the newest checkpoint."""

from contextlib import nullcontext

from prefect import get_run_logger, task

from core.launch import run_training
from core.run import RunDir
from core.stages import snapshot
from tasks._report import TrainProgress
from tasks._retry import retry_if_retryable
from tasks._slots import gpu_slots


@task(name="train", retry_condition_fn=retry_if_retryable)
def train(run_dir: str, train_data: str, key: str, node_rank: int = 0, refresh: bool = False) -> dict:
    """Returns train_summary.json (output_dir, steps, loss, wall time, ...), its path and the snapshot
    of its files. ``node_rank`` is this node's, passed by its flow: every node writes the shared
    run_config.yaml, so the rank read back from it may be another node's. ``refresh`` trains afresh
    even if this run directory holds a finished training of the same config."""
    logger, rd = get_run_logger(), RunDir(run_dir)
    cfg = rd.config()
    if cfg.train.num_nodes > 1:
        cfg = cfg.model_copy(update={"train": cfg.train.model_copy(update={"node_rank": node_rank})})
    if refresh:
        rd.forget_training()
    # train.gpu_slots_limit: hold this node's GPUs (num_processes slots of a global limit) while training,
    # so that two runs on one node (nightly and on demand) wait for each other (README, "Deploying").
    # The progress artifact, fed by metrics.jsonl (which rank 0, on node 0, writes).
    with gpu_slots(cfg, logger):
        with TrainProgress.start(cfg, rd.path, train_data) if node_rank == 0 else nullcontext():
            summary = run_training(cfg, rd.path, train_data, on_line=logger.info)
    if "steps" in summary:
        logger.info(
            "trained %s: %d steps, final loss %.4f",
            summary["method"],
            summary["steps"],
            summary["final_loss"],
        )
    out = summary.get("output_dir")
    return {**summary, "summary_path": str(rd.summary), "files": snapshot([out, rd.summary] if out else [])}
