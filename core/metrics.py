"""Task metrics: one score in [0, 1] per generated answer against its reference; the one owner of them.

scores = score("rouge_l", predictions, references, cfg.eval)   # list[float], one per row
A metric is a built-in name (``BUILTIN``) or a user function written ``module:function`` in the config,
called as ``fn(prediction, reference) -> float | bool``. Writing it is the opt-in to importing that module.
"""

from __future__ import annotations

import importlib
import math
import re
import string
import unicodedata
from collections.abc import Callable, Sequence
from functools import partial
from typing import Protocol

from core.errors import DeltatuneError

PairFn = Callable[[str, str], float]

# A user function: a dotted module path, a colon, a function name (as in entry points: pkg.mod:fn).
USER_METRIC = re.compile(r"[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*:[A-Za-z_]\w*")
DEFAULT_METRIC = "exact_match"


class MetricError(DeltatuneError, ValueError):
    """A metric cannot be resolved or returned an unusable score; the same config fails the same way."""

    retryable = False


class MetricSettings(Protocol):
    """What ``score`` reads from the eval config (``core.config.EvalConfig`` has it)."""

    regex: str | None


# --- normalisation --------------------------------------------------------------------------------


def collapse_whitespace(text: str) -> str:
    return " ".join(text.split())


def _is_punct(ch: str) -> bool:
    # SQuAD removes string.punctuation (ASCII, symbols such as $ included); Unicode punctuation too,
    # so that answers in other scripts (e.g. '。', '¿') normalise the same way.
    return ch in string.punctuation or unicodedata.category(ch).startswith("P")


def normalize_answer(text: str) -> str:
    """Lower-case, delete punctuation, collapse whitespace.

    SQuAD v1.1's ``normalize_answer`` (Rajpurkar et al. 2016, the official ``evaluate-v1.1.py``) without
    its English article removal (a/an/the): deltatune's eval sets are in any language.
    """
    return collapse_whitespace("".join(ch for ch in text.lower() if not _is_punct(ch)))


# --- the built-in metrics -------------------------------------------------------------------------


def exact_match(prediction: str, reference: str) -> float:
    """1.0 when equal after collapsing whitespace (case and punctuation count)."""
    return float(collapse_whitespace(prediction) == collapse_whitespace(reference))


def normalized_match(prediction: str, reference: str) -> float:
    """1.0 when equal after :func:`normalize_answer` (case, punctuation and whitespace do not count)."""
    return float(normalize_answer(prediction) == normalize_answer(reference))


def contains(prediction: str, reference: str) -> float:
    """1.0 when the normalised reference is a substring of the normalised prediction."""
    ref, pred = normalize_answer(reference), normalize_answer(prediction)
    if not ref:  # '' is a substring of everything: an empty reference is met by an empty answer only
        return float(not pred)
    return float(ref in pred)


def regex_match(prediction: str, reference: str, *, pattern: re.Pattern[str]) -> float:
    """The answer ``pattern`` extracts from the prediction (group 1 if it has groups, else the whole
    match; the first match by ``re.search``), by :func:`normalized_match`; 0.0 where it does not match."""
    m = pattern.search(prediction)
    answer = None if m is None else (m.group(1) if pattern.groups else m.group(0))
    return 0.0 if answer is None else normalized_match(answer, reference)


def lcs_length(a: Sequence[str], b: Sequence[str]) -> int:
    """Length of the longest common subsequence of two token lists (dynamic programming, O(len(a)·len(b)))."""
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    return prev[-1]


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F1 over whitespace tokens of the normalised texts.

    Lin 2004, "ROUGE: A Package for Automatic Evaluation of Summaries", section 3.1: R = LCS/|ref|,
    P = LCS/|pred|, F = (1 + b²)RP / (R + b²P), here b = 1 as in google-research's rouge_score
    (``rouge_scorer._score_lcs``), which also scores 0 when either side has no tokens.
    """
    pred, ref = normalize_answer(prediction).split(), normalize_answer(reference).split()
    if not pred or not ref:
        return 0.0
    lcs = lcs_length(pred, ref)
    if lcs == 0:
        return 0.0
    p, r = lcs / len(pred), lcs / len(ref)
    return 2 * p * r / (p + r)


BUILTIN: dict[str, PairFn] = {
    "exact_match": exact_match,
    "normalized_match": normalized_match,
    "contains": contains,
    "regex": regex_match,  # needs eval.regex: bound by metric_fn
    "rouge_l": rouge_l,
}


def metric_problem(name: str) -> str | None:
    """Why ``name`` is not a metric (None when it is a built-in or a ``module:function``); nothing imported."""
    if name in BUILTIN or USER_METRIC.fullmatch(name):
        return None
    return (
        f"is not a metric: use one of {', '.join(BUILTIN)}, or a function of yours as "
        "module:function (e.g. mypkg.metrics:score), called as fn(prediction, reference) -> float in [0, 1]"
    )


# --- user functions -------------------------------------------------------------------------------


def is_user_metric(name: str) -> bool:
    return name not in BUILTIN and USER_METRIC.fullmatch(name) is not None


def resolve_user_metric(name: str) -> PairFn:
    """Import ``module:function`` and return the function.

    Raises:
        MetricError: the module is not importable or fails on import, or has no such callable.
    """
    module_name, _, attr = name.partition(":")
    where = f"eval.metric {name!r}"
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name is not None and (module_name == exc.name or module_name.startswith(exc.name + ".")):
            raise MetricError(
                f"{where}: no module {module_name!r} can be imported ({exc}); install the package that "
                "holds it or add its directory to PYTHONPATH, or set eval.metric to one of "
                f"{', '.join(BUILTIN)}"
            ) from None
        raise MetricError(f"{where}: importing {module_name!r} failed: {exc}") from exc
    except Exception as exc:  # the user's module runs on import: any error of theirs lands here
        raise MetricError(f"{where}: importing {module_name!r} raised {type(exc).__name__}: {exc}") from exc
    fn = getattr(module, attr, None)
    if fn is None:
        raise MetricError(
            f"{where}: module {module_name!r} has no attribute {attr!r}; check the function name after the ':'"
        )
    if not callable(fn):
        raise MetricError(f"{where}: {module_name}.{attr} is a {type(fn).__name__}, not a function")
    return fn


def _user_score(name: str, value: object) -> float:
    if isinstance(value, bool):
        return float(value)
    if isinstance(value, (int, float)) and math.isfinite(value) and 0.0 <= value <= 1.0:
        return float(value)
    raise MetricError(
        f"eval.metric {name!r} returned {value!r} ({type(value).__name__}); it must return a float in "
        "[0, 1] or a bool"
    )


# --- dispatch -------------------------------------------------------------------------------------


def metric_fn(name: str, cfg: MetricSettings) -> PairFn:
    """The ``(prediction, reference) -> float`` of metric ``name`` (user functions imported here)."""
    if name == "regex":
        if cfg.regex is None:
            raise MetricError("eval.metric is regex but eval.regex is not set; set eval.regex to a pattern")
        return partial(regex_match, pattern=re.compile(cfg.regex))
    if name in BUILTIN:
        return BUILTIN[name]
    if (why := metric_problem(name)) is not None:
        raise MetricError(f"eval.metric {name!r} {why}")
    return resolve_user_metric(name)


def score(
    metric: str, predictions: Sequence[str], references: Sequence[str], cfg: MetricSettings
) -> list[float]:
    """One score in [0, 1] per (prediction, reference) pair.

    Args:
        metric: a ``BUILTIN`` name or ``module:function``.
        predictions: the generated answers.
        references: the expected answers, as many as predictions.
        cfg: the eval settings (``eval.regex`` for metric regex).

    Raises:
        MetricError: the metric cannot be resolved, or a user function raises or returns a non-score
            (the message names the row, the function and what it said).
    """
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
    fn = metric_fn(metric, cfg)
    if not is_user_metric(metric):
        return [fn(p, r) for p, r in zip(predictions, references, strict=True)]
    out = []
    for i, (p, r) in enumerate(zip(predictions, references, strict=True)):
        try:
            value = fn(p, r)
        except Exception as exc:  # the user's code: report which row and what it said
            raise MetricError(
                f"eval.metric {metric!r} raised on eval row {i} ({type(exc).__name__}: {exc}); fix the "
                "function or set eval.metric to a built-in"
            ) from exc
        try:
            out.append(_user_score(metric, value))
        except MetricError as exc:
            raise MetricError(f"{exc} (eval row {i})") from None
    return out
