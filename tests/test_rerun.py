"""Reruns in NEW flow runs redo nothing that finished: stage keys over content, results persisted by
Prefect, checked before reuse. Each test runs the real finetune flow (twice or more) under Prefect's test
harness, on the small tiny model, and reads which stages ran from Prefect's own task-run states.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import REPO

pytestmark = pytest.mark.slow

STAGES = ("prepare", "train", "merge", "evaluate", "publish")


def run_flow(cfg, tmp_path: Path, **kwargs):
    """Run the finetune flow on ``cfg`` (written as YAML) in a new flow run; return (result, states)
    where ``states`` maps each stage to the name of its task run's final state in Prefect's API."""
    from core.config import to_yaml
    from flows.finetune import finetune

    path = tmp_path / f"{cfg.name}.yaml"
    path.write_text(to_yaml(cfg))
    state = finetune(config=str(path), return_state=True, **kwargs)
    return state.result(), task_states(state.state_details.flow_run_id)


def task_states(flow_run_id, timeout_s: float = 60) -> dict[str, str]:
    """Stage -> final state name of its task run, as Prefect's API recorded it. Task-run states reach
    the API asynchronously (as events), so wait until every one is final."""
    from prefect import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    deadline, last = time.monotonic() + timeout_s, None
    with get_client(sync_client=True) as client:
        while True:
            runs = client.read_task_runs(
                flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id]))
            )
            states = {r.name.split("-", 1)[0]: r.state.name if r.state else None for r in runs}
            final = all(r.state and r.state.is_final() for r in runs)
            if (final and states == last) or time.monotonic() > deadline:  # final, and read twice the same
                return states
            last = states
            time.sleep(0.3)


def versions(cfg, model: str | None = None) -> list[str]:
    from core.store import list_versions

    return list_versions(cfg.publish.store, model or cfg.publish.model_name or cfg.name)


def mtimes(run_dir: Path) -> dict[str, int]:
    return {
        str(p.relative_to(run_dir)): p.stat().st_mtime_ns
        for p in run_dir.rglob("*")
        if p.is_file() and p.name != "run_config.yaml"
    }


def test_same_config_again_reuses_every_stage_and_publishes_no_second_copy(
    prefect_harness, run_config, tmp_path, capsys
):
    from flows.cli import main

    cfg = run_config("name=again", "train.max_steps=4")
    first, states = run_flow(cfg, tmp_path)
    assert states == dict.fromkeys(STAGES, "Completed"), states
    assert first["stages"] == dict.fromkeys(STAGES, "ran")
    before = mtimes(cfg.run_dir)

    second, states = run_flow(cfg, tmp_path)
    assert states == dict.fromkeys(STAGES, "Cached"), states
    assert second["stages"] == dict.fromkeys(STAGES, "cached")
    assert second["publish"]["version"] == first["publish"]["version"] == "v0001"
    assert versions(cfg) == ["v0001"]
    assert mtimes(cfg.run_dir) == before  # nothing trained, evaluated, merged or rewritten

    # The CLI says so and names the existing version.
    assert main(["run", str(tmp_path / "again.yaml")]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["published"] == first["publish"]["uri"]
    assert printed["stages"] == dict.fromkeys(STAGES, "cached")
    assert versions(cfg) == ["v0001"]


def test_another_run_name_reuses_the_trained_result(prefect_harness, run_config, tmp_path):
    cfg = run_config("name=first", "train.max_steps=4", "publish.model_name=shared")
    first, _ = run_flow(cfg, tmp_path)

    # Same content, same model in the store: nothing runs and the existing version is reported.
    same = run_config("name=second", "train.max_steps=4", "publish.model_name=shared")
    result, states = run_flow(same, tmp_path)
    assert states == dict.fromkeys(STAGES, "Cached"), states
    assert result["publish"]["uri"] == first["publish"]["uri"]
    assert result["train"]["output_dir"] == first["train"]["output_dir"]  # the first run's adapter
    assert not (same.run_dir / "adapter").exists() and not (same.run_dir / "metrics.jsonl").exists()

    # Another model name: the trained, evaluated and merged results are reused; only publish runs.
    other = run_config("name=third", "train.max_steps=4")
    result, states = run_flow(other, tmp_path)
    assert states == {**dict.fromkeys(STAGES[:-1], "Cached"), "publish": "Completed"}, states
    assert versions(other, "third") == ["v0001"] and versions(cfg, "shared") == ["v0001"]


def test_lr_change_reuses_prepare_and_reruns_the_rest(prefect_harness, run_config, tmp_path):
    cfg = run_config("name=lr", "train.max_steps=4")
    run_flow(cfg, tmp_path)
    changed = run_config("name=lr", "train.max_steps=4", "train.lr=2e-3")
    result, states = run_flow(changed, tmp_path)
    assert states == {"prepare": "Cached", **dict.fromkeys(STAGES[1:], "Completed")}, states
    assert result["train"]["resumed_from_step"] is None  # trained afresh, not resumed
    assert versions(cfg) == ["v0001", "v0002"]


def test_one_byte_of_data_changed_reruns_everything(prefect_harness, run_config, tmp_path):
    data = tmp_path / "train.jsonl"
    data.write_bytes((REPO / "examples/demo/train.jsonl").read_bytes())
    cfg = run_config("name=bytes", "train.max_steps=4", f"data.path={data}")
    run_flow(cfg, tmp_path)
    raw = bytearray(data.read_bytes())
    at = raw.index(b'"output": "') + len(b'"output": "')
    raw[at] = ord("X") if raw[at] != ord("X") else ord("Y")  # one byte of one answer
    data.write_bytes(bytes(raw))
    _, states = run_flow(cfg, tmp_path)
    assert states == dict.fromkeys(STAGES, "Completed"), states
    assert versions(cfg) == ["v0001", "v0002"]


def test_the_reject_threshold_keys_prepare_alone(run_config):
    """A stricter data.max_reject_fraction must reach prepare's check, so it is in prepare's key (a
    cached prepare would skip the check); the trained result stays reusable (same data fingerprint)."""
    from core.stages import stage_keys

    loose, strict = stage_keys(run_config("data.max_reject_fraction=0.9")), stage_keys(run_config())
    assert loose.prepare != strict.prepare
    assert (loose.data_fingerprint, loose.train) == (strict.data_fingerprint, strict.train)


def test_refresh_reruns_every_stage(prefect_harness, run_config, tmp_path):
    cfg = run_config("name=refresh", "train.max_steps=4")
    run_flow(cfg, tmp_path)
    result, states = run_flow(cfg, tmp_path, refresh=True)
    assert states == dict.fromkeys(STAGES, "Completed"), states
    assert result["train"]["resumed_from_step"] is None
    steps = [json.loads(line)["step"] for line in (cfg.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]  # trained again from step 0
    assert versions(cfg) == ["v0001", "v0002"]
    # And the refreshed results are the ones reused next time.
    _, states = run_flow(cfg, tmp_path)
    assert states == dict.fromkeys(STAGES, "Cached"), states


def test_a_cached_result_whose_files_changed_is_recomputed_never_returned(
    prefect_harness, run_config, tmp_path
):
    import shutil

    cfg = run_config("name=gone", "train.max_steps=4")
    first, _ = run_flow(cfg, tmp_path)
    shutil.rmtree(cfg.run_dir / "merged")
    report = cfg.run_dir / "eval.json"
    report.write_text(report.read_text().replace('"method"', '"methed"'))  # altered, same size

    result, states = run_flow(cfg, tmp_path)
    assert states == {
        "prepare": "Cached",
        "train": "Cached",
        "evaluate": "Completed",
        "merge": "Completed",
        "publish": "Cached",  # the same content: the version already published is reported
    }, states
    assert (cfg.run_dir / "merged" / "model.safetensors").is_file()
    assert json.loads(report.read_text())["method"] == "lora"
    assert result["publish"]["version"] == first["publish"]["version"]
    # The recomputed results are reused from now on (persisted under the next key of the chain).
    _, states = run_flow(cfg, tmp_path)
    assert states == dict.fromkeys(STAGES, "Cached"), states


def test_failure_at_publish_then_a_new_run_redoes_nothing_before_publish_and_finishes_the_version(
    prefect_harness, run_config, tmp_path, monkeypatch
):
    from core import store
    from tasks.publish import publish

    cfg = run_config("name=pubfail", "train.max_steps=4")
    real_upload, calls = store._upload_file, []

    def upload(s, local, remote):  # two files land, then the store goes away for good
        calls.append(remote)
        if len(calls) > 2:
            raise ConnectionResetError("simulated outage")
        real_upload(s, local, remote)

    monkeypatch.setattr(store, "_upload_file", upload)
    monkeypatch.setattr(publish, "retry_delay_seconds", 0)
    with pytest.raises(store.PublishError, match="simulated outage"):
        run_flow(cfg, tmp_path)
    assert versions(cfg) == []  # nothing visible
    monkeypatch.setattr(store, "_upload_file", real_upload)

    result, states = run_flow(cfg, tmp_path)
    assert states == {**dict.fromkeys(STAGES[:-1], "Cached"), "publish": "Completed"}, states
    assert result["publish"]["version"] == "v0001" and len(result["publish"]["skipped"]) == 2
    assert versions(cfg) == ["v0001"]
    assert not (cfg.run_dir / "publish_state.json").exists()


def test_lost_manifest_reply_outlasting_retries_does_not_wedge_the_next_run(
    prefect_harness, run_config, tmp_path, monkeypatch
):
    """The manifest PUT lands but its reply is lost, and the store stays unreachable through every
    Prefect retry: the next flow run (another flow-run id, so other metadata) recognises the version as
    its own by content and finishes, instead of failing with "published by another run"."""
    from core import store
    from tasks.publish import publish

    cfg = run_config("name=lostreply", "train.max_steps=4")
    real_put, real_open = store._put_bytes, store._open_store
    down = []

    def put(s, path, data, *, create_only):
        real_put(s, path, data, create_only=create_only)
        if path.endswith("/manifest.json"):
            down.append(True)
            raise ConnectionError("reply lost")

    def open_store(uri, options):
        if down:
            raise store.StoreUnavailableError("simulated outage")
        return real_open(uri, options)

    monkeypatch.setattr(store, "_put_bytes", put)
    monkeypatch.setattr(store, "_open_store", open_store)
    monkeypatch.setattr(publish, "retry_delay_seconds", 0)
    with pytest.raises(store.StoreUnavailableError):
        run_flow(cfg, tmp_path)
    assert (cfg.run_dir / "publish_state.json").is_file()
    monkeypatch.setattr(store, "_put_bytes", real_put)
    monkeypatch.setattr(store, "_open_store", real_open)

    result, states = run_flow(cfg, tmp_path)
    assert states["publish"] == "Completed" and result["publish"]["version"] == "v0001"
    assert versions(cfg) == ["v0001"]
    assert not (cfg.run_dir / "publish_state.json").exists()
    store.verify_version(cfg.publish.store, "lostreply", "v0001")


# Installed through PYTHONPATH into the training subprocess only: at step 3 (checkpoint 2 is complete)
# it SIGKILLs its parent, the process running the flow, and then itself: a flow run killed mid-train.
_KILL_FLOW = """
import os, signal, sys
import core.data as _data

_real, _calls = _data.collate, [0]

def collate(*args, **kwargs):
    if not sys.argv[0].endswith("train.py"):  # the flow's own process imports this file too
        return _real(*args, **kwargs)
    _calls[0] += 1
    if _calls[0] == 3 and not os.path.exists(os.environ["DELTATUNE_TEST_KILLED"]):
        open(os.environ["DELTATUNE_TEST_KILLED"], "w").close()
        os.kill(os.getppid(), signal.SIGKILL)
        os.kill(os.getpid(), signal.SIGKILL)
    return _real(*args, **kwargs)

_data.collate = collate
"""


def test_a_killed_flow_run_and_a_new_run_reuse_every_completed_stage(prefect_harness, run_config, tmp_path):
    from core.config import to_yaml

    cfg = run_config("name=killed", "train.max_steps=4", "train.save_every=2")
    path = tmp_path / "killed.yaml"
    path.write_text(to_yaml(cfg))
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(_KILL_FLOW)
    marker = tmp_path / "killed"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_API")}
    # The killed flow runs in a process of its own, on its own ephemeral Prefect API: only the result
    # storage (cache.storage) and the run directory are shared with the next run.
    env.update(
        PREFECT_HOME=str(tmp_path / "prefect-killed"),
        PYTHONPATH=os.pathsep.join([str(site), str(REPO)]),
        DELTATUNE_TEST_KILLED=str(marker),
    )
    log = tmp_path / "killed.log"
    with log.open("w") as out:  # a file, not a pipe: the killed flow's own API server may outlive it
        proc = subprocess.Popen(
            [sys.executable, "-m", "flows.cli", "run", str(path)],
            env=env,
            cwd=REPO,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            proc.wait(timeout=600)
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)  # whatever the killed flow left behind
    assert proc.returncode == -signal.SIGKILL, log.read_text()[-3000:]
    assert marker.exists() and not (cfg.run_dir / "train_summary.json").exists()

    result, states = run_flow(cfg, tmp_path)
    assert states == {"prepare": "Cached", **dict.fromkeys(STAGES[1:], "Completed")}, states
    assert result["train"]["resumed_from_step"] == 2
    assert versions(cfg) == ["v0001"]


def test_finetune_promotes_at_its_end_through_its_gates_and_a_rerun_keeps_the_alias(
    prefect_harness, run_config, tmp_path
):
    from core.store import AliasNotFoundError, alias_history, resolve_alias

    base = ["name=promoted", "train.max_steps=12", "train.lr=5e-3", "promote.alias=staging"]
    # Twelve steps teach the small model no exact answer: the default gate (exact match above base)
    # refuses, the refusal is reported, and the run itself succeeds (promote.fail_on_gate is false).
    refused, _ = run_flow(run_config(*base), tmp_path)
    assert refused["promote"]["promoted"] is False and "min_improvement" in json.dumps(refused["promote"])
    with pytest.raises(AliasNotFoundError):
        resolve_alias(refused["publish"]["uri"].rsplit("/promoted/", 1)[0], "promoted", "staging")

    # Gated on held-out loss instead: every stage is reused (promotion is not a stage) and it passes.
    cfg = run_config(*base, "promote.gates.min_improvement.metric=loss")
    first, states = run_flow(cfg, tmp_path)
    assert {k: states[k] for k in STAGES} == dict.fromkeys(STAGES, "Cached"), states
    assert first["promote"]["promoted"] is True, first["promote"]
    assert resolve_alias(cfg.publish.store, "promoted", "staging")["version"] == "v0001"

    # The same config again: nothing reruns, and the alias still names the one version there is.
    run_flow(cfg, tmp_path)
    assert resolve_alias(cfg.publish.store, "promoted", "staging")["version"] == "v0001"
    assert {r["version"] for r in alias_history(cfg.publish.store, "promoted", "staging")} == {"v0001"}
