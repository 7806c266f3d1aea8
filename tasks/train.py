"""train: launch core.train under the configured launcher; a retry resumes from the newest checkpoint."""

from prefect import get_run_logger, task

from core.config import ConfigError, read_resolved
from core.data import DataError
from core.launch import PreflightError, TrainingFailed, run_training


def retryable(task, task_run, state) -> bool:
    """Retry crashes and lost ranks; never bad config or bad data, which fail the same way again."""
    try:
        state.result()
    except TrainingFailed as e:
        return e.retryable
    except (PreflightError, ConfigError, DataError):
        return False
    except Exception:
        return True
    return False


@task(name="train", retry_condition_fn=retryable)
def train(run_dir: str, train_data: str) -> dict:
    """Returns train_summary.json (output_dir, steps, loss, wall time, peak memory, trainable share)."""
    logger = get_run_logger()
    summary = run_training(read_resolved(run_dir), run_dir, train_data, on_line=logger.info)
    logger.info(
        "trained %s: %d steps, final loss %.4f", summary["method"], summary["steps"], summary["final_loss"]
    )
    return summary
