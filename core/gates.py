"""Promotion gates: pure checks of a candidate version's evidence, each returning one ``GateResult``.

results = run_gates(Evidence("v0003", manifest, eval=..., merge_report=..., adapter=...), GatesConfig())
failed = [r for r in results if r.passed is False]       # any: GateError refuses the promotion

A gate is one function registered with ``@gate("name")`` and one settings model of that name in
``core.config.GatesConfig``; ``run_gates`` runs every registered gate in order.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from typing import Any

from pydantic import BaseModel
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors

from core.adapter import AdapterError, check_adapter_tensors
from core.config import (
    AdapterIntegrityGate,
    GatesConfig,
    MaxForgettingGate,
    MaxMergeGapGate,
    MinImprovementGate,
    NoRegressionGate,
)
from core.errors import DeltatuneError

# A gate's outcome. ``passed`` is True or False for passed / failed, None for the other three; a
# not-comparable result is failed instead when the gate requires comparable evidence.
PASSED, FAILED = "passed", "failed"
NOT_APPLICABLE = "not_applicable"  # nothing to check (no merge in a full fine-tune, no adapter)
NOT_COMPARABLE = "not_comparable"  # the evidence exists but cannot be compared (other eval rows)
DISABLED = "disabled"

LOWER_IS_BETTER = {"loss", "perplexity"}


@dataclass(frozen=True)
class GateResult:
    """One gate's verdict: ``value`` measured against ``threshold`` (either may be None)."""

    name: str
    status: str
    passed: bool | None
    value: Any
    threshold: Any
    detail: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Baseline:
    """The alias's current target: the version a candidate must not regress from."""

    version: str
    manifest: Mapping[str, Any] | None
    eval: Mapping[str, Any] | None
    error: str | None = None  # the target could not be read (deleted or altered): nothing to compare


@dataclass(frozen=True)
class Evidence:
    """What the gates judge: the candidate's manifest and reports, and the alias's current target.

    ``eval`` and ``merge_report`` are the parsed ``eval.json`` / ``merge_report.json`` (None when the
    version has none); ``adapter`` is the bytes of ``adapter/adapter_model.safetensors`` (None: no
    adapter, e.g. a full fine-tune); ``current`` is None when the alias has no target yet.
    """

    version: str
    manifest: Mapping[str, Any]
    eval: Mapping[str, Any] | None = None
    merge_report: Mapping[str, Any] | None = None
    adapter: bytes | None = None
    current: Baseline | None = None


GateFn = Callable[[Evidence, Any], GateResult]
GATES: dict[str, GateFn] = {}


def gate(name: str) -> Callable[[GateFn], GateFn]:
    """Register ``fn(evidence, settings) -> GateResult`` as the gate ``name``; ``settings`` is
    ``GatesConfig.<name>``, which must exist."""

    def register(fn: GateFn) -> GateFn:
        if name not in GatesConfig.model_fields:
            raise TypeError(f"gate {name!r} has no settings: add a field {name!r} to core.config.GatesConfig")
        GATES[name] = fn
        return fn

    return register


def run_gates(evidence: Evidence, cfg: GatesConfig | None = None) -> list[GateResult]:
    """Every registered gate's result, in registration order (a disabled gate reports ``disabled``)."""
    cfg = cfg or GatesConfig()
    results = []
    for name, fn in GATES.items():
        settings: BaseModel = getattr(cfg, name)
        if not getattr(settings, "enabled", True):
            results.append(_result(name, DISABLED, None, None, f"off (promote.gates.{name}.enabled: false)"))
        else:
            results.append(fn(evidence, settings))
    return results


def failed(results: list[GateResult] | list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The results (as dicts) whose ``passed`` is False."""
    dicts = [r.to_dict() if isinstance(r, GateResult) else dict(r) for r in results]
    return [r for r in dicts if r.get("passed") is False]


def describe(result: GateResult | Mapping[str, Any]) -> str:
    """One log line: ``name: status (value ..., threshold ...): detail``."""
    r = result.to_dict() if isinstance(result, GateResult) else result
    return f"{r['name']}: {r['status']} (value {_fmt(r['value'])}, threshold {_fmt(r['threshold'])}): {r['detail']}"


class GateError(DeltatuneError):
    """A promotion refused by its gates. Not retryable: the same version meets the same gates.

    ``results`` holds every gate's result (as dicts), failed or not.
    """

    def __init__(self, target: str, results: list[GateResult] | list[dict[str, Any]]):
        self.results = [r.to_dict() if isinstance(r, GateResult) else dict(r) for r in results]
        bad = failed(self.results)
        reasons = "; ".join(
            f"{r['name']} (value {_fmt(r['value'])}, threshold {_fmt(r['threshold'])}: {r['detail']})"
            for r in bad
        )
        super().__init__(
            f"promotion of {target} refused by {len(bad)} gate(s): {reasons}. Change the gate's settings "
            "(promote.gates.<gate>, e.g. --set promote.gates.<gate>.enabled=false) or pass --force to "
            "promote anyway (recorded as forced)"
        )


def _fmt(x: Any) -> str:
    if isinstance(x, float):
        return f"{x:.4g}"
    if isinstance(x, Mapping):
        return "{" + ", ".join(f"{k}: {_fmt(v)}" for k, v in x.items()) + "}"
    return "none" if x is None else str(x)


def _result(name: str, status: str, value: Any, threshold: Any, detail: str) -> GateResult:
    passed = {PASSED: True, FAILED: False}.get(status)
    return GateResult(name, status, passed, value, threshold, detail)


def _metric(setting: str | None, eval_: Mapping[str, Any]) -> str:
    """``setting``, or (None) task_metric where the eval scored it, else exact_match (an eval.json
    written before task metrics), else loss (data format text)."""
    if setting is not None:
        return setting
    tuned = eval_.get("tuned") or {}
    for metric in ("task_metric", "exact_match"):
        if tuned.get(metric) is not None:
            return metric
    return "loss"


def _label(metric: str, eval_: Mapping[str, Any]) -> str:
    """``task_metric (rouge_l)``: the configured metric's name beside the generic key."""
    name = (eval_.get("tuned") or {}).get("task_metric_name")
    return f"{metric} ({name})" if metric == "task_metric" and name else metric


def _score(eval_: Mapping[str, Any] | None, side: str, metric: str) -> float | None:
    scores = (eval_ or {}).get(side) or {}
    if metric == "task_metric" and "task_metric" not in scores:
        metric = "exact_match"  # an eval.json from before eval.metric had choices: exact match was its metric
    value = scores.get(metric)
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _eval_fingerprint(manifest: Mapping[str, Any] | None) -> str | None:
    lineage = ((manifest or {}).get("metadata") or {}).get("lineage") or {}
    return lineage.get("eval_fingerprint") if isinstance(lineage, Mapping) else None


def _no_metric(name: str, where: str, metric: str) -> str:
    generated = metric in ("exact_match", "task_metric")
    hint = f" ({metric} is null for data.format text: use metric loss)" if generated else ""
    return f"{where} has no {metric} score{hint}; set promote.gates.{name}.metric"


@gate("min_improvement")
def min_improvement(ev: Evidence, cfg: MinImprovementGate) -> GateResult:
    """Tuned beats base on the metric by more than ``margin`` (lower is better for loss/perplexity)."""
    name = "min_improvement"
    if ev.eval is None:
        return _result(name, FAILED, None, None, f"{ev.version} has no eval.json to judge")
    metric = _metric(cfg.metric, ev.eval)
    base, tuned = _score(ev.eval, "base", metric), _score(ev.eval, "tuned", metric)
    if "base" not in ev.eval:
        return _result(
            name, FAILED, tuned, None, "eval.json has no base scores (eval.compare_base was false)"
        )
    if base is None or tuned is None:
        return _result(name, FAILED, tuned, None, _no_metric(name, "eval.json", metric))
    lower = metric in LOWER_IS_BETTER
    threshold = base - cfg.margin if lower else base + cfg.margin
    ok = tuned < threshold if lower else tuned > threshold
    detail = (
        f"tuned {_label(metric, ev.eval)} {tuned:.4g} vs base {base:.4g}: must be {'below' if lower else 'above'} "
        f"base {'-' if lower else '+'} margin {cfg.margin:g}"
    )
    return _result(name, PASSED if ok else FAILED, tuned, threshold, detail)


@gate("no_regression")
def no_regression(ev: Evidence, cfg: NoRegressionGate) -> GateResult:
    """The candidate's tuned metric is no worse than the current target's by more than ``margin``, when
    both were scored on the same eval rows (same ``metadata.lineage.eval_fingerprint``)."""
    name = "no_regression"
    cur = ev.current
    if cur is None:
        return _result(name, NOT_APPLICABLE, None, None, "the alias has no current target to regress from")
    if ev.eval is None:
        return _result(name, FAILED, None, None, f"{ev.version} has no eval.json to judge")
    metric = _metric(cfg.metric, ev.eval)
    value = _score(ev.eval, "tuned", metric)
    if value is None:
        return _result(name, FAILED, None, None, _no_metric(name, "eval.json", metric))

    def not_comparable(why: str) -> GateResult:
        status = FAILED if cfg.require_comparable else NOT_COMPARABLE
        tail = " (promote.gates.no_regression.require_comparable is true)" if cfg.require_comparable else ""
        return _result(name, status, value, None, f"cannot compare with {cur.version}: {why}{tail}")

    if cur.error is not None:
        return not_comparable(cur.error)
    mine, theirs = _eval_fingerprint(ev.manifest), _eval_fingerprint(cur.manifest)
    if mine is None or theirs is None:
        which = ev.version if mine is None else cur.version
        return not_comparable(f"{which} records no eval fingerprint (metadata.lineage.eval_fingerprint)")
    if mine != theirs:
        return not_comparable(f"scored on other eval rows (eval fingerprint {mine[:12]} vs {theirs[:12]})")
    current = _score(cur.eval, "tuned", metric)
    if current is None:
        return not_comparable(_no_metric(name, f"{cur.version}'s eval.json", metric))
    lower = metric in LOWER_IS_BETTER
    threshold = current + cfg.margin if lower else current - cfg.margin
    ok = value <= threshold if lower else value >= threshold
    detail = (
        f"tuned {_label(metric, ev.eval)} {value:.4g} vs {cur.version}'s {current:.4g}: must be {'at most' if lower else 'at least'} "
        f"{cur.version}'s {'+' if lower else '-'} margin {cfg.margin:g}"
    )
    return _result(name, PASSED if ok else FAILED, value, threshold, detail)


@gate("max_merge_gap")
def max_merge_gap(ev: Evidence, cfg: MaxMergeGapGate) -> GateResult:
    """merge_report's max logit gap (and, when ``max_loss_gap`` is set, |loss gap|) under its limit."""
    name = "max_merge_gap"
    threshold = {"max_logit_gap": cfg.max_logit_gap, "loss_gap": cfg.max_loss_gap}
    report = ev.merge_report
    if report is None:
        if (ev.manifest.get("metadata") or {}).get("method") == "full":
            return _result(name, NOT_APPLICABLE, None, None, "a full fine-tune has no merge")
        paths = [f.get("path", "") for f in ev.manifest.get("files", [])]
        if not any(p.startswith("merged/") for p in paths):
            return _result(name, NOT_APPLICABLE, None, None, f"{ev.version} has no merged model")
        return _result(
            name, FAILED, None, threshold, f"{ev.version} has a merged model but no merge_report.json"
        )
    gap, loss_gap = report.get("max_logit_gap"), report.get("loss_gap")
    value = {"max_logit_gap": gap, "loss_gap": loss_gap}
    if not isinstance(gap, (int, float)):
        return _result(
            name, FAILED, value, threshold, "merge_report.json has no max_logit_gap (no rows measured)"
        )
    problems = []
    if not gap <= cfg.max_logit_gap:  # NaN fails too
        problems.append(f"max logit gap {gap:.3g} over {cfg.max_logit_gap:g}")
    if cfg.max_loss_gap is not None:
        if not isinstance(loss_gap, (int, float)) or not abs(loss_gap) <= cfg.max_loss_gap:
            problems.append(f"|loss gap| {_fmt(loss_gap)} over {cfg.max_loss_gap:g}")
    if problems:
        return _result(name, FAILED, value, threshold, "; ".join(problems))
    return _result(name, PASSED, value, threshold, f"max logit gap {gap:.3g} within {cfg.max_logit_gap:g}")


@gate("adapter_integrity")
def adapter_integrity(ev: Evidence, cfg: AdapterIntegrityGate) -> GateResult:
    """The stored adapter's tensors are present, finite and trained (``core.adapter.check_adapter_tensors``)."""
    name = "adapter_integrity"
    if ev.adapter is None:
        return _result(name, NOT_APPLICABLE, None, None, f"{ev.version} has no adapter")
    try:
        tensors = load_safetensors(ev.adapter)
    except (SafetensorError, ValueError, OSError) as exc:
        return _result(name, FAILED, None, None, f"the adapter file does not load as safetensors: {exc}")
    try:
        check_adapter_tensors(tensors, require_trained=True)
    except AdapterError as exc:
        return _result(name, FAILED, len(tensors), None, str(exc))
    return _result(name, PASSED, len(tensors), None, f"{len(tensors)} tensors present, finite and trained")


@gate("max_forgetting")
def max_forgetting(ev: Evidence, cfg: MaxForgettingGate) -> GateResult:
    """The tuned model's loss on general text (eval.json ``forgetting``) rose by at most
    ``max_loss_increase`` over the base's."""
    name = "max_forgetting"
    if cfg.max_loss_increase is None:
        return _result(
            name, NOT_APPLICABLE, None, None, "no limit (promote.gates.max_forgetting.max_loss_increase)"
        )
    delta = ((ev.eval or {}).get("forgetting") or {}).get("delta")
    if not isinstance(delta, (int, float)):
        return _result(
            name,
            FAILED,
            None,
            cfg.max_loss_increase,
            f"{ev.version}'s eval measured no forgetting (no base and tuned loss on eval.forgetting_path)",
        )
    ok = delta <= cfg.max_loss_increase  # NaN fails
    verb = "within" if ok else "over"
    detail = f"general-text loss rose by {delta:+.4g} (tuned - base), {verb} {cfg.max_loss_increase:g}"
    return _result(name, PASSED if ok else FAILED, delta, cfg.max_loss_increase, detail)
