"""Launch the train stage: pre-flight checks, the launcher argv (no shell), and a supervised subprocess.

    argv = build_command(cfg, run_dir, train_data)   # python -m torch.distributed.run ... -m core.train ...
    run_training(cfg, run_dir, train_data, on_line=print)

The launcher runs in its own process group and is killed as a group on timeout, cancellation or
error; ranks also die with their parent (PR_SET_PDEATHSIG), so no rank outlives its supervisor. A start-up
that makes no progress for ``train.startup_timeout_s`` fails naming the phase it waits in (core.startup);
neither that nor ``train.timeout_s`` is retried.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path

import torch

from core import checkpoint as ckpt
from core.config import RunConfig
from core.errors import DeltatuneError
from core.fsutil import read_json
from core.process import SUPERVISOR_PID_ENV, set_pdeathsig
from core.run import PREPARE_REPORT, RunDir, data_fingerprint, training_fingerprint
from core.schedule import total_steps
from core.startup import StartupWatchdog, clear, node_ranks

log = logging.getLogger(__name__)


class PreflightError(DeltatuneError, ValueError):
    """The run cannot start as configured; nothing was launched. Retrying will not help."""

    retryable = False


class TrainingTimeout(DeltatuneError, TimeoutError):
    """The launch ran past ``train.timeout_s`` and was killed. Not retried: with ``train.retries: 2`` a
    retried timeout would triple the budget the config sets. A new flow run resumes from the newest
    complete checkpoint, so raising ``timeout_s`` and running again loses at most ``save_every`` steps."""

    retryable = False


class TrainingFailed(DeltatuneError, RuntimeError):
    """The training process exited non-zero; ``retryable`` is the verdict the failing rank recorded
    (``core.errors.is_retryable`` of its exception), or True for a rank that died without one."""

    def __init__(self, message: str, *, retryable: bool):
        super().__init__(message, retryable=retryable)


def _read_errors(rd: RunDir) -> dict:
    """The failure to report: the first rank's that a retry cannot fix, else rank 0's, else none.

    A rank that fails for good (out of memory, bad data) often leaves rank 0 with only the broken
    collective it was waiting in, which on its own looks retryable.
    """
    found = [e for e in map(rd.read_json, rd.error_files()) if isinstance(e, dict)]  # torn: the log tells
    final = [e for e in found if e.get("retryable") is False]
    return (final or found or [{}])[0]


def node_rank(cfg: RunConfig) -> int:
    """This node's rank: ``train.node_rank`` or ``NODE_RANK`` as cluster schedulers set it."""
    return cfg.train.node_rank if cfg.train.node_rank is not None else int(os.environ.get("NODE_RANK", 0))


def resolve_launcher(cfg: RunConfig) -> str:
    """``auto``: one LoRA/QLoRA process runs as a plain subprocess; anything else under torchrun."""
    if cfg.train.launcher != "auto":
        return cfg.train.launcher
    return "python" if cfg.world_size == 1 and cfg.method != "full" else "torchrun"


def device_count() -> tuple[str, int]:
    """('cuda', GPUs) on a GPU box, else ('cpu', cores): one rank per device at most."""
    if torch.cuda.is_available():
        return "cuda", torch.cuda.device_count()
    return "cpu", os.cpu_count() or 1


def preflight(cfg: RunConfig, run_dir: str | Path, train_data: str | Path | None = None) -> None:
    """Every check that can fail before launch, reported together.

    Raises:
        PreflightError: unsupported combination, missing DeepSpeed config, more processes per node
            than devices, bitsandbytes missing for QLoRA, or a checkpoint from another configuration.
    """
    problems: list[str] = []
    t = cfg.train
    if t.deepspeed_config and not Path(t.deepspeed_config).is_file():
        problems.append(f"train.deepspeed_config={t.deepspeed_config} does not exist (see deploy/deepspeed/)")
    if t.deepspeed_config and Path(t.deepspeed_config).is_file():
        ds = read_json(t.deepspeed_config)
        if cfg.method == "qlora" and ds.get("zero_optimization", {}).get("stage") == 3:
            problems.append(
                f"{t.deepspeed_config} uses ZeRO-3, which cannot shard 4-bit weights; use stage 0-2"
            )
    kind, n = device_count()
    if t.num_processes > n:
        problems.append(
            f"train.num_processes={t.num_processes} but this node has {n} {kind} device(s); "
            f"use at most {n} processes per node"
        )
    if cfg.method == "qlora":
        try:
            import bitsandbytes  # noqa: F401
        except ImportError:
            problems.append("method 'qlora' needs bitsandbytes: pip install bitsandbytes")
    if resolve_launcher(cfg) == "inprocess" and cfg.method == "full":
        problems.append(
            "train.launcher='inprocess' cannot run method 'full' (DeepSpeed); use auto or torchrun"
        )
    try:
        rd = RunDir(run_dir)
        data = data_fingerprint(train_data) if train_data is not None else None
        fingerprint = training_fingerprint(cfg)
        finished = rd.read_json(rd.summary)
        if isinstance(finished, dict):  # a finished run's checkpoints do not hold a new config or data back
            if (finished.get("fingerprint"), finished.get("data_fingerprint")) != (fingerprint, data):
                ckpt.discard_finished(rd.checkpoints, finished)
        ckpt.latest_complete(rd.checkpoints, fingerprint, data)
    except ckpt.CheckpointMismatchError as e:
        problems.append(str(e))
    if problems:
        raise PreflightError("cannot start training:\n" + "\n".join(f"  - {p}" for p in problems))


def build_command(cfg: RunConfig, run_dir: str | Path, train_data: str | Path) -> list[str]:
    """The launcher argv for this node. Multi-node fields come from the config or the environment
    (``NODE_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``) as a cluster scheduler sets them."""
    t = cfg.train
    script = ["-m", "core.train", "--run-dir", str(run_dir), "--train-data", str(train_data)]
    launcher = resolve_launcher(cfg)
    if launcher in ("python", "inprocess"):
        return [sys.executable, *script]
    rank = node_rank(cfg)
    addr = t.master_addr or os.environ.get("MASTER_ADDR")
    port = t.master_port or int(os.environ.get("MASTER_PORT", 29500))
    if launcher == "deepspeed":
        argv = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(t.num_processes)]
        if t.hostfile:
            argv += ["--hostfile", t.hostfile]
        if t.num_nodes > 1:
            if not addr:
                raise PreflightError(
                    "multi-node needs train.master_addr or MASTER_ADDR (the rank-0 node's address)"
                )
            argv += ["--num_nodes", str(t.num_nodes), "--master_addr", addr, "--master_port", str(port)]
            if not t.hostfile:  # each node started by the scheduler, no ssh fan-out
                argv += ["--no_ssh", "--node_rank", str(rank)]
        else:
            argv += ["--master_port", str(port)] if t.master_port else []
        return [*argv, "--module", "core.train", *script[2:]]
    # torchrun
    argv = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(t.num_processes)]
    if t.num_nodes == 1:
        argv += ["--standalone"]
    else:
        if not addr:
            raise PreflightError(
                "multi-node needs train.master_addr or MASTER_ADDR (the rank-0 node's address)"
            )
        argv += [
            "--nnodes",
            str(t.num_nodes),
            "--node_rank",
            str(rank),
            "--master_addr",
            addr,
            "--master_port",
            str(port),
        ]
    return [*argv, *script]


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def kill_group(proc: subprocess.Popen, grace_s: float = 10.0) -> None:
    """SIGTERM the process group, then SIGKILL whatever is left after ``grace_s``."""
    pgid = proc.pid  # start_new_session: the leader's pid is the group id
    for sig, wait in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 5.0)):
        proc.poll()  # reap the leader so a zombie does not count as alive
        if not _group_alive(pgid):
            return
        try:
            os.killpg(pgid, sig)
        except ProcessLookupError:
            return
        end = time.monotonic() + wait
        while time.monotonic() < end:
            proc.poll()
            if not _group_alive(pgid):
                return
            time.sleep(0.1)


def run_supervised(
    argv: list[str],
    *,
    on_line: Callable[[str], None],
    env: dict[str, str] | None = None,
    cwd: str | Path | None = None,
    timeout_s: float | None = None,
    tail: int = 40,
    on_tick: Callable[[], None] | None = None,
    check: Callable[[], None] | None = None,
) -> tuple[int, list[str]]:
    """Run ``argv`` in its own process group, streaming each output line to ``on_line``.

    ``on_tick`` is called about 5 times a second while the process runs (e.g. to draw progress; its
    errors are ignored); so is ``check``, whose exception (a watchdog's) stops the run. Returns (exit
    code, last ``tail`` lines). Any exception here (``TrainingTimeout`` past ``timeout_s``, ``check``'s,
    KeyboardInterrupt, a cancelled task) kills the whole group before it propagates.
    """
    proc = subprocess.Popen(
        argv,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        text=True,
        encoding="utf-8",
        errors="replace",  # one stray byte in a rank's output must not kill the run
        bufsize=1,
        env=env,
        cwd=cwd,
        start_new_session=True,
        preexec_fn=set_pdeathsig,
    )
    last: deque[str] = deque(maxlen=tail)
    failed: list[BaseException] = []  # an exception from on_line, raised in the supervising thread

    def pump() -> None:
        assert proc.stdout is not None
        try:
            for line in proc.stdout:
                line = line.rstrip("\n")
                last.append(line)
                on_line(line)
        except BaseException as e:
            failed.append(e)

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    try:
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while proc.poll() is None:
            if failed:
                raise failed[0]
            if deadline is not None and time.monotonic() > deadline:
                raise TrainingTimeout(
                    f"training exceeded train.timeout_s={timeout_s:g}s; killed its process group. Not "
                    "retried: raise train.timeout_s and run again (it resumes from the newest checkpoint)"
                )
            if check is not None:
                check()
            if on_tick is not None:
                try:
                    on_tick()
                except Exception as exc:  # drawing progress must never stop training
                    log.debug("progress display failed: %s", exc)
                    on_tick = None
            time.sleep(0.2)
        kill_group(proc, grace_s=0)  # the leader exited: no straggler may hold the pipe open
        reader.join(timeout=30)  # every buffered line reaches on_line before we return
        if failed:
            raise failed[0]
    except BaseException:
        kill_group(proc)
        raise
    finally:
        reader.join(timeout=5)
        if not reader.is_alive():  # else the reader still owns the pipe; the daemon thread ends with it
            proc.stdout.close()
    return proc.returncode, list(last)


class _MetricsProgress:
    """A terminal progress bar for a training subprocess, fed by the metrics.jsonl it appends to
    (the ranks have no terminal of their own: their output is piped into the run log)."""

    def __init__(self, path: Path, total: int, initial: int = 0):
        from tqdm import tqdm

        self.path, self.offset = path, 0
        self.bar = tqdm(total=total, initial=initial, desc="train", unit="step", dynamic_ncols=True)

    @classmethod
    def for_run(cls, cfg: RunConfig, rd: RunDir, train_data: str | Path) -> _MetricsProgress | None:
        report = Path(train_data).parent / PREPARE_REPORT
        if not report.is_file():
            return None
        try:
            total = total_steps(cfg, read_json(report)["train"])
        except ValueError:  # too few rows (or a torn report): the training process reports that itself
            return None
        return cls(rd.metrics, total)

    def tick(self) -> None:
        try:
            if self.path.stat().st_size < self.offset:  # rewritten on resume: start over
                self.offset = 0
            with self.path.open() as f:
                f.seek(self.offset)
                chunk = f.read()
        except FileNotFoundError:
            return
        done = chunk[: chunk.rfind("\n") + 1]  # whole lines only
        self.offset += len(done)
        for line in done.splitlines():
            rec = json.loads(line)
            self.bar.n = rec["step"]
            self.bar.set_postfix(loss=f"{rec['loss']:.4f}", refresh=False)
        if done:
            self.bar.refresh()

    def close(self) -> None:
        self.bar.close()


def startup_watchdog(cfg: RunConfig, rd: RunDir) -> StartupWatchdog | None:
    """The start-up watchdog of this node's ranks (None with ``train.startup_timeout_s: null``), after
    removing their markers of an earlier attempt."""
    launcher = resolve_launcher(cfg)
    nproc = 1 if launcher == "python" else cfg.train.num_processes
    ranks = node_ranks(node_rank(cfg), nproc)
    clear(rd, ranks)
    if cfg.train.startup_timeout_s is None:
        return None
    before, hint = f"starting the rank process{'es' if nproc > 1 else ''} (importing torch)", None
    if cfg.train.num_nodes > 1:
        addr = cfg.train.master_addr or os.environ.get("MASTER_ADDR")
        port = cfg.train.master_port or int(os.environ.get("MASTER_PORT", 29500))
        before = (
            f"{launcher}'s rendezvous of {cfg.train.num_nodes} nodes at {addr}:{port}: no rank of this node "
            f"(node {node_rank(cfg)}) has started, so not every node has joined yet"
        )
        hint = (
            "every node must run the flow with the same train.num_nodes, master_addr and master_port, and "
            "the master port must be reachable from every node"
        )
    return StartupWatchdog(rd, ranks, cfg.train.startup_timeout_s, before, before_hint=hint)


def run_training(
    cfg: RunConfig, run_dir: str | Path, train_data: str | Path, *, on_line: Callable[[str], None] = print
) -> dict:
    """Pre-flight, launch, supervise; return ``train_summary.json`` as a dict.

    Raises:
        PreflightError: nothing was launched (not retryable).
        core.startup.StartupTimeout: a start-up phase made no progress for ``train.startup_timeout_s`` (not retryable).
        TrainingTimeout: the launch ran past ``train.timeout_s`` (not retryable).
        TrainingFailed: the process failed; ``retryable`` says whether a retry (which resumes) may help.
    """
    run_dir, rd = Path(run_dir), RunDir(run_dir)
    preflight(cfg, run_dir, train_data)
    if resolve_launcher(cfg) == "inprocess":
        # Only this launcher runs training in the supervising process: a supervisor of a subprocess
        # never loads the training stack (datasets, transformers, the model code).
        from core.train import train

        return train(cfg, run_dir, train_data).summary
    argv = build_command(cfg, run_dir, train_data)
    log.info("launching: %s", " ".join(argv))
    for stale in rd.error_files():
        stale.unlink()
    watchdog = startup_watchdog(cfg, rd)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    root = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    env.pop(SUPERVISOR_PID_ENV, None)
    # torchrun's ranks are its own children (the deepspeed launcher's are not): see core.train's top.
    if resolve_launcher(cfg) == "torchrun":
        env[SUPERVISOR_PID_ENV] = str(os.getpid())
    progress = _MetricsProgress.for_run(cfg, rd, train_data) if sys.stderr.isatty() else None
    try:
        rc, tail = run_supervised(
            argv,
            on_line=on_line,
            env=env,
            timeout_s=cfg.train.timeout_s,
            on_tick=progress and progress.tick,
            check=watchdog,
        )
    finally:
        if progress is not None:
            progress.close()
    if rc != 0:
        info = _read_errors(rd)
        detail = f"{info['type']}: {info['message']}" if info else "\n".join(tail[-15:])
        raise TrainingFailed(
            f"training exited with code {rc}: {detail}", retryable=info.get("retryable", True)
        )
    if node_rank(cfg) != 0 and not rd.summary.is_file():  # rank 0 writes it, on node 0's disk
        return {"method": cfg.method, "node_rank": node_rank(cfg), "output_dir": None}
    return read_json(rd.summary)
