"""sweep: what a variant's finetune run does not measure itself, its merged model's latency against the
base (core/sweep.py)."""

from prefect import get_run_logger, task

from core.run import RunDir
from core.sweep import measure_latency


@task(name="measure-latency")
def measure_latency_task(run_dir: str, result: dict) -> float | None:
    """The merged (or fully tuned) model's forward time ÷ the base's; None without a merged model."""
    cfg = RunDir(run_dir).config()
    latency = measure_latency(cfg, result)
    get_run_logger().info("%s: latency %s x base", cfg.name, latency)
    return latency
