"""Retry predicates for Prefect tasks: retry only the failures a retry can fix."""

from collections.abc import Callable


def retry_when(predicate: Callable[[BaseException], bool]):
    """A ``retry_condition_fn`` that retries a failed run when ``predicate(exception)`` is true."""

    def condition(task, task_run, state) -> bool:
        try:
            state.result()
        except Exception as exc:
            return predicate(exc)
        return False

    return condition
