"""publish: copy the run's artifacts to the store as one version; manifest last, resumable."""

from prefect import get_run_logger, task

from core.publish import publish_run
from core.run import RunDir
from tasks._retry import retry_if_retryable


@task(name="publish", retries=2, retry_delay_seconds=5, retry_condition_fn=retry_if_retryable)
def publish(run_dir: str, sources: dict[str, str], metadata: dict, key: str) -> dict:
    """Returns the PublishResult (model, version, uri, manifest sha256, files, uploaded, skipped).
    A retry, or a new flow run of the same content, resumes the version the failed attempt claimed."""
    rd = RunDir(run_dir)
    result = publish_run(rd.config(), rd, sources, metadata)
    get_run_logger().info(
        "published %s (%d files, %d uploaded)", result["uri"], len(result["files"]), len(result["uploaded"])
    )
    return result
