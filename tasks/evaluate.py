"""evaluate: base, tuned and merged models' held-out loss, perplexity and task metric, and the
forgetting on general text, in one run."""

from prefect import get_run_logger, task

from core.evaluate import evaluate as evaluate_run
from core.run import RunDir
from core.stages import snapshot


@task(name="evaluate")
def evaluate(run_dir: str, eval_data: str, trained: str, key: str, merged: str | None = None) -> dict:
    """Returns eval.json without the sample generations, its path and its snapshot."""
    rd = RunDir(run_dir)
    results = evaluate_run(rd.config(), rd.path, eval_data, trained, merged)
    sides = ("base", "tuned", "merged")
    summary = {k: v for k, v in results.items() if k not in sides}
    for side in sides:
        if side in results:
            summary[side] = {k: v for k, v in results[side].items() if k != "samples"}
    get_run_logger().info("eval: %s", summary)
    return {**summary, "report_path": str(rd.eval_report), "files": snapshot([rd.eval_report])}
