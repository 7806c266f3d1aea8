"""The one retry condition of every task: retry only what the failure itself says a retry can fix."""

from core.errors import is_retryable


def retry_if_retryable(task, task_run, state) -> bool:
    """A ``retry_condition_fn``: retry when the exception is retryable (``core.errors.is_retryable``)."""
    try:
        state.result()
    except Exception as exc:
        return is_retryable(exc)
    return False
