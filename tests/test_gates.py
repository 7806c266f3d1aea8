"""core.gates over plain dicts: every gate passes, fails, or says it does not apply or cannot compare."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save

from core.config import ConfigError, GatesConfig, load_config
from core.gates import (
    FAILED,
    GATES,
    NOT_APPLICABLE,
    NOT_COMPARABLE,
    PASSED,
    Baseline,
    Evidence,
    GateError,
    describe,
    run_gates,
)

FP = "a" * 64  # an eval fingerprint


def scores(loss: float, em: float | None) -> dict:
    return {"loss": loss, "perplexity": 2.718**loss, "exact_match": em, "generated": 4}


def manifest(method: str = "lora", fingerprint: str | None = FP, merged: bool = True) -> dict:
    files = [{"path": "adapter/adapter_model.safetensors", "size": 1, "sha256": "0"}]
    if merged:
        files.append({"path": "merged/model.safetensors", "size": 1, "sha256": "0"})
    lineage = {} if fingerprint is None else {"eval_fingerprint": fingerprint}
    return {"files": files, "metadata": {"method": method, "lineage": lineage}}


def adapter_bytes(b_scale: float = 0.1, poison: float | None = None) -> bytes:
    g = torch.Generator().manual_seed(0)
    sd = {
        "base_model.model.layers.0.q_proj.lora_A.weight": torch.randn(4, 64, generator=g),
        "base_model.model.layers.0.q_proj.lora_B.weight": torch.randn(64, 4, generator=g) * b_scale,
    }
    if poison is not None:
        sd["base_model.model.layers.0.q_proj.lora_A.weight"][0, 0] = poison
    return save(sd)


def evidence(**kw) -> Evidence:
    base = dict(
        version="v0002",
        manifest=manifest(),
        eval={"base": scores(2.0, 0.25), "tuned": scores(1.0, 0.75)},
        merge_report={"max_logit_gap": 2e-5, "mean_logit_gap": 1e-6, "loss_gap": 1e-6},
        adapter=adapter_bytes(),
        current=None,
    )
    base.update(kw)
    return Evidence(**base)


def by_name(ev: Evidence, cfg: GatesConfig | None = None) -> dict:
    return {r.name: r for r in run_gates(ev, cfg)}


def gates(**sections) -> GatesConfig:
    return GatesConfig.model_validate(sections)


def test_a_good_candidate_passes_every_gate_that_applies():
    r = by_name(evidence())
    assert (
        list(r)
        == list(GATES)
        == ["min_improvement", "no_regression", "max_merge_gap", "adapter_integrity", "max_forgetting"]
    )
    assert [r[n].status for n in r] == [PASSED, NOT_APPLICABLE, PASSED, PASSED, NOT_APPLICABLE]
    assert r["min_improvement"].value == 0.75 and r["min_improvement"].threshold == 0.25
    assert r["no_regression"].passed is None and "no current target" in r["no_regression"].detail
    assert r["adapter_integrity"].value == 2


@pytest.mark.parametrize(
    ("forgetting", "limit", "status"),
    [
        ({"base_loss": 3.0, "tuned_loss": 3.05, "delta": 0.05}, 0.1, PASSED),
        ({"base_loss": 3.0, "tuned_loss": 3.25, "delta": 0.25}, 0.1, FAILED),
        ({"base_loss": 3.0, "tuned_loss": 2.9, "delta": -0.1}, 0.0, PASSED),  # it got better
        (None, 0.1, FAILED),  # a limit and nothing measured: refuse, never pass by default
        ({"delta": float("nan")}, 0.1, FAILED),
    ],
)
def test_max_forgetting(forgetting, limit, status):
    ev = evidence(eval={"base": scores(2.0, 0.25), "tuned": scores(1.0, 0.75), "forgetting": forgetting})
    r = by_name(ev, gates(max_forgetting={"max_loss_increase": limit}))["max_forgetting"]
    assert r.status == status and r.threshold == limit
    if forgetting is None:
        assert "measured no forgetting" in r.detail


def test_a_forgetting_limit_without_a_forgetting_set_is_a_config_error():
    from core.config import ConfigError, load_config
    from tests.conftest import REPO

    with pytest.raises(ConfigError, match="set eval.forgetting_path"):
        load_config(
            overrides=["promote.gates.max_forgetting.max_loss_increase=0.1", "eval.forgetting_path=null"]
        )
    cfg = load_config(REPO / "deploy/runs/demo.yaml", ["promote.gates.max_forgetting.max_loss_increase=0.1"])
    assert cfg.eval.forgetting_path == "examples/demo/corpus.txt"  # the demo measures forgetting


@pytest.mark.parametrize(
    ("metric", "margin", "tuned", "status", "threshold"),
    [
        ("exact_match", 0.0, scores(1.0, 0.25), FAILED, 0.25),  # equal to base: no improvement
        ("exact_match", 0.0, scores(1.0, 0.5), PASSED, 0.25),
        ("exact_match", 0.3, scores(1.0, 0.5), FAILED, 0.55),
        ("loss", 0.0, scores(1.5, 0.0), PASSED, 2.0),  # lower is better
        ("loss", 0.6, scores(1.5, 0.0), FAILED, 1.4),
        ("loss", 0.0, scores(2.5, 0.9), FAILED, 2.0),
    ],
)
def test_min_improvement(metric, margin, tuned, status, threshold):
    ev = evidence(eval={"base": scores(2.0, 0.25), "tuned": tuned})
    r = by_name(ev, gates(min_improvement={"metric": metric, "margin": margin}))["min_improvement"]
    assert r.status == status and r.passed is (status == PASSED)
    assert r.value == tuned[metric] and r.threshold == pytest.approx(threshold)


def test_min_improvement_defaults_to_loss_where_exact_match_is_null():
    ev = evidence(eval={"base": scores(2.0, None), "tuned": scores(1.0, None)})
    r = by_name(ev)["min_improvement"]
    assert r.status == PASSED and r.value == 1.0 and "tuned loss" in r.detail
    r = by_name(ev, gates(min_improvement={"metric": "exact_match"}))["min_improvement"]
    assert r.status == FAILED and "exact_match is null for data.format text" in r.detail


def test_default_metric_is_the_task_metric_and_higher_is_better():
    def side(loss, em, task):
        return {**scores(loss, em), "task_metric": task, "task_metric_name": "rouge_l"}

    # Exact match got worse and loss better: the default judges by the task metric (rouge_l), which rose.
    ev = evidence(eval={"base": side(1.0, 0.5, 0.25), "tuned": side(2.0, 0.25, 0.5)})
    r = by_name(ev)["min_improvement"]
    assert r.status == PASSED and r.value == 0.5 and r.threshold == 0.25
    assert r.detail.startswith("tuned task_metric (rouge_l) 0.5 vs base 0.25: must be above")
    r = by_name(ev, gates(min_improvement={"metric": "exact_match"}))["min_improvement"]
    assert r.status == FAILED and r.value == 0.25
    worse = evidence(eval={"base": side(1.0, 0.5, 0.5), "tuned": side(1.0, 0.5, 0.25)})
    assert by_name(worse)["min_improvement"].status == FAILED


def test_task_metric_of_an_eval_json_from_before_task_metrics_is_its_exact_match():
    # No task_metric key: eval.metric could only be exact_match then, so that is what the gate reads.
    old = {"base": scores(2.0, 0.25), "tuned": scores(1.0, 0.75)}
    r = by_name(evidence(eval=old), gates(min_improvement={"metric": "task_metric"}))["min_improvement"]
    assert r.status == PASSED and r.value == 0.75 and r.threshold == 0.25


def test_min_improvement_fails_without_evidence():
    assert by_name(evidence(eval=None))["min_improvement"].status == FAILED
    r = by_name(evidence(eval={"tuned": scores(1.0, 0.5)}))["min_improvement"]
    assert r.status == FAILED and "no base scores" in r.detail


def current(em: float | None = 0.5, loss: float = 1.2, fingerprint: str | None = FP) -> Baseline:
    return Baseline(
        "v0001", manifest(fingerprint=fingerprint), {"base": scores(2.0, 0.25), "tuned": scores(loss, em)}
    )


@pytest.mark.parametrize(
    ("cur", "cfg", "status", "passed"),
    [
        (current(em=0.5), {}, PASSED, True),  # 0.75 >= 0.5
        (current(em=0.75), {}, PASSED, True),  # equal is no regression
        (current(em=0.8), {}, FAILED, False),
        (current(em=0.8), {"margin": 0.1}, PASSED, True),
        (current(loss=0.9), {"metric": "loss"}, FAILED, False),  # 1.0 > 0.9: worse
        (current(loss=0.9), {"metric": "loss", "margin": 0.2}, PASSED, True),
        (current(fingerprint="b" * 64), {}, NOT_COMPARABLE, None),
        (current(fingerprint=None), {}, NOT_COMPARABLE, None),
        (current(fingerprint="b" * 64), {"require_comparable": True}, FAILED, False),
        (Baseline("v0001", None, None, error="v0001 is gone"), {}, NOT_COMPARABLE, None),
    ],
)
def test_no_regression(cur, cfg, status, passed):
    r = by_name(evidence(current=cur), gates(no_regression=cfg))["no_regression"]
    assert (r.status, r.passed) == (status, passed), r.detail
    if status == NOT_COMPARABLE:
        assert "cannot compare with v0001" in r.detail


def test_no_regression_needs_the_candidates_own_fingerprint():
    ev = evidence(manifest=manifest(fingerprint=None), current=current())
    r = by_name(ev)["no_regression"]
    assert r.status == NOT_COMPARABLE and "v0002 records no eval fingerprint" in r.detail


@pytest.mark.parametrize(
    ("report", "cfg", "status"),
    [
        ({"max_logit_gap": 5e-4, "loss_gap": 0.5}, {}, PASSED),  # loss gap not checked by default
        ({"max_logit_gap": 2e-3, "loss_gap": 0.0}, {}, FAILED),
        ({"max_logit_gap": float("nan"), "loss_gap": 0.0}, {}, FAILED),
        ({"max_logit_gap": 5e-4, "loss_gap": -0.02}, {"max_loss_gap": 0.01}, FAILED),
        ({"max_logit_gap": 5e-4, "loss_gap": -0.005}, {"max_loss_gap": 0.01}, PASSED),
        ({"gap_rows": 0}, {}, FAILED),
    ],
)
def test_max_merge_gap(report, cfg, status):
    r = by_name(evidence(merge_report=report), gates(max_merge_gap=cfg))["max_merge_gap"]
    assert r.status == status, r.detail
    assert r.threshold["max_logit_gap"] == cfg.get("max_logit_gap", 1e-3)


def test_max_merge_gap_does_not_apply_without_a_merge():
    full = evidence(manifest=manifest(method="full", merged=False), merge_report=None, adapter=None)
    r = by_name(full)
    assert r["max_merge_gap"].status == NOT_APPLICABLE and "full fine-tune" in r["max_merge_gap"].detail
    assert r["adapter_integrity"].status == NOT_APPLICABLE
    unmerged = by_name(evidence(manifest=manifest(merged=False), merge_report=None))["max_merge_gap"]
    assert unmerged.status == NOT_APPLICABLE and "no merged model" in unmerged.detail
    # A merged model shipped without its report is not taken on trust.
    assert by_name(evidence(merge_report=None))["max_merge_gap"].status == FAILED


@pytest.mark.parametrize(
    ("data", "match"),
    [
        (adapter_bytes(b_scale=0.0), "every lora_B is all zero"),
        (adapter_bytes(poison=float("nan")), "inf/nan"),
        (b"not a safetensors file", "does not load as safetensors"),
    ],
)
def test_adapter_integrity_fails_broken_adapters(data, match):
    r = by_name(evidence(adapter=data))["adapter_integrity"]
    assert r.status == FAILED and match in r.detail


def test_disabled_gates_are_reported_not_run():
    r = by_name(evidence(eval=None), gates(min_improvement={"enabled": False}))
    assert r["min_improvement"].status == "disabled" and r["min_improvement"].passed is None


def test_gate_error_names_every_failed_gate_with_value_and_threshold():
    ev = evidence(
        eval={"base": scores(2.0, 0.25), "tuned": scores(1.0, 0.25)},
        merge_report={"max_logit_gap": 0.0123, "loss_gap": 0.0},
    )
    results = run_gates(ev)
    err = GateError("tiny/v0002 to 'production'", results)
    msg = str(err)
    assert msg.startswith("promotion of tiny/v0002 to 'production' refused by 2 gate(s): ")
    assert "min_improvement (value 0.25, threshold 0.25" in msg
    assert (
        "max_merge_gap (value {max_logit_gap: 0.0123, loss_gap: 0}, threshold {max_logit_gap: 0.001, loss_gap: none}"
        in msg
    )
    assert "adapter_integrity" not in msg and "--force" in msg
    assert not err.retryable and len(err.results) == len(GATES)
    assert describe(results[0]).startswith(
        "min_improvement: failed (value 0.25, threshold 0.25): tuned exact_match"
    )


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        (
            ["promote.gates.min_improvement.metric=accuracy"],
            "min_improvement.metric: Input should be 'exact_match'",
        ),
        (["promote.gates.no_regression.metric=bleu"], "no_regression.metric: Input should be"),
        (
            ["data.format=text", "promote.gates.min_improvement.metric=exact_match"],
            "min_improvement.metric is exact_match, which data.format 'text' does not produce",
        ),
        (
            ["promote.alias=production", "eval.enabled=false"],
            "min_improvement judges eval metrics but eval.enabled is false; set eval.enabled: true or "
            "promote.gates.min_improvement.enabled: false",
        ),
        (["promote.alias=production", "eval.compare_base=false"], "set eval.compare_base: true"),
        (["promote.gates.max_merge_gap.max_logit_gap=0"], "max_logit_gap: Input should be greater than 0"),
        (["promote.gates.nope.enabled=true"], "promote.gates.nope: unknown key"),
        (["promote.alias=v0003"], "not a version-like name"),
    ],
)
def test_config_refuses_gates_the_eval_cannot_feed(overrides, match):
    with pytest.raises(ConfigError, match=match.replace("(", r"\(").replace(")", r"\)").replace(".", r"\.")):
        load_config(overrides=overrides)


def test_config_accepts_gates_the_run_can_feed():
    # Text data with the automatic metric, and eval off for a run that does not promote, are fine.
    load_config(overrides=["data.format=text"])
    load_config(overrides=["eval.enabled=false"])
    cfg = load_config(overrides=["promote.alias=production", "promote.gates.min_improvement.margin=0.1"])
    assert cfg.promote.gates.min_improvement.margin == 0.1 and cfg.promote.fail_on_gate is False
    off = load_config(
        overrides=[
            "promote.alias=production",
            "eval.enabled=false",
            "promote.gates.min_improvement.enabled=false",
            "promote.gates.no_regression.enabled=false",
        ]
    )
    assert off.promote.alias == "production"
