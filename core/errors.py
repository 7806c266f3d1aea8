"""Every deltatune error carries its retry verdict: ``retryable`` on one base class, read by one predicate.

A retry resumes (train from its newest complete checkpoint, publish from its claim), so it helps with
what may pass (a crashed or lost rank, a network outage) and never with bad config, bad data or divergence.
"""

from __future__ import annotations

import sys


class DeltatuneError(Exception):
    """Base class of deltatune's errors. ``retryable`` says whether running the stage again may help;
    a subclass sets the default, an instance may override it (``TrainingFailed`` learns it from the rank)."""

    retryable: bool = False

    def __init__(self, message: str = "", *, retryable: bool | None = None):
        super().__init__(message)
        if retryable is not None:
            self.retryable = retryable


# Failures from outside deltatune that a retry cannot fix: a bad value or a missing input file, an
# import that is not installed, divergence. Running out of device memory with the same batch and model
# is one too (torch.OutOfMemoryError, matched by name so that this module never imports torch).
_PERMANENT = (ValueError, FloatingPointError, FileNotFoundError, ImportError)


def is_retryable(exc: BaseException) -> bool:
    """Whether running the failed stage again (which resumes) may succeed after ``exc``.

    deltatune's own errors say so themselves; other network and disk errors (``OSError``) may pass;
    the permanent kinds above never do; anything else (a crash) is worth one more resumed attempt.
    """
    if isinstance(exc, DeltatuneError):
        return exc.retryable
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(exc, torch.OutOfMemoryError):
        return False
    return not isinstance(exc, _PERMANENT)
