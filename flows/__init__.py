"""Prefect flows (finetune, ...) and the ``deltatune`` CLI that runs them."""

import tasks  # noqa: F401  (sets Prefect's defaults before prefect is imported)
