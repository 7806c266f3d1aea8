"""Deployments as the README describes them, against a real ``prefect server start`` and a process worker.

The headline test reads the README's deployment block ("Deploying") and runs its commands: ``deltatune
setup``, ``prefect deploy --all``, a worker on the cpu pool whose DELTATUNE_HOME is its own (the deploying
shell's points nowhere), and ``prefect deployment run 'finetune/demo'`` with tiny overrides. Two demo runs
share a GPU-slot limit of one slot, which the test holds until both wait for it: then one trains after the
other. Fast tests check the pull step, the GPU-slot errors and setup without a server.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import httpx
import pytest
import yaml

from tests.conftest import REPO

VENV_BIN = Path(sys.executable).parent
BLOCK_MARK = "<!-- deploy-steps:"


def readme_steps() -> list[str]:
    """The commands of the README's deployment block (comments dropped)."""
    text = (REPO / "README.md").read_text()
    after = text[text.index(BLOCK_MARK) :]
    block = re.search(r"```bash\n(.*?)```", after, re.S).group(1)
    steps = []
    for line in block.splitlines():
        cmd = line.split("  #")[0].strip()
        if cmd and not cmd.startswith("#"):
            steps.append(cmd)
    return steps


# --------------------------------------------------------------------------------------------------
# fast
# --------------------------------------------------------------------------------------------------


def test_pull_step_changes_into_the_workers_checkout(tmp_path, monkeypatch):
    from flows.deployments import DeploymentError, checkout

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("DELTATUNE_HOME", str(REPO))
    assert checkout() == {"directory": str(REPO)} and Path.cwd() == REPO
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("DELTATUNE_HOME", str(tmp_path))  # not a checkout
    with pytest.raises(DeploymentError, match="DELTATUNE_HOME"):
        checkout()
    assert Path.cwd() == tmp_path
    monkeypatch.delenv("DELTATUNE_HOME")  # the checkout deltatune is installed from
    assert checkout() == {"directory": str(REPO)}


def test_prefect_yaml_pull_step_is_resolved_on_the_worker():
    spec = yaml.safe_load((REPO / "deploy/prefect.yaml").read_text())
    assert spec["pull"] == [{"flows.deployments.checkout": {}}]
    assert "{{" not in json.dumps(spec)  # no template that `prefect deploy` would resolve on its machine
    names = {d["name"] for d in spec["deployments"]}
    assert {
        "demo",
        "llama3-8b-lora",
        "llama3-8b-lora-nightly",
        "llama3-8b-rank-sweep",
        "promote-production",
    } <= names
    for d in spec["deployments"]:
        env = d["work_pool"]["job_variables"]["env"]
        assert int(env["PREFECT_FLOWS_HEARTBEAT_FREQUENCY"]) >= 30  # Prefect's minimum


def test_gpu_slots_missing_or_too_small_limit_says_what_to_do(prefect_harness):
    from prefect import get_client
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate

    from core.config import load_config
    from tasks._slots import GpuSlotsError, gpu_slots

    cfg = load_config(overrides=["train.gpu_slots_limit=no-such-limit"])
    with pytest.raises(GpuSlotsError, match=r"no-such-limit.*deltatune setup --gpus"):
        with gpu_slots(cfg):
            pytest.fail("the block ran without its slots")
    with get_client(sync_client=True) as client:
        client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name="one-gpu", limit=1))
    two = load_config(overrides=["train.gpu_slots_limit=one-gpu", "train.num_processes=2"])
    with pytest.raises(GpuSlotsError, match=r"takes 2 GPU slot.*has 1"):
        with gpu_slots(two):
            pytest.fail("the block ran without its slots")
    ran = []
    with gpu_slots(load_config(overrides=["train.gpu_slots_limit=one-gpu"])):
        ran.append(True)
    with gpu_slots(load_config()):  # off by default: no limit needed
        ran.append(True)
    assert ran == [True, True]


def test_setup_without_a_server_says_how_to_start_one(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    env["PREFECT_HOME"] = str(tmp_path)
    out = subprocess.run(
        [str(VENV_BIN / "deltatune"), "setup", "--gpus", "1"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 1, out.stderr
    assert "PREFECT_API_URL is not set" in out.stderr and "prefect server start" in out.stderr


# --------------------------------------------------------------------------------------------------
# the README's deployment steps on a real server and worker
# --------------------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Stack:
    """A Prefect server on loopback and the processes started against it; every one killed as a group."""

    def __init__(self, tmp: Path):
        self.tmp, self.procs = tmp, []
        port = _free_port()
        self.api = f"http://127.0.0.1:{port}/api"
        self.env = {
            **os.environ,
            "PATH": f"{VENV_BIN}{os.pathsep}{os.environ['PATH']}",
            "PREFECT_HOME": str(tmp / "prefect-home"),
            "PREFECT_API_URL": self.api,
            "PREFECT_LOGGING_LEVEL": "INFO",
            "PREFECT_WORKER_QUERY_SECONDS": "2",
            "PREFECT_WORKER_PREFETCH_SECONDS": "2",
            "DELTATUNE_HOME": str(tmp / "deployer-has-no-checkout-here"),
        }
        server_env = {k: v for k, v in self.env.items() if k != "PREFECT_API_URL"}
        self.start(
            ["prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)],
            "server",
            env=server_env,
        )
        self.http = httpx.Client(base_url=self.api, timeout=30)
        deadline = time.monotonic() + 120
        while True:
            try:
                if self.http.get("/health").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, self.log("server")
            time.sleep(0.5)

    def start(self, argv: list[str] | str, name: str, **kw) -> subprocess.Popen:
        log = open(self.tmp / f"{name}.log", "w")  # a file, not a pipe: nothing blocks on a full pipe
        kw.setdefault("env", self.env)
        kw.setdefault("cwd", REPO)
        p = subprocess.Popen(
            argv,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            shell=isinstance(argv, str),
            **kw,
        )
        self.procs.append(p)
        return p

    def sh(self, cmd: str, **kw) -> subprocess.CompletedProcess:
        kw.setdefault("env", self.env)
        return subprocess.run(
            cmd, shell=True, cwd=kw.pop("cwd", REPO), capture_output=True, text=True, timeout=300, **kw
        )

    def log(self, name: str) -> str:
        return (self.tmp / f"{name}.log").read_text()[-4000:]

    def close(self) -> None:
        for p in reversed(self.procs):
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGTERM)
        for p in reversed(self.procs):
            try:
                p.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait(timeout=15)
        self.http.close()

    # --- reading the API ---------------------------------------------------------------------------
    def get(self, path: str) -> dict:
        r = self.http.get(path)
        r.raise_for_status()
        return r.json()

    def post(self, path: str, body: dict) -> dict | list | None:
        r = self.http.post(path, json=body)
        r.raise_for_status()
        return r.json() if r.content else None

    def flow_run(self, run_id: str) -> dict:
        return self.get(f"/flow_runs/{run_id}")

    def task_runs(self, run_id: str) -> list[dict]:
        return self.post("/task_runs/filter", {"flow_runs": {"id": {"any_": [run_id]}}})

    def wait(self, what, timeout: float, message) -> None:
        deadline = time.monotonic() + timeout
        while not what():
            assert time.monotonic() < deadline, message()
            time.sleep(1)


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    s = Stack(tmp_path_factory.mktemp("deploy"))
    try:
        yield s
    finally:
        s.close()


def _trigger(stack: Stack, readme_cmd: str, overrides: list[str]) -> subprocess.CompletedProcess:
    """The README's `prefect deployment run` command with its overrides and then ``overrides``."""
    argv = shlex.split(readme_cmd)
    i = next(i for i, a in enumerate(argv) if a.startswith("overrides="))
    argv[i] = "overrides=" + json.dumps(json.loads(argv[i].partition("=")[2]) + overrides)
    return stack.sh(shlex.join(argv))


def _when(run: dict, key: str) -> datetime:
    return datetime.fromisoformat(run[key].replace("Z", "+00:00"))


def _run_id(out: subprocess.CompletedProcess) -> str:
    assert out.returncode == 0, out.stdout + out.stderr
    return re.search(r"UUID: ([0-9a-f-]{36})", out.stdout).group(1)


@pytest.mark.slow
def test_readme_deployment_steps_run_the_demo_on_a_worker(stack):
    from core.tiny import resolve_model_path

    steps = readme_steps()
    kinds = ["deltatune setup", "prefect deploy", "prefect worker start", "prefect deployment run"]
    assert [max((k for k in kinds if s.startswith(k)), key=len) for s in steps] == kinds, steps
    setup_cmd, deploy_cmd, worker_cmd, run_cmd = steps
    spec = yaml.safe_load((REPO / "deploy/prefect.yaml").read_text())
    resolve_model_path("builtin:tiny-llama")  # build it once here, not in two flow runs at the same time

    # 1. setup, twice (idempotent), then deploy --all from the deploying shell.
    for _ in range(2):
        out = stack.sh(setup_cmd)
        assert out.returncode == 0, out.stdout + out.stderr
    assert json.loads(out.stdout)["concurrency_limits"] == {"gpu-slots": "exists (8 slots)"}
    for pool in ("cpu-local", "gpu-cluster"):
        assert stack.get(f"/work_pools/{pool}")["type"] == "process"
    [zombie] = [
        a for a in stack.post("/automations/filter", {}) if a["name"].startswith("deltatune: crash flow runs")
    ]
    assert zombie["trigger"]["posture"] == "Proactive"
    assert zombie["trigger"]["after"] == ["prefect.flow-run.heartbeat"]
    assert zombie["trigger"]["within"] == 90 and zombie["actions"][0]["state"] == "CRASHED"
    out = stack.sh(deploy_cmd)
    assert out.returncode == 0, out.stdout + out.stderr

    demo = stack.get("/deployments/name/finetune/demo")
    assert demo["pull_steps"] == [{"flows.deployments.checkout": {}}]  # nothing of the deploying shell
    assert demo["job_variables"]["env"]["PREFECT_FLOWS_HEARTBEAT_FREQUENCY"] == "30"
    nightly = stack.get("/deployments/name/finetune/llama3-8b-lora-nightly")
    [want] = next(d for d in spec["deployments"] if d["name"] == "llama3-8b-lora-nightly")["schedules"]
    [have] = nightly["schedules"]
    assert have["active"] and have["schedule"]["cron"] == want["cron"] == "0 2 * * *"
    assert have["schedule"]["timezone"] == want["timezone"] == "Europe/Berlin"
    assert nightly["parameters"]["overrides"] == ["name=llama3-8b-support-lora-nightly"]
    assert stack.get("/deployments/name/promote/promote-production")["work_pool_name"] == "cpu-local"
    sweep = stack.get("/deployments/name/sweep/llama3-8b-rank-sweep")
    assert sweep["work_pool_name"] == "gpu-cluster" and sweep["parameters"]["publish"] == "best"

    # 2. A bad parameter type is refused by the server: no flow run is created.
    before = len(stack.post("/flow_runs/filter", {"deployments": {"id": {"any_": [demo["id"]]}}}))
    bad = stack.sh(
        shlex.join(["prefect", "deployment", "run", "finetune/demo", "--param", 'overrides="a=1"'])
    )
    assert bad.returncode != 0 and "overrides" in bad.stdout + bad.stderr
    assert len(stack.post("/flow_runs/filter", {"deployments": {"id": {"any_": [demo["id"]]}}})) == before

    # 3. The worker, with its own DELTATUNE_HOME, run from a directory of its own.
    workdir = stack.tmp / "worker"
    workdir.mkdir()
    stack.start(worker_cmd, "worker", cwd=workdir, env={**stack.env, "DELTATUNE_HOME": str(REPO)})

    # 4. Two demo runs on one GPU-slot limit of 1 slot, which the test holds until both wait for it.
    limit = "deltatune-test-slots"
    stack.post("/v2/concurrency_limits/", {"name": limit, "limit": 1})
    lease = stack.post(
        "/v2/concurrency_limits/increment-with-lease",
        {"names": [limit], "slots": 1, "mode": "concurrency", "lease_duration": 900},
    )["lease_id"]
    tmp = stack.tmp
    tiny = [
        "train.max_steps=4",
        "train.save_every=0",
        "eval.generation_rows=4",
        "eval.max_new_tokens=4",
        f"output_dir={tmp / 'runs'}",
        f"publish.store={tmp / 'artifacts'}",
        f"cache.storage={tmp / 'results'}",
        f"train.gpu_slots_limit={limit}",
    ]
    # The second run publishes its adapter alone: evaluating and merging twice would prove nothing more.
    second = ["eval.enabled=false", "merge.enabled=false"]
    runs = [
        _run_id(_trigger(stack, run_cmd, [*tiny, "name=demo-1", "train.seed=1"])),
        _run_id(_trigger(stack, run_cmd, [*tiny, "name=demo-2", "train.seed=2", *second])),
    ]
    # An override without '=' is refused by the parameter schema when the run is created; a well-formed
    # one naming an unknown field fails the flow run before any task runs.
    no_eq = _trigger(stack, run_cmd, ["train.lr"])
    assert no_eq.returncode != 0 and "train.lr" in no_eq.stdout + no_eq.stderr, no_eq.stdout
    unknown_id = _run_id(_trigger(stack, run_cmd, ["train.no_such_field=1"]))

    def names(run_id):
        return {t["name"].split("-")[0]: t for t in stack.task_runs(run_id)}

    def prepared():
        return all(names(r).get("prepare", {}).get("state_type") == "COMPLETED" for r in runs)

    def holding(run_id):
        """When the run's train stage got its slot (its log line), or None."""
        logs = stack.post("/logs/filter", {"logs": {"flow_run_id": {"any_": [run_id]}}})
        at = [_when(x, "timestamp") for x in logs if "holding 1 GPU slot" in x["message"]]
        return at[0] if at else None

    stack.wait(prepared, 600, lambda: f"runs not prepared: {stack.log('worker')}")
    time.sleep(5)
    for r, name in zip(
        runs, ("demo-1", "demo-2"), strict=True
    ):  # both wait inside the train stage for the slot
        assert stack.flow_run(r)["state_type"] == "RUNNING"
        assert holding(r) is None and not (tmp / "runs" / name / "metrics.jsonl").exists(), names(r)
    stack.post("/v2/concurrency_limits/decrement-with-lease", {"lease_id": lease})

    def done():
        return all(stack.flow_run(r)["state_type"] in ("COMPLETED", "FAILED", "CRASHED") for r in runs)

    stack.wait(done, 600, lambda: f"runs not finished: {stack.log('worker')}")
    for r in runs:
        assert stack.flow_run(r)["state_type"] == "COMPLETED", stack.log("worker")
    # Each training span: from taking the slot to its train_summary.json (written before the release).
    spans = sorted(
        (
            holding(r),
            datetime.fromtimestamp((tmp / "runs" / n / "train_summary.json").stat().st_mtime, timezone.utc),
        )
        for r, n in zip(runs, ("demo-1", "demo-2"), strict=True)
    )
    assert spans[1][0] >= spans[0][1], spans  # the second training started after the first one ended

    versions = sorted((tmp / "artifacts" / "tiny-llama-word-kinds" / "versions").glob("v*/manifest.json"))
    assert len(versions) == 2, versions
    assert {json.loads(v.read_text())["metadata"]["lineage"]["flow_run_id"] for v in versions} == set(runs)

    stack.wait(
        lambda: stack.flow_run(unknown_id)["state_type"] in ("FAILED", "CRASHED", "COMPLETED"),
        120,
        lambda: stack.log("worker"),
    )
    assert stack.flow_run(unknown_id)["state_type"] == "FAILED"
    assert stack.task_runs(unknown_id) == []  # nothing ran

    # 5. deltatune serve: refuses names a worker deployment holds; serves the nightly schedule itself
    # once that deployment is gone, and stopping it leaves the schedule active (pause_on_shutdown=False).
    out = stack.sh("deltatune serve llama3-8b-lora-nightly")
    assert out.returncode == 1 and "prefect deployment delete" in out.stderr, out.stderr
    stack.http.delete(f"/deployments/{nightly['id']}").raise_for_status()
    serving = stack.start("deltatune serve llama3-8b-lora-nightly", "serve")

    def served():
        r = stack.http.get("/deployments/name/finetune/llama3-8b-lora-nightly")
        return r.status_code == 200 and r.json()["path"] and r.json()["schedules"]

    stack.wait(served, 180, lambda: stack.log("serve"))
    os.killpg(serving.pid, signal.SIGINT)  # a graceful stop: where Prefect would pause the schedules
    serving.wait(timeout=60)
    again = stack.get("/deployments/name/finetune/llama3-8b-lora-nightly")
    assert again["work_pool_name"] is None and not again["paused"]
    assert [s["schedule"]["cron"] for s in again["schedules"] if s["active"]] == ["0 2 * * *"]


_SLEEPER = """
import time
from prefect import flow

@flow(name="deltatune-test-sleeper")
def sleeper():
    time.sleep(900)

sleeper()
"""


@pytest.mark.slow
def test_a_flow_run_whose_process_died_is_marked_crashed(stack, tmp_path):
    """The zombie automation at work: a flow run that sent a heartbeat and was then SIGKILLed with its
    process group (as when its worker's machine dies) is marked Crashed once the timeout passes."""
    out = stack.sh("deltatune setup --gpus 8 --heartbeat-timeout 35")  # setup again: the change applied
    assert out.returncode == 0 and json.loads(out.stdout)["automation"].startswith(("created", "updated")), (
        out.stderr
    )
    script = tmp_path / "sleeper.py"
    script.write_text(_SLEEPER)
    proc = stack.start(
        [sys.executable, str(script)], "sleeper", env={**stack.env, "PREFECT_FLOWS_HEARTBEAT_FREQUENCY": "30"}
    )
    runs = {"flows": {"name": {"any_": ["deltatune-test-sleeper"]}}}

    def running():
        return [r for r in stack.post("/flow_runs/filter", runs) if r["state_type"] == "RUNNING"]

    stack.wait(running, 180, lambda: stack.log("sleeper"))
    [run] = running()
    beats = {
        "filter": {
            "event": {"name": ["prefect.flow-run.heartbeat"]},
            "resource": {"id": [f"prefect.flow-run.{run['id']}"]},
        },
        "limit": 5,
    }
    stack.wait(lambda: stack.post("/events/filter", beats)["events"], 60, lambda: stack.log("sleeper"))
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    assert stack.flow_run(run["id"])["state_type"] == "RUNNING"  # nobody told the server
    stack.wait(
        lambda: stack.flow_run(run["id"])["state_type"] == "CRASHED", 150, lambda: stack.flow_run(run["id"])
    )
    assert "no heartbeat" in stack.flow_run(run["id"])["state"]["message"]
