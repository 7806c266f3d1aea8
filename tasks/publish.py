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
    model = cfg.model_name or metadata["run"]
    state = Path(run_dir) / STATE
    # A retry (or a re-run of the flow) resumes the version the failed attempt claimed, with the token
    # that proves the claim is this run's, instead of claiming a new one; a state left for another
    # store, model or version is ignored.
    version, token = cfg.version, None
    if state.is_file():
        s = json.loads(state.read_text())
        if (s.get("store"), s.get("model")) == (cfg.store, model) and cfg.version in (None, s.get("version")):
            version, token = s.get("version"), s.get("token")
    try:
        result = publish_version(
            cfg.store,
            model,
            sources,
            version=version,
            metadata=metadata,
            storage_options=cfg.storage_options,
            resume_token=token,
        )
    except PublishError as e:
        if e.version and e.token:
            record = {"store": cfg.store, "model": model, "version": e.version, "token": e.token}
            state.write_text(json.dumps(record))
        raise
    state.unlink(missing_ok=True)
    get_run_logger().info("published %s (%d files)", result.uri, len(result.files))
    return result.to_dict()
