"""Deployments on a Prefect server: the one setup command, serving from one process, the worker's pull
step, and the GPU slots the train stage holds.

deltatune setup --gpus 8          # work pools of deploy/prefect.yaml, the GPU-slot limit, the zombie automation
deltatune serve                   # every deployment of deploy/prefect.yaml, schedules too, from this process

``setup`` is idempotent: what exists and matches is left alone, a changed ``--gpus`` or template is applied.
Both need a running server (``prefect server start``; ``PREFECT_API_URL`` pointing at it): Prefect's
ephemeral API runs no scheduler and forgets its pools when the process ends.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from datetime import timedelta
from pathlib import Path
from typing import Any

import yaml

from core.config import ConfigError, load_config
from core.errors import DeltatuneError

CHECKOUT = Path(__file__).resolve().parents[1]  # the checkout this package was imported from
PREFECT_FILE = CHECKOUT / "deploy" / "prefect.yaml"
DEFAULT_GPU_LIMIT = "gpu-slots"
ZOMBIE_AUTOMATION = "deltatune: crash flow runs whose heartbeats stopped"
VERBS = ("setup", "serve")


class DeploymentError(DeltatuneError):
    """The Prefect side of a deployment is missing or wrong (a pool, a limit, a checkout); not retried."""


# ------------------------------------------------------------------------------------------------------
# The pull step (deploy/prefect.yaml), run by every flow run a worker starts
# ------------------------------------------------------------------------------------------------------


def _is_checkout(path: Path) -> bool:
    return (path / "flows" / "finetune.py").is_file() and (path / "deploy" / "prefect.yaml").is_file()


def checkout(directory: str | None = None) -> dict[str, str]:
    """Change into the worker's deltatune checkout and return it as ``{"directory": ...}``.

    A pull step of our own because Prefect resolves ``{{ $VAR }}`` in pull steps when ``prefect deploy``
    runs, on the deploying machine (measured with Prefect 3.9.1: the deployment stored that machine's
    path). This reads, at run time on the worker: ``directory`` if given, else ``$DELTATUNE_HOME``, else
    the checkout the installed deltatune package was imported from (``pip install -e``, .ci/in-venv).

    Raises:
        DeploymentError: the directory is not a deltatune checkout.
    """
    chosen = directory or os.environ.get("DELTATUNE_HOME") or str(CHECKOUT)
    where = "directory" if directory else "DELTATUNE_HOME" if os.environ.get("DELTATUNE_HOME") else "install"
    path = Path(chosen).expanduser().resolve()
    if not _is_checkout(path):
        raise DeploymentError(
            f"the deployment's pull step found no deltatune checkout at {path} (from {where}): on this "
            "worker, export DELTATUNE_HOME=/path/to/deltatune (a checkout installed with `bash .ci/in-venv "
            "true`, holding flows/finetune.py and deploy/prefect.yaml) and restart the worker"
        )
    os.chdir(path)
    return {"directory": str(path)}


# ------------------------------------------------------------------------------------------------------
# deploy/prefect.yaml
# ------------------------------------------------------------------------------------------------------


def load_spec(path: str | Path = PREFECT_FILE) -> dict[str, Any]:
    """deploy/prefect.yaml as a dict (its anchors resolved)."""
    with open(path) as f:
        return yaml.safe_load(f)


def work_pools(spec: dict[str, Any]) -> list[str]:
    """Every work pool a deployment of ``spec`` names, in order of first use."""
    names: list[str] = []
    for d in spec.get("deployments") or []:
        name = (d.get("work_pool") or {}).get("name")
        if name and name not in names:
            names.append(name)
    return names


def gpu_limits(spec: dict[str, Any]) -> dict[str, int]:
    """The GPU-slot limits the finetune and sweep deployments use: limit name -> the most slots one
    training run takes (a sweep's variants are finetune runs of its config)."""
    out: dict[str, int] = {}
    for d in spec.get("deployments") or []:
        params = d.get("parameters") or {}
        training = d.get("entrypoint", "").startswith(("flows/finetune.py", "flows/sweep.py"))
        if not training or not params.get("config"):
            continue
        cfg = load_config(str(CHECKOUT / params["config"]), params.get("overrides") or [])
        if name := cfg.train.gpu_slots_limit:
            out[name] = max(out.get(name, 0), cfg.train.num_processes)
    return out


def heartbeat_env(spec: dict[str, Any]) -> dict[str, str]:
    """The environment deploy/prefect.yaml gives the flow runs (the heartbeat frequency)."""
    env = ((spec.get("definitions") or {}).get("job_variables") or {}).get("env") or {}
    return {k: str(v) for k, v in env.items()}


# ------------------------------------------------------------------------------------------------------
# deltatune setup
# ------------------------------------------------------------------------------------------------------


def _require_server() -> str:
    from prefect.settings import get_current_settings

    url = get_current_settings().api.url
    if not url:
        raise DeploymentError(
            "PREFECT_API_URL is not set: this configures a Prefect server, and Prefect's ephemeral API "
            "keeps nothing and schedules nothing; start one (`prefect server start`) and export "
            "PREFECT_API_URL=http://HOST:4200/api (or `prefect config set PREFECT_API_URL=...`)"
        )
    return url


def _count_gpus() -> int | None:
    if not shutil.which("nvidia-smi"):
        return None
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=30, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    return sum(1 for line in out.stdout.splitlines() if line.startswith("GPU "))


def zombie_automation(heartbeat_timeout_s: float):
    """Prefect's documented zombie-flow automation (docs: "detect zombie flows"): a flow run that sent
    a heartbeat and then, within ``heartbeat_timeout_s``, neither another nor a terminal state, is
    marked Crashed (its slots' leases expire on their own)."""
    from prefect.client.schemas.objects import StateType
    from prefect.events.actions import ChangeFlowRunState
    from prefect.events.schemas.automations import AutomationCore, EventTrigger, Posture
    from prefect.events.schemas.events import ResourceSpecification

    return AutomationCore(
        name=ZOMBIE_AUTOMATION,
        description="Created by `deltatune setup`: a flow run that stopped sending heartbeats (its worker "
        "or machine died) is marked Crashed instead of staying Running forever.",
        trigger=EventTrigger(
            after={"prefect.flow-run.heartbeat"},
            expect={
                "prefect.flow-run.heartbeat",
                "prefect.flow-run.Completed",
                "prefect.flow-run.Failed",
                "prefect.flow-run.Cancelled",
                "prefect.flow-run.Crashed",
            },
            match=ResourceSpecification({"prefect.resource.id": ["prefect.flow-run.*"]}),
            for_each={"prefect.resource.id"},
            posture=Posture.Proactive,
            threshold=1,
            within=timedelta(seconds=heartbeat_timeout_s),
        ),
        actions=[
            ChangeFlowRunState(
                state=StateType.CRASHED,
                message=f"no heartbeat for {heartbeat_timeout_s:g} s: its worker or machine died "
                "(automation created by `deltatune setup`)",
            )
        ],
    )


def setup(
    gpus: int | None = None,
    *,
    prefect_file: str | Path = PREFECT_FILE,
    base_job_template: str | Path | None = None,
    gpu_pool_type: str = "process",
    heartbeat_timeout_s: float = 90.0,
) -> dict[str, Any]:
    """Create what deploy/prefect.yaml's deployments need on the server: every work pool (process type;
    the gpu pool with ``base_job_template`` and ``gpu_pool_type`` if given), the GPU-slot limit(s) with
    ``gpus`` slots, and the zombie automation. Idempotent; returns what it created, changed or kept."""
    from prefect import get_client
    from prefect.client.schemas.actions import (
        GlobalConcurrencyLimitCreate,
        GlobalConcurrencyLimitUpdate,
        WorkPoolCreate,
        WorkPoolUpdate,
    )
    from prefect.exceptions import ObjectNotFound
    from prefect.workers.process import ProcessWorker

    url = _require_server()
    spec = load_spec(prefect_file)
    gpu_pool = (((spec.get("definitions") or {}).get("work_pools") or {}).get("gpu") or {}).get("name")
    template = json.loads(Path(base_job_template).read_text()) if base_job_template else None
    if gpu_pool_type != "process" and template is None:
        raise DeploymentError(
            f"--gpu-pool-type {gpu_pool_type} needs --base-job-template (e.g. "
            "deploy/k8s/base-job-template.json): only the process template ships with Prefect"
        )
    if template is not None and not isinstance(template.get("job_configuration"), dict):
        raise DeploymentError(
            f"{base_job_template} is not a work-pool base job template: it needs 'job_configuration' and "
            "'variables' (see `prefect work-pool get-default-base-job-template --type kubernetes`)"
        )
    report: dict[str, Any] = {"api": url, "work_pools": {}, "concurrency_limits": {}}
    with get_client(sync_client=True) as client:
        for name in work_pools(spec):
            custom = template is not None and name == gpu_pool
            kind = gpu_pool_type if custom else "process"
            want = template if custom else ProcessWorker.get_default_base_job_template()
            try:
                pool = client.read_work_pool(name)
            except ObjectNotFound:
                client.create_work_pool(WorkPoolCreate(name=name, type=kind, base_job_template=want))
                report["work_pools"][name] = f"created ({kind})"
                continue
            if pool.type != kind:
                raise DeploymentError(
                    f"work pool {name!r} exists with type {pool.type!r}, not {kind!r}: delete it "
                    f"(`prefect work-pool delete {name}`) and run setup again, or pass --gpu-pool-type "
                    f"{pool.type}" + ("" if pool.type == "process" else " and its --base-job-template")
                )
            if custom and pool.base_job_template != want:
                client.update_work_pool(name, WorkPoolUpdate(base_job_template=want))
                report["work_pools"][name] = "base job template updated"
            else:
                report["work_pools"][name] = "exists"

        limits = gpu_limits(spec) or {DEFAULT_GPU_LIMIT: 1}
        gpus = gpus if gpus is not None else _count_gpus()
        for name, per_run in limits.items():
            try:
                have = client.read_global_concurrency_limit_by_name(name)
            except ObjectNotFound:
                have = None
            if gpus is None:
                if have is None:
                    raise DeploymentError(
                        f"cannot tell how many GPUs this node has (no nvidia-smi) to create concurrency "
                        f"limit {name!r}: pass --gpus N"
                    )
                report["concurrency_limits"][name] = f"exists ({have.limit} slots)"
                continue
            if gpus < per_run:
                report.setdefault("warnings", []).append(
                    f"--gpus {gpus} is fewer than the {per_run} GPU slots a run of deploy/prefect.yaml takes "
                    f"(train.num_processes): such a run fails at its train stage, saying so, unless its "
                    f"overrides lower train.num_processes to {gpus} or less"
                )
            if have is None:
                client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=name, limit=gpus))
                report["concurrency_limits"][name] = f"created ({gpus} slots)"
            elif have.limit != gpus or not have.active:
                client.update_global_concurrency_limit(
                    name, GlobalConcurrencyLimitUpdate(limit=gpus, active=True)
                )
                report["concurrency_limits"][name] = f"set to {gpus} slots (was {have.limit})"
            else:
                report["concurrency_limits"][name] = f"exists ({gpus} slots)"

        automation = zombie_automation(heartbeat_timeout_s)
        found = client.read_automations_by_name(ZOMBIE_AUTOMATION)
        if not found:
            client.create_automation(automation)
            report["automation"] = f"created ({ZOMBIE_AUTOMATION!r})"
        else:
            for extra in found[1:]:
                client.delete_automation(extra.id)
            current = AutomationCoreFields.of(found[0])
            if current != AutomationCoreFields.of(automation):
                client.update_automation(found[0].id, automation)
                report["automation"] = f"updated ({ZOMBIE_AUTOMATION!r})"
            else:
                report["automation"] = f"exists ({ZOMBIE_AUTOMATION!r})"
    return report


class AutomationCoreFields:
    """What setup compares to decide whether the existing automation is the one it would create."""

    @staticmethod
    def of(automation: Any) -> dict[str, Any]:
        return {
            "trigger": automation.trigger.model_dump(mode="json", exclude={"id"}),
            "actions": [a.model_dump(mode="json") for a in automation.actions],
            "enabled": automation.enabled,
        }


# ------------------------------------------------------------------------------------------------------
# deltatune serve
# ------------------------------------------------------------------------------------------------------


def runner_deployments(spec: dict[str, Any], names: list[str] | None = None) -> list[Any]:
    """``flow.to_deployment(...)`` for each deployment of ``spec`` (or those in ``names``), with its
    parameters, tags and schedules, for ``prefect.serve``. Entry points are resolved in the checkout."""
    from prefect.flows import load_flow_from_entrypoint
    from prefect.schedules import Cron, Interval

    wanted = [d for d in spec.get("deployments") or [] if not names or d["name"] in names]
    if missing := sorted(set(names or []) - {d["name"] for d in wanted}):
        known = ", ".join(d["name"] for d in spec.get("deployments") or [])
        raise DeploymentError(f"no deployment named {', '.join(missing)} in deploy/prefect.yaml ({known})")
    out = []
    for d in wanted:
        flow = load_flow_from_entrypoint(str(CHECKOUT / d["entrypoint"]))
        schedules = []
        for s in d.get("schedules") or []:
            if "cron" in s:
                schedules.append(Cron(s["cron"], timezone=s.get("timezone"), slug=s.get("slug")))
            else:
                schedules.append(Interval(s["interval"], timezone=s.get("timezone"), slug=s.get("slug")))
        deployment = flow.to_deployment(
            name=d["name"],
            description=d.get("description"),
            parameters=d.get("parameters") or {},
            tags=d.get("tags"),
            schedules=schedules,
        )
        out.append(deployment)
    return out


def serve(
    names: list[str] | None = None, *, prefect_file: str | Path = PREFECT_FILE, limit: int | None = None
):
    """Serve deploy/prefect.yaml's deployments (schedules included) from this process until it is
    stopped: one GPU box, no work pool, no worker. Their schedules stay active when it stops
    (``pause_on_shutdown=False``); the flow runs send heartbeats as a worker's do."""
    from prefect import serve as prefect_serve

    _require_server()
    spec = load_spec(prefect_file)
    for key, value in heartbeat_env(spec).items():  # inherited by every flow-run subprocess
        os.environ.setdefault(key, value)
    os.chdir(CHECKOUT)  # relative run-config paths and entry points, as the pull step does for a worker
    deployments = runner_deployments(spec, names)
    _refuse_worker_deployments(deployments)
    prefect_serve(*deployments, pause_on_shutdown=False, limit=limit)


def _refuse_worker_deployments(deployments: list[Any]) -> None:
    """Serving updates a deployment of the same name in place, but Prefect 3.9.1 leaves a worker
    deployment's work pool and code location (path None) as they were, so its served runs fail to load
    the flow (measured). Say so before serving instead."""
    from prefect import get_client
    from prefect.exceptions import ObjectNotFound

    taken = []
    with get_client(sync_client=True) as client:
        for d in deployments:
            try:
                have = client.read_deployment_by_name(f"{d.flow_name}/{d.name}")
            except ObjectNotFound:
                continue
            if have.work_pool_name or have.pull_steps:
                taken.append(f"{d.flow_name}/{d.name} (work pool {have.work_pool_name})")
    if taken:
        raise DeploymentError(
            f"{', '.join(taken)} already deployed for a worker by `prefect deploy`; `deltatune serve` "
            "serves under the same names, instead of a worker: delete them first (`prefect deployment "
            "delete NAME`) or serve only the others (`deltatune serve DEPLOYMENT ...`)"
        )


# ------------------------------------------------------------------------------------------------------
# The command line (flows/cli.py)
# ------------------------------------------------------------------------------------------------------


def add_parsers(sub: Any) -> None:
    """Add ``setup`` and ``serve`` to the ``deltatune`` subparsers."""
    from flows._help import command

    p = command(
        sub,
        "setup",
        "create the work pools, GPU-slot limit and zombie-run automation of deploy/prefect.yaml",
        "Against the Prefect server that PREFECT_API_URL names, create every work pool deploy/prefect.yaml "
        "names (process type), the global concurrency limit of GPU slots its GPU run configs use "
        "(train.gpu_slots_limit) with --gpus slots, and the automation that marks a flow run Crashed when "
        "its heartbeats stop. Run it again at any time: what exists and matches is kept, a changed --gpus "
        "is applied. Then `prefect deploy --prefect-file deploy/prefect.yaml --all`.",
        [
            "deltatune setup --gpus 8",
            "deltatune setup --gpus 8 --gpu-pool-type kubernetes "
            "--base-job-template deploy/k8s/base-job-template.json",
        ],
    )
    p.add_argument("--gpus", type=int, help="GPUs of this node: the limit's slots (default: nvidia-smi -L)")
    p.add_argument(
        "--base-job-template",
        metavar="JSON",
        help="base job template for the gpu pool, e.g. deploy/k8s/base-job-template.json",
    )
    p.add_argument(
        "--gpu-pool-type",
        default="process",
        help="worker type of the gpu pool (default process; kubernetes with a Kubernetes template)",
    )
    p.add_argument(
        "--heartbeat-timeout",
        type=float,
        default=90.0,
        metavar="SECONDS",
        help="a flow run silent this long is marked Crashed (default 90: three 30 s heartbeats)",
    )
    p.add_argument("--prefect-file", default=str(PREFECT_FILE), help=argparse.SUPPRESS)
    p = command(
        sub,
        "serve",
        "serve deploy/prefect.yaml's deployments, schedules included, from this process (no worker)",
        "For a single GPU box: registers the deployments of deploy/prefect.yaml (or those named) with the "
        "Prefect server that PREFECT_API_URL names and runs their flow runs, scheduled or triggered, as "
        "subprocesses of this one until it is stopped; stopping it leaves the schedules active. Run "
        "`deltatune setup --gpus N` first (GPU slots, zombie automation).",
        ["deltatune serve", "deltatune serve llama3-8b-lora llama3-8b-lora-nightly --limit 2"],
    )
    p.add_argument("names", nargs="*", metavar="DEPLOYMENT", help="deployment names (default: all)")
    p.add_argument("--limit", type=int, help="most flow runs at once (default: no limit)")
    p.add_argument("--prefect-file", default=str(PREFECT_FILE), help=argparse.SUPPRESS)


def run(args: argparse.Namespace) -> int:
    """Run ``setup`` or ``serve``: 0 done, 1 failed, 2 bad input."""
    try:
        if args.cmd == "setup":
            if args.gpus is not None and args.gpus < 1:
                print("deltatune: --gpus takes the number of GPUs of this node (1 or more)", file=sys.stderr)
                return 2
            report = setup(
                args.gpus,
                prefect_file=args.prefect_file,
                base_job_template=args.base_job_template,
                gpu_pool_type=args.gpu_pool_type,
                heartbeat_timeout_s=args.heartbeat_timeout,
            )
            print(json.dumps(report, indent=2))
        else:
            serve(args.names, prefect_file=args.prefect_file, limit=args.limit)
    except (ConfigError, FileNotFoundError, json.JSONDecodeError) as e:
        print(f"deltatune: {e}", file=sys.stderr)
        return 2
    except DeploymentError as e:
        print(f"deltatune: {args.cmd} failed: {e}", file=sys.stderr)
        return 1
    except Exception as e:  # the one line that matters; the server's log has the rest
        print(f"deltatune: {args.cmd} failed: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    return 0
