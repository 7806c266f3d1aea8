"""Launcher behaviour: argv per launcher, pre-flight checks, the supervised process group, failure kinds."""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path

import pytest

from core.config import ConfigError
from core.launch import (
    PreflightError,
    TrainingFailed,
    TrainingTimeout,
    build_command,
    device_count,
    preflight,
    run_supervised,
    run_training,
)
from core.process import parent_of
from core.run import RunDir, training_fingerprint
from core.startup import StartupTimeout
from tests.conftest import REPO
from tests.processes import cmdline, descendants

# ----------------------------------------------------------------------------------------------------
# build_command
# ----------------------------------------------------------------------------------------------------


def _script(run_dir, data) -> list[str]:
    return ["--run-dir", str(run_dir), "--train-data", str(data)]


def _after(argv: list[str], flag: str) -> str:
    assert argv.count(flag) == 1, (flag, argv)
    return argv[argv.index(flag) + 1]


@pytest.fixture
def no_cluster_env(monkeypatch):
    for key in ("NODE_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(key, raising=False)


def test_python_launcher_for_one_lora_process(run_config, no_cluster_env):
    cfg = run_config()
    argv = build_command(cfg, "/r/run", "/r/data/train")
    assert argv == [sys.executable, "-m", "core.train", *_script("/r/run", "/r/data/train")]


def test_torchrun_standalone_for_two_processes(run_config, no_cluster_env):
    cfg = run_config("train.num_processes=2")
    argv = build_command(cfg, "/r/run", "/r/data/train")
    assert argv[:3] == [sys.executable, "-m", "torch.distributed.run"]
    assert _after(argv, "--nproc_per_node") == "2"
    assert "--standalone" in argv
    assert "--nnodes" not in argv and "--master_addr" not in argv
    assert argv[-6:] == ["-m", "core.train", *_script("/r/run", "/r/data/train")]
    # method full always runs under a launcher, even with one process
    full = build_command(run_config("method=full"), "/r/run", "/r/data/train")
    assert full[:3] == [sys.executable, "-m", "torch.distributed.run"]
    assert _after(full, "--nproc_per_node") == "1"


def test_torchrun_multi_node_from_config_wins_over_env(run_config, monkeypatch):
    monkeypatch.setenv("NODE_RANK", "7")
    monkeypatch.setenv("MASTER_ADDR", "env-head")
    monkeypatch.setenv("MASTER_PORT", "1111")
    cfg = run_config(
        "train.num_processes=2",
        "train.num_nodes=2",
        "train.node_rank=1",
        "train.master_addr=10.0.0.1",
        "train.master_port=29511",
    )
    argv = build_command(cfg, "/r/run", "/r/data/train")
    assert "--standalone" not in argv
    assert _after(argv, "--nproc_per_node") == "2"
    assert _after(argv, "--nnodes") == "2"
    assert _after(argv, "--node_rank") == "1"
    assert _after(argv, "--master_addr") == "10.0.0.1"
    assert _after(argv, "--master_port") == "29511"
    assert all(isinstance(a, str) for a in argv)


def test_torchrun_multi_node_from_env(run_config, monkeypatch):
    monkeypatch.setenv("NODE_RANK", "3")
    monkeypatch.setenv("MASTER_ADDR", "head.cluster")
    monkeypatch.setenv("MASTER_PORT", "1234")
    cfg = run_config("train.num_processes=2", "train.num_nodes=4")
    argv = build_command(cfg, "/r/run", "/r/data/train")
    assert _after(argv, "--nnodes") == "4"
    assert _after(argv, "--node_rank") == "3"
    assert _after(argv, "--master_addr") == "head.cluster"
    assert _after(argv, "--master_port") == "1234"


def test_deepspeed_launcher_argv(run_config, tmp_path, no_cluster_env):
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("node1 slots=2\nnode2 slots=2\n")
    one = build_command(
        run_config("train.launcher=deepspeed", "train.num_processes=2", f"train.hostfile={hostfile}"),
        "/r/run",
        "/r/data/train",
    )
    assert one[:3] == [sys.executable, "-m", "deepspeed.launcher.runner"]
    assert _after(one, "--num_gpus") == "2"
    assert _after(one, "--hostfile") == str(hostfile)
    assert "--no_ssh" not in one and "--num_nodes" not in one
    assert one[-6:] == ["--module", "core.train", *_script("/r/run", "/r/data/train")]

    # multi-node, each node started by the scheduler: no ssh fan-out, this node's rank given
    multi = build_command(
        run_config(
            "train.launcher=deepspeed",
            "train.num_processes=2",
            "train.num_nodes=2",
            "train.node_rank=1",
            "train.master_addr=10.0.0.1",
            "train.master_port=29600",
        ),
        "/r/run",
        "/r/data/train",
    )
    assert _after(multi, "--num_nodes") == "2"
    assert _after(multi, "--master_addr") == "10.0.0.1"
    assert _after(multi, "--master_port") == "29600"
    assert "--no_ssh" in multi
    assert _after(multi, "--node_rank") == "1"
    assert "--hostfile" not in multi

    # multi-node with a hostfile: the launcher fans out over ssh itself
    fan = build_command(
        run_config(
            "train.launcher=deepspeed",
            "train.num_processes=2",
            "train.num_nodes=2",
            "train.master_addr=10.0.0.1",
            f"train.hostfile={hostfile}",
        ),
        "/r/run",
        "/r/data/train",
    )
    assert _after(fan, "--hostfile") == str(hostfile)
    assert "--no_ssh" not in fan
    for argv in (one, multi, fan):
        assert isinstance(argv, list) and all(isinstance(a, str) for a in argv)


@pytest.mark.parametrize("launcher", ["torchrun", "deepspeed"])
def test_multi_node_without_master_address_is_refused(run_config, no_cluster_env, launcher):
    cfg = run_config(f"train.launcher={launcher}", "train.num_processes=2", "train.num_nodes=2")
    with pytest.raises(PreflightError, match="MASTER_ADDR"):
        build_command(cfg, "/r/run", "/r/data/train")


# ----------------------------------------------------------------------------------------------------
# preflight and config-level refusals
# ----------------------------------------------------------------------------------------------------


def test_preflight_passes_a_plain_run(run_config):
    cfg = run_config()
    preflight(cfg, cfg.run_dir)  # no checkpoints, no DeepSpeed config: nothing to object to


def test_preflight_missing_deepspeed_config(run_config, tmp_path):
    missing = tmp_path / "nope" / "zero2.json"
    cfg = run_config("train.num_processes=1", f"train.deepspeed_config={missing}")
    with pytest.raises(PreflightError, match=r"deepspeed_config=.*zero2\.json does not exist"):
        preflight(cfg, cfg.run_dir)


def test_preflight_more_processes_than_devices(run_config):
    kind, n = device_count()
    cfg = run_config(f"train.num_processes={n + 1}", f"train.batch_size={n + 1}")
    with pytest.raises(PreflightError) as err:
        preflight(cfg, cfg.run_dir)
    assert f"num_processes={n + 1}" in str(err.value)
    assert f"{n} {kind} device(s)" in str(err.value)


def test_preflight_qlora_with_zero3_json(run_config, tmp_path):
    ds = tmp_path / "z3.json"
    ds.write_text(json.dumps({"zero_optimization": {"stage": 3}}))
    cfg = run_config("method=qlora", f"train.deepspeed_config={ds}")
    with pytest.raises(PreflightError, match="ZeRO-3"):
        preflight(cfg, cfg.run_dir)
    ds.write_text(json.dumps({"zero_optimization": {"stage": 2}}))
    preflight(cfg, cfg.run_dir)  # stage 2 shards only optimizer state: fine for 4-bit weights


def test_preflight_reports_every_problem_and_launches_nothing(run_config, tmp_path):
    kind, n = device_count()
    cfg = run_config(
        f"train.num_processes={n + 1}",
        f"train.batch_size={n + 1}",
        f"train.deepspeed_config={tmp_path / 'missing.json'}",
    )
    # a checkpoint written by another configuration (different lr) in the same run directory
    from core import checkpoint as ckpt

    other = run_config("train.lr=5e-2")
    step = cfg.run_dir / "checkpoints" / ckpt.step_dir_name(2)
    step.mkdir(parents=True)
    ckpt.mark_complete(step, {"step": 2, "fingerprint": training_fingerprint(other)})
    with pytest.raises(PreflightError) as err:
        run_training(cfg, cfg.run_dir, tmp_path / "data" / "train", on_line=lambda s: None)
    msg = str(err.value)
    assert msg.startswith("cannot start training:")
    assert "missing.json does not exist" in msg
    assert f"num_processes={n + 1}" in msg
    assert "different training configuration" in msg
    assert msg.count("\n  - ") == 3
    assert not RunDir(cfg.run_dir).error_file(0).exists() and not (cfg.run_dir / "metrics.jsonl").exists()


def test_config_level_refusals(run_config):
    with pytest.raises(ConfigError, match="zero_stage=3 with method 'qlora'"):
        run_config("method=qlora", "train.zero_stage=3")
    with pytest.raises(ConfigError, match=r"batch_size=8 is not divisible .* = 6"):
        run_config("train.num_processes=2", "train.grad_accum=3", "train.batch_size=8")


# ----------------------------------------------------------------------------------------------------
# run_supervised: streaming, exit codes, and the process group dying as a whole
# ----------------------------------------------------------------------------------------------------

# A child that starts a grandchild (same process group), records both pids, then sleeps.
_SPAWNER = """
import os, subprocess, sys, time
g = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
open(sys.argv[1] + ".tmp", "w").write(f"{os.getpid()} {g.pid}")
os.replace(sys.argv[1] + ".tmp", sys.argv[1])
print("spawned", flush=True)
time.sleep(120)
"""


def _dead(pid: int) -> bool:
    """Gone, or a zombie (dead but not yet reaped by its new parent)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return True
    return "\nState:\tZ" in status


def _assert_all_dead(pids: list[int], within_s: float = 10.0) -> None:
    end = time.monotonic() + within_s
    while time.monotonic() < end and not all(_dead(p) for p in pids):
        time.sleep(0.05)
    assert all(_dead(p) for p in pids), {p: _dead(p) for p in pids}


def _pids(path: Path) -> list[int]:
    return [int(x) for x in path.read_text().split()]


def test_run_supervised_streams_every_line_and_returns_exit_code():
    code = "import sys\nfor i in range(300): print(f'line {i}')\nsys.exit(3)"
    seen: list[str] = []
    rc, tail = run_supervised([sys.executable, "-c", code], on_line=seen.append, tail=40)
    assert rc == 3
    assert seen == [f"line {i}" for i in range(300)]
    assert tail == seen[-40:]
    rc, _ = run_supervised([sys.executable, "-c", "print('ok')"], on_line=seen.append)
    assert rc == 0 and seen[-1] == "ok"


def test_run_supervised_timeout_kills_the_whole_group(tmp_path):
    pidfile = tmp_path / "pids"
    t0 = time.monotonic()
    # Long enough for a loaded machine to start both interpreters and write the pid file.
    with pytest.raises(TrainingTimeout, match="timeout_s=15"):
        run_supervised([sys.executable, "-c", _SPAWNER, str(pidfile)], on_line=lambda s: None, timeout_s=15)
    assert time.monotonic() - t0 < 60  # not the children's 120 s sleep
    pids = _pids(pidfile)
    assert len(pids) == 2
    _assert_all_dead(pids)


def test_run_supervised_on_line_exception_kills_the_whole_group(tmp_path):
    pidfile = tmp_path / "pids"

    def on_line(line: str) -> None:
        if line == "spawned":
            raise RuntimeError("consumer cancelled")

    t0 = time.monotonic()
    with pytest.raises(RuntimeError, match="consumer cancelled"):
        run_supervised([sys.executable, "-c", _SPAWNER, str(pidfile)], on_line=on_line)
    assert time.monotonic() - t0 < 30
    _assert_all_dead(_pids(pidfile))


class _Cancelled(BaseException):
    """Stands in for a cancellation delivered to the supervising thread (like asyncio.CancelledError)."""


def test_run_supervised_cancellation_in_the_waiting_thread_kills_the_whole_group(tmp_path):
    pidfile = tmp_path / "pids"

    def on_line(line: str) -> None:
        if line == "spawned":
            signal.setitimer(signal.ITIMER_REAL, 0.3)

    def cancel(signum, frame):
        raise _Cancelled()

    old = signal.signal(signal.SIGALRM, cancel)
    try:
        with pytest.raises(_Cancelled):
            run_supervised([sys.executable, "-c", _SPAWNER, str(pidfile)], on_line=on_line, timeout_s=60)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
    _assert_all_dead(_pids(pidfile))


# ----------------------------------------------------------------------------------------------------
# run_training: what a failed child means for retries
# ----------------------------------------------------------------------------------------------------


def test_run_training_bad_data_is_not_retryable(run_config, tmp_path):
    cfg = run_config()
    RunDir.create(cfg)
    lines: list[str] = []
    with pytest.raises(TrainingFailed) as err:
        run_training(cfg, cfg.run_dir, tmp_path / "no-such-split", on_line=lines.append)
    assert err.value.retryable is False
    assert "DataError" in str(err.value) and "not a prepared split" in str(err.value)
    info = json.loads(RunDir(cfg.run_dir).error_file(0).read_text())
    assert info == {"type": "DataError", "message": info["message"], "retryable": False, "rank": 0}
    assert any("Traceback" in ln for ln in lines)  # the child's output was streamed


def _children_running(module: str) -> list[int]:
    """Pids of this process's children whose command line contains ``module``."""
    me = os.getpid()
    return [p for p in descendants(me) if parent_of(p) == me and module in cmdline(p)]


def test_run_training_killed_child_is_retryable(run_config, tmp_path):
    from core.data import prepare_dataset
    from core.modeling import load_tokenizer

    cfg = run_config("train.max_steps=300")  # far longer than it takes to kill it
    RunDir.create(cfg)
    data = prepare_dataset(cfg.data, load_tokenizer(cfg.model), cfg.run_dir / "data")
    killed: list[int] = []

    def on_line(line: str) -> None:
        if not killed and "training lora" in line:  # the model is loaded and the loop starts
            killed.extend(_children_running("core.train"))
            for pid in killed:
                os.kill(pid, signal.SIGKILL)

    with pytest.raises(TrainingFailed) as err:
        run_training(cfg, cfg.run_dir, data.train_dir, on_line=on_line)
    assert len(killed) == 1
    assert err.value.retryable is True
    assert "exited with code -9" in str(err.value)
    assert not RunDir(cfg.run_dir).error_file(0).exists()
    assert not (cfg.run_dir / "train_summary.json").exists()


# ----------------------------------------------------------------------------------------------------
# The Prefect retry predicate of the train task
# ----------------------------------------------------------------------------------------------------


def test_train_task_retry_predicate():
    from prefect.states import Failed

    from core import checkpoint as ckpt
    from core.adapter import AdapterError
    from core.data import DataError
    from core.errors import DeltatuneError
    from tasks._retry import retry_if_retryable

    def decide(exc: BaseException) -> bool:
        return retry_if_retryable(None, None, Failed(data=exc))

    assert decide(PreflightError("cannot start training")) is False
    assert decide(ConfigError("bad key")) is False
    assert decide(DataError("no rows")) is False
    assert decide(TrainingFailed("DataError: ...", retryable=False)) is False
    assert decide(TrainingFailed("exited with code -9", retryable=True)) is True
    assert decide(RuntimeError("rank lost")) is True
    assert decide(TimeoutError("connect timed out")) is True  # a network timeout may pass
    # train.timeout_s is the stage's budget: a retry would multiply it (README, "Reruns, retries and resume")
    assert decide(TrainingTimeout("training exceeded train.timeout_s=60s")) is False
    assert decide(StartupTimeout("no progress in phase 'rendezvous'")) is False
    import torch

    assert decide(torch.OutOfMemoryError("CUDA out of memory")) is False  # same batch, same OOM
    assert decide(ModuleNotFoundError("No module named 'flash_attn'")) is False
    # the verdict is the error's own; their old bases still catch them
    assert decide(ckpt.CheckpointMismatchError("another config")) is False
    assert decide(AdapterError("missing keys")) is False
    assert decide(ckpt.UnreadableCheckpointError("marked UNREADABLE")) is True  # the retry passes it by
    for cls, base in [
        (PreflightError, ValueError),
        (TrainingFailed, RuntimeError),
        (TrainingTimeout, TimeoutError),
        (StartupTimeout, TimeoutError),
        (ckpt.CheckpointMismatchError, ValueError),
        (ckpt.UnreadableCheckpointError, ValueError),
        (AdapterError, ValueError),
    ]:
        assert issubclass(cls, DeltatuneError) and issubclass(cls, base), cls


def test_supervisor_survives_undecodable_output_and_a_failing_progress_display():
    code = "import sys\nsys.stdout.buffer.write(b'loss \\xff\\xfe ok\\n')\nsys.stdout.flush()\nsys.exit(0)"
    seen: list[str] = []

    def tick() -> None:
        raise ValueError("half a JSON line")

    rc, _ = run_supervised([sys.executable, "-c", code], on_line=seen.append, on_tick=tick)
    assert rc == 0 and seen == ["loss \ufffd\ufffd ok"]


def test_torn_error_file_falls_back_to_the_log(run_config, tmp_path, monkeypatch):
    """A rank killed while writing train_error.json must not hide the failure behind a JSON error."""
    import core.launch as launch

    cfg = run_config("name=torn")
    RunDir.create(cfg)
    monkeypatch.setattr(launch, "preflight", lambda *a: None)
    script = f"open({str(RunDir(cfg.run_dir).error_file(0))!r}, 'w').write('{{\"type\": \"Runt'); print('boom'); exit(3)"
    monkeypatch.setattr(launch, "build_command", lambda *a: [sys.executable, "-c", script])
    with pytest.raises(TrainingFailed, match="code 3: boom") as e:
        run_training(cfg, cfg.run_dir, tmp_path, on_line=lambda s: None)
    assert e.value.retryable is True


def test_terminal_progress_follows_metrics_across_a_resume(tmp_path):
    from core.launch import _MetricsProgress

    metrics = tmp_path / "metrics.jsonl"
    progress = _MetricsProgress(metrics, total=10)
    progress.tick()  # no file yet
    assert progress.bar.n == 0
    metrics.write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 1.5}\n{"step": 3, "lo')
    progress.tick()
    assert progress.bar.n == 2  # the torn third line is not read yet
    with metrics.open("a") as f:
        f.write('ss": 1.2}\n')
    progress.tick()
    assert progress.bar.n == 3
    metrics.write_text('{"step": 1, "loss": 2.0}\n')  # a restart rewrote the file shorter
    progress.tick()
    assert progress.bar.n == 1
    progress.close()


@pytest.mark.skipif(sys.platform != "linux", reason="PR_SET_PDEATHSIG and /proc are Linux")
def test_rank_whose_launcher_already_died_exits_before_importing_torch():
    """A rank checks that the supervisor core.launch named is its grandparent (supervisor -> torchrun
    -> rank); if not, its launcher died before the death signal was armed, and it must exit at once.

    Here this test process plays the launcher, so the true supervisor is this process's parent.
    Passing the check, the rank imports torch and then argparse exits 2 for the missing arguments.
    """
    import subprocess

    from core.launch import SUPERVISOR_PID_ENV

    def rank(supervisor: int) -> tuple[int, set[str], str]:
        env = {**os.environ, "WORLD_SIZE": "2", SUPERVISOR_PID_ENV: str(supervisor), "PYTHONPATH": str(REPO)}
        argv = [sys.executable, "-X", "importtime", "-m", "core.train"]
        p = subprocess.run(argv, env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
        imported = {
            ln.rsplit("|", 1)[1].strip() for ln in p.stderr.splitlines() if ln.startswith("import time:")
        }
        return p.returncode, imported, p.stderr

    code, imported, _ = rank(supervisor=os.getpid())  # not its grandparent: re-parented, launcher gone
    assert code == 1 and "torch" not in imported
    code, imported, err = rank(supervisor=os.getppid())
    assert code == 2 and "torch" in imported and "--run-dir" in err
