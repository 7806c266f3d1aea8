"""Start-up hangs, found by fault injection: a torch build lock left by a killed build, a node that never
starts, and timeouts that must not be retried (real processes, real torchrun and DeepSpeed, no mocks).

The DeepSpeed op is built once per machine (``python -m core.extensions``, which ``.ci/in-venv`` runs at
install); tests that plant locks work on a copy of that build in a temporary ``TORCH_EXTENSIONS_DIR``,
so they never touch the machine's cache and never pay for a rebuild.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from core.errors import is_retryable
from core.extensions import build_lock, check_baton
from core.launch import TrainingTimeout, run_training
from core.run import RunDir
from core.startup import TRAINING, StartupTimeout, StartupWatchdog, mark
from tests.conftest import REPO
from tests.processes import assert_no_orphans

OP = "deepspeed_shm_comm"

# Holds torch's build lock exactly as a build does (torch/utils/file_baton.py), until it is killed.
_HOLD_BATON = """
import sys, time
from torch.utils.file_baton import FileBaton
assert FileBaton(sys.argv[1]).try_acquire()
print("held", flush=True)
time.sleep(300)
"""

_HOLD_BUILD_LOCK = """
import sys, time
from pathlib import Path
from core.extensions import build_lock
with build_lock(Path(sys.argv[1])):
    print("locked", flush=True)
    time.sleep(300)
"""


def _start(code: str, *args: str) -> subprocess.Popen:
    """A helper process that prints one line once it holds its lock."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(
        [sys.executable, "-c", code, *args], stdout=subprocess.PIPE, text=True, env=env, cwd=REPO
    )
    assert proc.stdout is not None and proc.stdout.readline().strip() in ("held", "locked")
    return proc


def _kill(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)


# ----------------------------------------------------------------------------------------------------
# The locks themselves (no DeepSpeed)
# ----------------------------------------------------------------------------------------------------


def test_live_torch_build_lock_is_kept_and_a_killed_builds_lock_is_removed(tmp_path, caplog):
    op_dir = tmp_path / OP
    op_dir.mkdir()
    baton = op_dir / "lock"
    assert check_baton(op_dir) == ("none", "")
    holder = _start(_HOLD_BATON, str(baton))
    try:
        state, who = check_baton(op_dir)
        assert state == "held" and f"{baton} is held by pid {holder.pid}" in who
        assert baton.exists()
    finally:
        _kill(holder)  # as a timeout or the OOM killer ends a build: the lock file stays
    assert baton.exists()
    with caplog.at_level(logging.WARNING, logger="core.extensions"):
        state, what = check_baton(op_dir)
    assert state == "removed" and not baton.exists()
    assert f"removed a stale torch build lock {baton}" in what
    assert any(str(baton) in r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)


def test_deltatune_build_lock_names_its_holder_and_is_freed_when_the_holder_dies(tmp_path):
    holder = _start(_HOLD_BUILD_LOCK, str(tmp_path))
    phases: list[tuple[str, str]] = []
    acquired = threading.Event()

    def take() -> None:
        with build_lock(tmp_path, on_phase=lambda p, d: phases.append((p, d)), poll_s=0.05):
            acquired.set()

    t = threading.Thread(target=take, daemon=True)
    t.start()
    try:
        time.sleep(1.0)
        assert not acquired.is_set()
        assert phases == [
            (
                "build lock",
                f"waiting for deltatune's build lock {tmp_path / '.deltatune-build.lock'} "
                f"(held by pid {holder.pid})",
            )
        ]
    finally:
        _kill(holder)  # the kernel releases a dead holder's flock
    assert acquired.wait(10)
    t.join(10)


def test_watchdog_names_the_stuck_phase_and_stops_after_the_first_step(tmp_path):
    rd = RunDir(tmp_path)
    now = [0.0]
    dog = StartupWatchdog(rd, [0, 1], timeout_s=10, before="starting the ranks", clock=lambda: now[0])
    dog()
    now[0] = 9.0
    mark(rd, 0, "loading the model", "the model /m")
    dog()  # rank 1 has had 9 s, rank 0 just moved
    now[0] = 10.5
    with pytest.raises(StartupTimeout) as err:
        dog()
    assert "rank 1 has not started (for 10s): starting the ranks" in str(err.value)
    assert "rank 0 (pid" in str(err.value) and "'loading the model'" in str(err.value)
    assert not is_retryable(err.value)

    dog = StartupWatchdog(rd, [0, 1], timeout_s=10, before="starting the ranks", clock=lambda: now[0])
    mark(rd, 1, "rendezvous", "joining the process group of 2 rank(s) at 127.0.0.1:1")
    dog()
    for t in (6.0, 12.0, 18.0):  # every phase change is progress
        now[0] += 6.0
        mark(rd, 0, f"phase {t}")
        mark(rd, 1, "rendezvous", f"attempt {t}")
        dog()
    mark(rd, 0, TRAINING)
    now[0] += 11
    with pytest.raises(
        StartupTimeout, match=r"rank 1 \(pid \d+\) is in phase 'rendezvous'.*attempt 18"
    ) as err:
        dog()
    assert "Check: every rank and node must be started" in str(err.value)
    mark(rd, 1, TRAINING)
    dog = StartupWatchdog(rd, [0, 1], timeout_s=10, before="", clock=lambda: now[0])
    dog()
    now[0] += 1000
    dog()  # start-up is over: no limit on the steps
    assert dog.done


def test_timeouts_default_and_leave_the_training_fingerprint_alone(run_config):
    from core.run import training_fingerprint

    cfg = run_config()
    assert cfg.train.startup_timeout_s == 900 and cfg.train.timeout_s is None
    other = run_config("train.startup_timeout_s=5", "train.timeout_s=7")
    assert training_fingerprint(other) == training_fingerprint(cfg)  # a checkpoint resumes under either
    assert run_config("train.startup_timeout_s=null").train.startup_timeout_s is None


# ----------------------------------------------------------------------------------------------------
# Real launches
# ----------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def built_op() -> Path:
    """The machine's build of DeepSpeed's CPU comm op (built here once if nothing built it yet)."""
    from core.extensions import build_dir

    env = {k: v for k, v in os.environ.items() if k != "TORCH_EXTENSIONS_DIR"}
    subprocess.run([sys.executable, "-m", "core.extensions"], check=True, cwd=REPO, env=env, timeout=900)
    saved = os.environ.pop("TORCH_EXTENSIONS_DIR", None)
    try:
        op_dir = build_dir(OP)
    finally:
        if saved is not None:
            os.environ["TORCH_EXTENSIONS_DIR"] = saved
    assert (op_dir / f"{OP}.so").is_file(), list(op_dir.iterdir())
    return op_dir


@pytest.fixture
def ext_root(built_op: Path, tmp_path: Path, monkeypatch) -> Path:
    """A private TORCH_EXTENSIONS_DIR holding a copy of the built op (mtimes kept: ninja finds it current)."""
    root = tmp_path / "torch_extensions"
    shutil.copytree(built_op, root / OP, ignore=shutil.ignore_patterns("lock"))
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(root))
    return root


def _prepared(cfg) -> Path:
    from core.data import prepare_dataset
    from core.modeling import load_tokenizer

    RunDir.create(cfg)
    return prepare_dataset(cfg.data, load_tokenizer(cfg.model), cfg.run_dir / "data").train_dir


@pytest.mark.slow
def test_a_killed_builds_torch_lock_is_cleared_and_two_ranks_train(run_config, ext_root: Path):
    """A live holder of torch's lock is waited for, and the wait fails after startup_timeout_s naming the
    lock and its holder; once that holder is killed mid-"build", the next launch removes the lock it left,
    says so, and both ranks train (before: every later launch blocked before step 1, forever)."""
    baton = ext_root / OP / "lock"
    cfg = run_config("name=baton", "train.num_processes=2", "train.max_steps=2", "train.startup_timeout_s=20")
    data = _prepared(cfg)
    holder = _start(_HOLD_BATON, str(baton))
    try:
        t0 = time.monotonic()
        with pytest.raises(StartupTimeout) as err:
            run_training(cfg, cfg.run_dir, data, on_line=lambda s: None)
        assert time.monotonic() - t0 < 120
        msg = str(err.value)
        assert "phase 'build lock'" in msg and f"{baton} is held by pid {holder.pid}" in msg, msg
        assert not is_retryable(err.value)
        assert_no_orphans(cfg.run_dir)
    finally:
        _kill(holder)
    assert baton.exists()  # what a build killed mid-way leaves

    lines: list[str] = []
    summary = run_training(cfg, cfg.run_dir, data, on_line=lines.append)
    assert any(f"removed a stale torch build lock {baton}" in ln for ln in lines), lines[-20:]
    assert not baton.exists()
    assert summary["steps"] == 2 and summary["world_size"] == 2
    first = json.loads((cfg.run_dir / "metrics.jsonl").read_text().splitlines()[0])
    assert first["step"] == 1
    rd = RunDir(cfg.run_dir)
    assert [rd.read_json(rd.phase_file(r))["phase"] for r in (0, 1)] == [TRAINING, TRAINING]


@pytest.mark.slow
def test_a_node_that_never_starts_fails_the_start_up_naming_the_rendezvous(run_config):
    """Node 0 of a 2-node job whose node 1 never starts: torchrun waits in its rendezvous with no rank
    started; the watchdog fails it after startup_timeout_s, names the address, and leaves no process."""
    from core.train import _free_port

    port = _free_port()
    cfg = run_config(
        "name=lonely",
        "train.num_processes=1",
        "train.num_nodes=2",
        "train.node_rank=0",
        "train.master_addr=127.0.0.1",
        f"train.master_port={port}",
        "train.startup_timeout_s=8",
    )
    RunDir.create(cfg)
    t0 = time.monotonic()
    with pytest.raises(StartupTimeout) as err:
        run_training(cfg, cfg.run_dir, cfg.run_dir / "data" / "train", on_line=lambda s: None)
    assert 8 <= time.monotonic() - t0 < 60
    msg = str(err.value)
    assert "made no progress for 8s (train.startup_timeout_s)" in msg
    assert f"rank 0 has not started (for 8s): torchrun's rendezvous of 2 nodes at 127.0.0.1:{port}" in msg
    assert "Check: every node must run the flow with the same train.num_nodes" in msg
    assert not is_retryable(err.value)
    assert_no_orphans(cfg.run_dir)


def test_a_timeout_is_not_retried_by_the_train_task(prefect_harness, run_config):
    """train.timeout_s is the budget of the stage, not of each attempt: with train.retries=2 the task
    still launches once, and fails with the timeout."""
    from prefect import flow

    from tasks.train import train

    cfg = run_config("name=slow", "train.timeout_s=1", "train.retries=2")
    rd = RunDir.create(cfg)

    @flow
    def just_train() -> tuple[str, BaseException]:
        task = train.with_options(retries=cfg.train.retries, retry_delay_seconds=0)
        state = task(str(rd.path), str(rd.path / "data" / "train"), key="k", return_state=True)
        return state.name, state.result(raise_on_failure=False)

    # A handler of our own on the logger: Prefect's logging setup owns the root logger's handlers.
    records: list[logging.LogRecord] = []
    handler = logging.Handler(logging.INFO)
    handler.emit = records.append
    logger = logging.getLogger("core.launch")
    old_level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        name, exc = just_train()
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)
    assert len([r for r in records if r.getMessage().startswith("launching:")]) == 1
    assert name == "TimedOut"  # Prefect's own name for a task that raised a TimeoutError
    assert isinstance(exc, TrainingTimeout) and "train.timeout_s=1s" in str(exc) and "Not retried" in str(exc)
    assert_no_orphans(cfg.run_dir)
