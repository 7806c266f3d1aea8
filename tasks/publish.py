"""publish: copy the run's artifacts to the store as one version; manifest last, resumable."""

import json
from pathlib import Path

from prefect import get_run_logger, task

from core.config import read_resolved
from core.store import PublishError, StoreUnavailableError
from core.store import publish as publish_version
from tasks._retry import retry_when

STATE = "publish_state.json"


def _transient(exc: BaseException) -> bool:
    """An interrupted upload or an unreachable store may pass; a taken version, a bad name or a
    missing local file will not."""
    if isinstance(exc, (PublishError, StoreUnavailableError)):
        return True
    return isinstance(exc, OSError) and not isinstance(exc, FileNotFoundError)


@task(name="publish", retries=2, retry_delay_seconds=5, retry_condition_fn=retry_when(_transient))
def publish(run_dir: str, sources: dict[str, str], metadata: dict) -> dict:
    """Returns the PublishResult (model, version, uri, manifest sha256, files)."""
    cfg = read_resolved(run_dir).publish
    state = Path(run_dir) / STATE
    # A retry resumes the version the failed attempt claimed instead of claiming a new one.
    version = cfg.version or (json.loads(state.read_text())["version"] if state.is_file() else None)
    try:
        result = publish_version(
            cfg.store,
            cfg.model_name or metadata["run"],
            sources,
            version=version,
            metadata=metadata,
            storage_options=cfg.storage_options,
        )
    except PublishError as e:
        if e.version:
            state.write_text(json.dumps({"version": e.version}))
        raise
    state.unlink(missing_ok=True)
    get_run_logger().info("published %s (%d files)", result.uri, len(result.files))
    return result.to_dict()
