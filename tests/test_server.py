"""``deltatune run``'s Prefect API (flows/server.py): a killed run leaves no process behind, and a server
named by PREFECT_API_URL is used instead of a temporary one. Real subprocesses, real Prefect servers."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import REPO
from tests.processes import alive, cmdline, descendants, wait_gone

pytestmark = pytest.mark.slow


def start_run(tmp_path: Path, small_model_dir: Path, env: dict[str, str]) -> subprocess.Popen:
    """``deltatune run`` on the small model, long enough to be killed in the middle of training."""
    log = (tmp_path / "run.log").open("w")
    args = [
        f"model.name_or_path={small_model_dir}",
        f"output_dir={tmp_path / 'runs'}",
        f"data.cache_dir={tmp_path / 'cache'}",
        f"publish.store={tmp_path / 'artifacts'}",
        f"cache.storage={tmp_path / 'results'}",
        "data.max_seq_len=64",
        "train.batch_size=4",
        "train.max_steps=100000",
        "train.save_every=0",
    ]
    sets = [a for kv in args for a in ("--set", kv)]
    return subprocess.Popen(
        [sys.executable, "-m", "flows.cli", "run", *sets],
        cwd=REPO,
        env={**os.environ, "PREFECT_LOGGING_LEVEL": "INFO", **env},
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,  # the test can always clean up the whole group
    )


def wait_for_training(proc: subprocess.Popen, run_dir: Path, timeout_s: float = 400) -> set[int]:
    """Wait until the first step is logged; return the run's descendant processes at that moment."""
    deadline = time.monotonic() + timeout_s
    metrics = run_dir / "metrics.jsonl"
    while not (metrics.is_file() and metrics.stat().st_size):
        assert proc.poll() is None, f"the run ended early ({proc.returncode})"
        assert time.monotonic() < deadline, "training did not start"
        time.sleep(0.5)
    return descendants(proc.pid)


def cleanup(proc: subprocess.Popen, pids: set[int]) -> None:
    for pid in {proc.pid, *pids}:
        if alive(pid):
            os.kill(pid, signal.SIGKILL)
    proc.wait(timeout=30)


def test_sigkill_leaves_no_temporary_server_and_no_training_process(tmp_path, small_model_dir):
    env = {"PREFECT_HOME": str(tmp_path / "prefect-home")}
    proc = start_run(tmp_path, small_model_dir, env)  # conftest cleared PREFECT_API_URL
    pids: set[int] = set()
    try:
        pids = wait_for_training(proc, tmp_path / "runs" / "demo")
        servers = [p for p in pids if "prefect.server.api.server:create_app" in cmdline(p)]
        trainers = [p for p in pids if "core.train" in cmdline(p)]
        assert len(servers) == 1, f"one temporary Prefect server: {[cmdline(p) for p in pids]}"
        assert trainers, "the training process is a descendant"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
        left = wait_gone(pids)
        assert not left, f"left running after SIGKILL: {[cmdline(p) for p in left]}"
    finally:
        cleanup(proc, pids)


def test_running_server_is_used_and_sigterm_marks_the_run_crashed(tmp_path, small_model_dir, prefect_harness):
    """With PREFECT_API_URL set, no server is started: the flow run is recorded by that server; SIGTERM
    ends the run with every process it started, and the server records it as crashed, not running."""
    from prefect import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterName
    from prefect.settings import PREFECT_API_URL

    url = PREFECT_API_URL.value()
    proc = start_run(tmp_path, small_model_dir, {"PREFECT_API_URL": url})
    pids: set[int] = set()
    try:
        pids = wait_for_training(proc, tmp_path / "runs" / "demo")
        assert not [p for p in pids if "create_app" in cmdline(p) or "uvicorn" in cmdline(p)], (
            "a server was started although PREFECT_API_URL names one"
        )
        log = (tmp_path / "run.log").read_text()
        name = log.split("Beginning flow run '", 1)[1].split("'", 1)[0]
        os.kill(proc.pid, signal.SIGTERM)
        assert proc.wait(timeout=60) == 128 + signal.SIGTERM
        left = wait_gone(pids)
        assert not left, f"left running after SIGTERM: {[cmdline(p) for p in left]}"
    finally:
        cleanup(proc, pids)
    with get_client(sync_client=True) as client:
        deadline = time.monotonic() + 30
        while True:
            (run,) = client.read_flow_runs(flow_run_filter=FlowRunFilter(name=FlowRunFilterName(any_=[name])))
            if run.state.is_final() or time.monotonic() > deadline:
                break
            time.sleep(0.5)
    assert run.state.name == "Crashed", run.state
