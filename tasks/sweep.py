"""sweep: what a variant's finetune run does not measure itself, its trainable-parameter formula and
its merged model's latency against the base (core/sweep.py)."""

from prefect import get_run_logger, task

from core.preflight import check_model, meta_model
from core.run import RunDir
from core.sweep import measure_latency


@task(name="measure-variant")
def measure_variant(run_dir: str, result: dict) -> dict:
    """Returns ``formula`` (r·(d + k) per adapted matrix, or every weight for full fine-tuning, from the
    architecture alone) and ``latency`` (the merged or fully tuned model's forward time ÷ the base's)."""
    cfg = RunDir(run_dir).config()
    formula = check_model(cfg, meta_model(cfg))["trainable_formula"]
    latency = measure_latency(cfg, result)
    get_run_logger().info("%s: formula %s trainable, latency %s x base", cfg.name, formula, latency)
    return {"formula": formula, "latency": latency}
