"""merge: fold the adapter into the base, save a plain HF model, and check the post-merge gap."""

from prefect import get_run_logger, task

from core.merge import merge as merge_run
from core.run import RunDir
from core.stages import snapshot


@task(name="merge")
def merge(run_dir: str, adapter_dir: str, eval_data: str | None, key: str) -> dict:
    """Returns merge_report.json (merged_dir, mode, max/mean logit gap, loss gap, peak RSS; QLoRA: the base
    merged into; docs/merge.md), its path and snapshot."""
    rd = RunDir(run_dir)
    report = merge_run(rd.config(), rd.path, adapter_dir, eval_data)
    get_run_logger().info("merged: max logit gap %s", report.get("max_logit_gap"))
    return {**report, "report_path": str(rd.merge_report), "files": snapshot([rd.merged, rd.merge_report])}
