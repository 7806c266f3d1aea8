"""The data errors: DataError for the user, Reject for one row (counted in the report by reason)."""

from __future__ import annotations

from core.errors import DeltatuneError


class DataError(DeltatuneError, ValueError):
    """The training data cannot be prepared; the message says what was wrong and what to do."""


class Reject(Exception):
    """A row failed validation; ``reason`` is the key it is counted under in the report."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason
