"""The cluster files (deploy/Dockerfile, deploy/k8s/, deploy/slurm/) cannot run here: parse them and
check what a worker, a cluster and a scheduler need from them (docs/cluster.md)."""

from __future__ import annotations

import json
import os
import re
import shlex
import stat
import subprocess
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
DOCKERFILE = REPO / "deploy" / "Dockerfile"
K8S = REPO / "deploy" / "k8s"
SBATCH = REPO / "deploy" / "slurm" / "finetune-multinode.sbatch"
MULTINODE_CONFIG = REPO / "deploy" / "runs" / "llama3-8b-full-zero3-2node.yaml"


def _instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of a Dockerfile, continuation lines joined, comments dropped."""
    out, buf = [], ""
    for line in path.read_text().splitlines():
        if not buf and (not line.strip() or line.lstrip().startswith("#")):
            continue
        buf += line.rstrip("\\").strip() + " " if line.rstrip().endswith("\\") else line.strip()
        if not line.rstrip().endswith("\\"):
            word, _, rest = buf.partition(" ")
            out.append((word.upper(), rest.strip()))
            buf = ""
    return out


def _constraints() -> dict[str, str]:
    pins = {}
    for line in (REPO / ".ci" / "constraints.txt").read_text().splitlines():
        if "==" in line and not line.startswith("#"):
            name, ver = line.split("==")
            pins[name.strip().lower()] = ver.strip()
    return pins


# --- Dockerfile ------------------------------------------------------------------------------------


def test_dockerfile_is_a_cuda_image_with_pinned_deps_the_project_and_a_non_root_user():
    ins = _instructions(DOCKERFILE)
    args = dict(a.split("=", 1) for k, a in ins if k == "ARG" and "=" in a)
    args = {k: v.strip('"') for k, v in args.items()}
    froms = [a for k, a in ins if k == "FROM"]
    assert froms and re.fullmatch(r"nvidia/cuda:\d+\.\d+(\.\d+)?-\S*devel\S*", froms[0].split()[0]), froms

    runs = [a for k, a in ins if k == "RUN"]
    installs = [c for r in runs for c in re.split(r"&&|;", r) if re.search(r"\bpip install\b", c)]
    assert installs
    pins = _constraints()
    for cmd in installs:  # every install pinned: by the constraints file, or == on each requirement
        words = shlex.split(cmd.replace("${", "{").replace("$", ""))
        reqs = [w for w in words[words.index("install") + 1 :] if not w.startswith("-") and "://" not in w]
        reqs = [r for r in reqs if r not in ("{TORCH_INDEX_URL}", "{VIRTUAL_ENV}", ".ci/constraints.txt")]
        assert "-c" in words or all("==" in r for r in reqs), cmd
    torch = next(c for c in installs if "torch==" in c)
    assert "--index-url" in torch and args["TORCH_INDEX_URL"].startswith(
        "https://download.pytorch.org/whl/cu"
    )
    assert args["TORCH_VERSION"] == pins["torch"]  # the version CI tests, as its CUDA build
    assert any(
        re.search(r"pip install -c \.ci/constraints\.txt \.(\s|$)", c) for c in installs
    )  # the project

    copies = [a for k, a in ins if k == "COPY"]
    for c in copies:  # every source exists in the repo (the build context is its root)
        srcs = [w for w in shlex.split(c) if not w.startswith("--")][:-1]
        assert srcs and all((REPO / s).exists() for s in srcs), c
    assert any(".ci/constraints.txt" in c for c in copies)

    users = [a for k, a in ins if k == "USER"]
    assert users and users[-1] not in ("root", "0") and "useradd" in " ".join(runs)
    env = " ".join(a for k, a in ins if k == "ENV")
    workdir = [a for k, a in ins if k == "WORKDIR"][-1]
    assert f"DELTATUNE_HOME={workdir}" in env  # the deployments' pull step changes into the checkout
    assert re.search(r"\bPREFECT_HOME=", env) and "PREFECT_API_URL" not in env  # the worker sets the URL
    assert not re.search(r"(?i)(secret|token|password)\w*=", env)  # no credential baked in
    ignore = (REPO / "deploy" / "Dockerfile.dockerignore").read_text().split()
    assert {".git", ".venv"} <= set(ignore)


# --- Kubernetes ------------------------------------------------------------------------------------


def _load_yaml_docs(name: str) -> list[dict]:
    return [d for d in yaml.safe_load_all((K8S / name).read_text()) if d]


def test_base_job_template_is_valid_for_prefect_and_asks_for_what_a_gpu_run_needs():
    from prefect.server.schemas.actions import validate_base_job_template
    from prefect.utilities.schema_tools.validation import is_valid_schema
    from prefect.utilities.templating import apply_values, find_placeholders

    tpl = json.loads((K8S / "base-job-template.json").read_text())
    validate_base_job_template(tpl)  # the API's own check: every placeholder is a declared variable
    is_valid_schema(tpl["variables"])
    props = tpl["variables"]["properties"]
    conf = tpl["job_configuration"]
    # What prefect-kubernetes' KubernetesWorkerJobConfiguration reads, and the base manifest it
    # requires (apiVersion/kind, one completion, restartPolicy Never, first container "prefect-job").
    assert {"command", "env", "labels", "name", "namespace", "job_manifest"} <= conf.keys()
    job = conf["job_manifest"]
    assert (job["apiVersion"], job["kind"]) == ("batch/v1", "Job")
    pod = job["spec"]["template"]["spec"]
    assert (pod["parallelism"], pod["completions"], pod["restartPolicy"]) == (1, 1, "Never")
    box = pod["containers"][0]
    assert box["name"] == "prefect-job"
    assert (box["image"], box["args"]) == ("{{ image }}", "{{ command }}")
    assert box["resources"]["limits"]["nvidia.com/gpu"] == "{{ gpus }}"
    mounts = {m["name"]: m["mountPath"] for m in box["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["shared"]["persistentVolumeClaim"]["claimName"] == "{{ shared_pvc }}"
    assert mounts["shared"] == "/shared"
    refs = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in box["env"] if "valueFrom" in e}
    assert {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "HF_TOKEN"} <= refs.keys()
    assert all(r["name"] == "{{ store_secret }}" and r["key"] == n for n, r in refs.items())
    # No credential as a literal value anywhere in the template.
    from core.secretkeys import find_secrets

    literal_env = [{e["name"]: e["value"]} for e in box["env"] if "value" in e]
    assert find_secrets(literal_env) == []
    assert {p.name for p in find_placeholders(json.dumps(conf))} <= props.keys()

    # Rendered as a worker renders it (Prefect's templating): typed values, nothing left unfilled.
    values = {k: v["default"] for k, v in props.items() if "default" in v}
    values.update(
        name="finetune-run",
        command="prefect flow-run execute",
        env={"PREFECT_API_URL": "http://p/api"},
        gpus=4,
    )
    rendered = apply_values(conf, values)
    assert "{{" not in json.dumps(rendered)
    rbox = rendered["job_manifest"]["spec"]["template"]["spec"]["containers"][0]
    assert rbox["resources"]["limits"]["nvidia.com/gpu"] == 4 and rbox["args"] == "prefect flow-run execute"
    assert rendered["job_manifest"]["metadata"]["generateName"] == "finetune-run-"
    assert rendered["env"] == {"PREFECT_API_URL": "http://p/api"}

    # Its defaults name the Secret and the claim the example manifests create.
    (secret,) = _load_yaml_docs("store-credentials.secret.yaml")
    (pvc,) = _load_yaml_docs("shared-pvc.yaml")
    assert props["store_secret"]["default"] == secret["metadata"]["name"] and secret["kind"] == "Secret"
    assert (
        props["shared_pvc"]["default"] == pvc["metadata"]["name"]
        and "ReadWriteMany" in pvc["spec"]["accessModes"]
    )
    assert not any(v for v in secret["stringData"].values())  # an example: no value committed


def test_multinode_indexed_job_gives_each_pod_its_node_rank_and_rank_0_as_master():
    from core.config import load_config

    svc, job = _load_yaml_docs("multinode-indexed-job.yaml")
    cfg = load_config(MULTINODE_CONFIG)
    spec = job["spec"]
    assert spec["completionMode"] == "Indexed"
    assert spec["completions"] == spec["parallelism"] == cfg.train.num_nodes  # every node at once
    pod = spec["template"]["spec"]
    assert svc["spec"]["clusterIP"] == "None" and pod["subdomain"] == svc["metadata"]["name"]
    assert svc["spec"]["selector"].items() <= spec["template"]["metadata"]["labels"].items()
    box = pod["containers"][0]
    env = {e["name"]: e for e in box["env"]}
    rank = env["NODE_RANK"]["valueFrom"]["fieldRef"]["fieldPath"]
    assert rank == "metadata.annotations['batch.kubernetes.io/job-completion-index']"
    # Pod i of an Indexed Job with a subdomain is <job>-<i>.<subdomain>: rank 0 is the master.
    assert env["MASTER_ADDR"]["value"] == f"{job['metadata']['name']}-0.{pod['subdomain']}"
    assert env["MASTER_PORT"]["value"] == str(svc["spec"]["ports"][0]["port"])
    assert box["resources"]["limits"]["nvidia.com/gpu"] == cfg.train.num_processes
    assert box["args"][:3] == ["deltatune", "run", str(MULTINODE_CONFIG.relative_to(REPO))]
    (secret,) = _load_yaml_docs("store-credentials.secret.yaml")
    (pvc,) = _load_yaml_docs("shared-pvc.yaml")
    refs = [
        e["valueFrom"]["secretKeyRef"]["name"] for e in box["env"] if "secretKeyRef" in e.get("valueFrom", {})
    ]
    assert refs and set(refs) == {secret["metadata"]["name"]}
    claims = {
        v["name"]: v["persistentVolumeClaim"]["claimName"]
        for v in pod["volumes"]
        if "persistentVolumeClaim" in v
    }
    mount = next(m["mountPath"] for m in box["volumeMounts"] if m["name"] in claims)
    assert set(claims.values()) == {pvc["metadata"]["name"]}
    assert cfg.output_dir.startswith(mount + "/")  # checkpoints on the volume every node mounts


# --- Slurm -----------------------------------------------------------------------------------------


def _sbatch_options() -> dict[str, str]:
    opts = {}
    for line in SBATCH.read_text().splitlines():
        if line.startswith("#SBATCH "):
            key, _, val = line.split(None, 1)[1].partition("=")
            opts[key] = val
    return opts


def test_sbatch_script_is_valid_bash_with_one_task_per_node():
    subprocess.run(["bash", "-n", str(SBATCH)], check=True)
    assert os.access(SBATCH, os.X_OK)
    opts = _sbatch_options()
    assert opts["--ntasks-per-node"] == "1" and int(opts["--nodes"]) >= 2 and "--gpus-per-node" in opts


def test_sbatch_script_exports_the_env_each_node_needs(tmp_path):
    """Run the script with stand-ins for Slurm's commands (srun starts the task once per node with
    that node's SLURM_NODEID, as Slurm does) and a stand-in deltatune that records its environment."""
    bin_dir, home = tmp_path / "bin", tmp_path / "checkout"
    (home / ".venv" / "bin").mkdir(parents=True)
    bin_dir.mkdir()
    scripts = {
        bin_dir
        / "scontrol": '#!/bin/bash\n[ "$1 $2" = "show hostnames" ] && printf "gpu-a17\\ngpu-a18\\n"\n',
        bin_dir / "srun": (
            "#!/bin/bash\n"
            'echo "srun $*" >> "$LOG"\n'
            'while [ "${1#-}" != "$1" ]; do shift; done\n'  # drop srun's own options
            'for n in $(seq 0 $((SLURM_JOB_NUM_NODES - 1))); do SLURM_NODEID=$n "$@" || exit $?; done\n'
        ),
        home / ".venv" / "bin" / "deltatune": (
            "#!/bin/bash\n"
            'echo "node=$NODE_RANK master=$MASTER_ADDR:$MASTER_PORT home=$DELTATUNE_HOME pwd=$PWD args=$*" >> "$LOG"\n'
        ),
    }
    for path, text in scripts.items():
        path.write_text(text)
        path.chmod(path.stat().st_mode | stat.S_IXUSR)
    log = tmp_path / "log"
    env = {
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
        "LOG": str(log),
        "SLURM_JOB_NODELIST": "gpu-a[17-18]",
        "SLURM_JOB_NUM_NODES": "2",
        "SLURM_GPUS_ON_NODE": "8",
        "SLURM_SUBMIT_DIR": str(home),
        "HOME": str(tmp_path),
    }
    subprocess.run(["bash", str(SBATCH)], env=env, check=True, capture_output=True, timeout=60)
    text = log.read_text()
    assert text.startswith("srun --nodes=2 --ntasks-per-node=1 --kill-on-bad-exit=1 bash -c")
    lines = [line for line in text.splitlines() if line.startswith("node=")]
    args = (
        f"args=run {MULTINODE_CONFIG.relative_to(REPO)} --set train.num_nodes=2 --set train.num_processes=8"
    )
    assert lines == [f"node={n} master=gpu-a17:29500 home={home} pwd={home} {args}" for n in (0, 1)]
