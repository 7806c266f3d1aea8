"""train: launch core.train under the configured launcher; a retry resumes from the newest checkpoint."""

from prefect import get_run_logger, task

from core.config import read_resolved
from core.launch import is_retryable, run_training
from tasks._retry import retry_when

# Crashes and lost ranks are retried; bad config, bad data and divergence fail the same way again.
retryable = retry_when(is_retryable)


@task(name="train", retry_condition_fn=retryable)
def train(run_dir: str, train_data: str, node_rank: int = 0) -> dict:
    """Returns train_summary.json (output_dir, steps, loss, wall time, peak memory, trainable share).

    ``node_rank`` is this node's, passed by its flow: every node writes the shared run_config.yaml,
    so the rank read back from it may be another node's.
    """
    logger = get_run_logger()
    cfg = read_resolved(run_dir)
    if cfg.train.num_nodes > 1:
        cfg = cfg.model_copy(update={"train": cfg.train.model_copy(update={"node_rank": node_rank})})
    summary = run_training(cfg, run_dir, train_data, on_line=logger.info)
    if "steps" in summary:
        logger.info(
            "trained %s: %d steps, final loss %.4f",
            summary["method"],
            summary["steps"],
            summary["final_loss"],
        )
    return summary
