"""What a finetune run shows in Prefect: its artifacts and task-run names, read back through Prefect's
client from the API the runs reported to (the session's test harness). Two runs of the demo config with
few steps, the second reusing every stage, serve every assertion."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import REPO

pytestmark = pytest.mark.slow

STAGES = ("prepare", "train", "merge", "evaluate", "publish")
MODEL = "Report_Demo.v1"  # not a valid artifact key as it is: slugged to report-demo-v1
KEY = "report-demo-v1"


@pytest.fixture(scope="module")
def two_runs(prefect_harness, tmp_path_factory):
    from flows.finetune import finetune

    tmp = tmp_path_factory.mktemp("report")
    overrides = [
        "name=report",
        f"output_dir={tmp / 'runs'}",
        f"publish.store={tmp / 'artifacts'}",
        f"publish.model_name={MODEL}",
        f"cache.storage={tmp / 'results'}",
        "train.max_steps=4",
        "train.save_every=0",
        "eval.generation_rows=4",
        "eval.max_new_tokens=4",
        "promote.alias=staging",
        "promote.gates.min_improvement.metric=loss",
    ]
    runs = []
    for _ in range(2):
        state = finetune(config=str(REPO / "deploy/runs/demo.yaml"), overrides=overrides, return_state=True)
        assert state.is_completed(), state
        runs.append((state.result(), state.state_details.flow_run_id))
    return runs


def artifacts(flow_run_id=None, key=None) -> list:
    from prefect import get_client
    from prefect.client.schemas.filters import (
        ArtifactFilter,
        ArtifactFilterKey,
        FlowRunFilter,
        FlowRunFilterId,
    )

    kwargs = {}
    if flow_run_id is not None:
        kwargs["flow_run_filter"] = FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id]))
    if key is not None:
        kwargs["artifact_filter"] = ArtifactFilter(key=ArtifactFilterKey(any_=[key]))
    with get_client(sync_client=True) as client:
        return client.read_artifacts(**kwargs)


def by_key(flow_run_id) -> dict:
    return {a.key: a for a in artifacts(flow_run_id)}


def test_the_summary_names_the_version_its_manifest_and_every_stage(two_runs):
    out, run_id = two_runs[0]
    summary = by_key(run_id)[f"{KEY}-summary"]
    md = summary.data
    assert summary.type == "markdown"
    assert out["publish"]["uri"] in md and out["publish"]["manifest_sha256"] in md
    for stage in STAGES:
        assert f"| {stage} | ran |" in md, md
    tuned = out["eval"]["tuned"]["loss"]
    assert f"{tuned:.4f}" in md and "max logit gap" in md and "adapter on disk:" in md
    assert "trainable parameters" in md and "merged model on disk:" in md
    assert (
        "- adapters on 28 modules (q_proj ×4," in md and "targets: attention-mlp for model_type 'llama'" in md
    )
    # The gates' results and where the alias went (or why it did not move).
    assert "staging" in md and "min_improvement" in md and "adapter_integrity" in md


def test_samples_progress_and_version_link(two_runs):
    out, run_id = two_runs[0]
    found = by_key(run_id)
    rows = json.loads(found[f"{KEY}-samples"].data)
    assert found[f"{KEY}-samples"].type == "table"
    assert len(rows) >= 1 and {"prompt", "reference", "base", "tuned"} <= rows[0].keys()
    progress = found[f"{KEY}-train-progress"]
    assert progress.type == "progress" and float(progress.data) == 100.0
    link = found[f"{KEY}-version"].data
    assert Path(out["publish"]["uri"]).resolve().as_uri() in link and out["publish"]["version"] in link


def test_task_runs_are_named_by_stage_and_run(two_runs):
    from prefect import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    _, run_id = two_runs[0]
    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[run_id])))
    assert {f"{s}-report" for s in STAGES} <= {r.name for r in runs}


def test_a_rerun_shows_its_cached_stages_and_the_keys_keep_the_history(two_runs):
    (first, _), (second, run_id) = two_runs
    assert second["stages"] == dict.fromkeys(STAGES, "cached")
    md = by_key(run_id)[f"{KEY}-summary"].data
    for stage in STAGES:
        assert f"| {stage} | cached |" in md, md
    assert second["publish"]["uri"] == first["publish"]["uri"] and first["publish"]["uri"] in md
    assert len(artifacts(key=f"{KEY}-summary")) == 2
    assert len(artifacts(key=f"{KEY}-version")) == 2
    assert len(artifacts(key=f"{KEY}-train-progress")) == 1  # the second run trained nothing


def test_an_artifact_that_cannot_be_built_never_fails_the_run(prefect_harness, caplog):
    from prefect import flow

    from core.config import load_config
    from tasks._cache import Stages
    from tasks._report import report_run

    cfg = load_config(overrides=["name=broken", "publish.model_name=broken-report"])

    @flow
    def broken() -> dict:
        # An eval result of the wrong shape: the summary cannot be built; the link still is.
        out = {"eval": "not a dict", "publish": {"uri": "/tmp/x", "model": "m", "version": "v1"}}
        return report_run(cfg, out, Stages(cfg.cache))

    made = broken()
    assert "summary" not in made and "version" not in made  # no manifest sha256 in that publish result
    assert "could not create the summary artifact" in caplog.text
