"""evaluate: base vs tuned held-out loss, perplexity and exact match, in one run."""

from prefect import get_run_logger, task

from core.config import read_resolved
from core.evaluate import evaluate as evaluate_run


@task(name="evaluate")
def evaluate(run_dir: str, eval_data: str, trained: str) -> dict:
    """Returns eval.json without the sample generations."""
    results = evaluate_run(read_resolved(run_dir), run_dir, eval_data, trained)
    summary = {k: v for k, v in results.items() if k not in ("base", "tuned")}
    for side in ("base", "tuned"):
        if side in results:
            summary[side] = {k: v for k, v in results[side].items() if k != "samples"}
    get_run_logger().info("eval: %s", summary)
    return summary
