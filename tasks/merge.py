"""merge: fold the adapter into the base, save a plain HF model, and check the post-merge gap."""

from prefect import get_run_logger, task

from core.config import read_resolved
from core.merge import merge as merge_run


@task(name="merge")
def merge(run_dir: str, adapter_dir: str, eval_data: str | None) -> dict:
    """Returns merge_report.json (merged_dir, max/mean logit gap, loss gap)."""
    report = merge_run(read_resolved(run_dir), run_dir, adapter_dir, eval_data)
    get_run_logger().info("merged: max logit gap %s", report.get("max_logit_gap"))
    return report
