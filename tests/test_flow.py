"""The whole finetune flow on the bundled demo config, under Prefect's test harness.

This is the README's main job with the artifacts redirected to tmp: the built-in tiny model, the
bundled data, a local store. It proves the stages connect, and that the demo really teaches the task.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch

from tests.conftest import REPO

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def demo_run(prefect_harness, tmp_path_factory):
    from flows.finetune import finetune

    tmp = tmp_path_factory.mktemp("demo")
    overrides = [
        f"output_dir={tmp / 'runs'}",
        f"publish.store={tmp / 'artifacts'}",
        f"cache.storage={tmp / 'results'}",
    ]
    result = finetune(config=str(REPO / "deploy/runs/demo.yaml"), overrides=overrides)
    return result, tmp


def run_flow(cfg, tmp_path: Path, **kwargs):
    """Write ``cfg`` as the run's YAML and run the finetune flow on it, as a user would."""
    from core.config import to_yaml
    from flows.finetune import finetune

    path = tmp_path / "run.yaml"
    path.write_text(to_yaml(cfg))
    return finetune(config=str(path), **kwargs)


def published_paths(result: dict) -> set[str]:
    manifest = json.loads(Path(result["publish"]["uri"], "manifest.json").read_text())
    return {f["path"] for f in manifest["files"]}


def test_demo_publishes_a_version_whose_manifest_matches_the_files(demo_run):
    result, tmp = demo_run
    pub = result["publish"]
    vdir = Path(pub["uri"])
    assert vdir.parent.name == "versions" and pub["version"] == "v0001"
    manifest = json.loads((vdir / "manifest.json").read_text())
    paths = {f["path"] for f in manifest["files"]}
    assert {
        "run_config.yaml",
        "eval.json",
        "adapter/adapter_model.safetensors",
        "merged/model.safetensors",
    } <= paths
    for entry in manifest["files"]:
        data = (vdir / entry["path"]).read_bytes()
        assert len(data) == entry["size"]
        assert hashlib.sha256(data).hexdigest() == entry["sha256"], entry["path"]
    # Every file of the version is in the manifest (nothing unaccounted for besides the manifest itself).
    on_disk = {
        str(p.relative_to(vdir)) for p in vdir.rglob("*") if p.is_file() and not p.name.startswith(".")
    }
    assert on_disk - {"manifest.json"} == paths


def test_demo_merged_model_loads_with_plain_transformers_and_matches_adapter(demo_run):
    from transformers import AutoModelForCausalLM

    from core.adapter import load_adapter
    from core.data import collate, load_split
    from core.modeling import load_model
    from core.run import RunDir

    result, _ = demo_run
    run_dir = Path(result["run_dir"])
    vdir = Path(result["publish"]["uri"])
    cfg = RunDir(run_dir).config()
    rows = list(load_split(result["data"]["eval_dir"]))[:8]
    batch = collate(rows, pad_id=0)
    merged = AutoModelForCausalLM.from_pretrained(vdir / "merged", use_safetensors=True).eval()
    adapted = load_model(cfg.model)
    load_adapter(adapted, vdir / "adapter")
    adapted.eval()
    with torch.no_grad():
        a = merged(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        b = adapted(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    mask = batch["attention_mask"].bool()
    torch.testing.assert_close(a[mask], b[mask], atol=1e-4, rtol=0)
    assert result["merge"]["max_logit_gap"] < 1e-4


def test_demo_tuned_model_beats_base_on_exact_match(demo_run):
    result, _ = demo_run
    ev = json.loads((Path(result["run_dir"]) / "eval.json").read_text())
    base, tuned = ev["base"], ev["tuned"]
    assert tuned["generated"] == base["generated"] >= 40
    # The task is learnable by the tiny model in the demo's budget; measured well above this bar.
    assert tuned["exact_match"] >= base["exact_match"] + 0.3, (base["exact_match"], tuned["exact_match"])
    assert tuned["loss"] < base["loss"]
    summary = json.loads((Path(result["run_dir"]) / "train_summary.json").read_text())
    assert 0 < summary["trainable_share"] < 0.2


# Installed through PYTHONPATH into the training subprocess only: SIGKILLs it once, mid-run, the first
# time collate is called for the CRASH_AT-th micro-batch. The test's own process never imports it.
_CRASH_ONCE = """
import os, signal
import core.data as _data

_real, _calls = _data.collate, [0]

def collate(*args, **kwargs):
    _calls[0] += 1
    marker = os.environ["DELTATUNE_TEST_CRASH_MARKER"]
    if _calls[0] == int(os.environ["DELTATUNE_TEST_CRASH_AT"]) and not os.path.exists(marker):
        open(marker, "w").close()
        os.kill(os.getpid(), signal.SIGKILL)
    return _real(*args, **kwargs)

_data.collate = collate
"""


def test_train_task_retry_resumes_from_the_last_checkpoint(
    prefect_harness, run_config, tmp_path, monkeypatch
):
    from prefect import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    from core.config import to_yaml
    from flows.finetune import finetune

    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(_CRASH_ONCE)
    marker = tmp_path / "crashed"
    monkeypatch.setenv("PYTHONPATH", str(site))
    monkeypatch.setenv("DELTATUNE_TEST_CRASH_MARKER", str(marker))
    monkeypatch.setenv("DELTATUNE_TEST_CRASH_AT", "5")  # during step 5: checkpoints 2 and 4 are complete
    cfg = run_config(
        "name=retry", "train.max_steps=6", "train.save_every=2", "train.retries=1", "train.retry_delay_s=0"
    )
    path = tmp_path / "run.yaml"
    path.write_text(to_yaml(cfg))

    state = finetune(config=str(path), return_state=True)
    assert state.is_completed(), state
    result = state.result()
    assert marker.exists(), "the first attempt was never killed"
    assert result["train"]["resumed_from_step"] == 4
    steps = [json.loads(line)["step"] for line in (cfg.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6]
    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[state.state_details.flow_run_id]))
        )
    train_runs = [r for r in runs if r.name.startswith("train")]
    assert len(train_runs) == 1 and train_runs[0].run_count == 2  # one task run, retried once
    assert Path(result["publish"]["uri"], "manifest.json").is_file()


def test_rerun_without_eval_split_publishes_only_what_it_produced(prefect_harness, run_config, tmp_path):
    first = run_config("name=rerun", "train.max_steps=2")
    one = run_flow(first, tmp_path)
    assert "eval" in one and (first.run_dir / "eval.json").is_file()

    # Same run name, no eval split and eval off: the merge gap is still measured (on training rows),
    # and the first run's eval.json, still in the run directory, must not ship with this version.
    two = run_flow(
        first, tmp_path, overrides=["data.eval_fraction=0", "eval.enabled=false", "train.max_steps=3"]
    )
    assert two["data"]["eval_dir"] is None and "eval" not in two
    assert two["merge"]["max_logit_gap"] < 1e-4
    manifest = json.loads(Path(two["publish"]["uri"], "manifest.json").read_text())
    paths = {f["path"] for f in manifest["files"]}
    assert "eval.json" not in paths and "merge_report.json" in paths
    assert "eval" not in manifest["metadata"] and manifest["metadata"]["train"]["steps"] == 3


def test_qlora_flow_trains_on_4bit_merges_into_the_closer_base_and_publishes(
    prefect_harness, run_config, tmp_path
):
    from safetensors.torch import load_file

    from core.adapter import WEIGHTS_NAME, check_adapter_tensors

    cfg = run_config("name=qlora", "method=qlora", "train.max_steps=12", "train.lr=5e-3")
    result = run_flow(cfg, tmp_path)

    losses = [json.loads(line)["loss"] for line in (cfg.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 12 and sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.2, losses
    sd = load_file(str(cfg.run_dir / "adapter" / WEIGHTS_NAME))
    check_adapter_tensors(sd, sorted(sd), require_trained=True)
    scores = json.loads((cfg.run_dir / "eval.json").read_text())
    assert scores["tuned"]["loss"] < scores["base"]["loss"]  # both on the 4-bit base the adapter trained on

    report = result["merge"]
    # merge.base: auto merges into both bases; each merge is exact against the adapter on its own base ...
    assert report["max_logit_gap"] < 1e-4 and report["base_requested"] == "auto"
    cands = report["candidates"]
    assert all(c["gap"]["max_logit_gap"] < 1e-4 for c in cands.values())
    # ... the original base carries the NF4 error against the 4-bit model that was trained, the
    # dequantized one does not (fp32 compute), and the report keeps the one closer by loss delta.
    assert cands["original"]["vs_4bit_trained"]["max_logit_gap"] > 1e-3
    assert cands["dequantized"]["vs_4bit_trained"]["max_logit_gap"] < 1e-4
    closer = min(cands, key=lambda b: abs(cands[b]["vs_4bit_trained"]["loss_gap"]))
    assert report["base"] == closer and report["vs_4bit_trained"] == cands[closer]["vs_4bit_trained"]
    vs4 = report["vs_4bit_trained"]
    assert all(isinstance(vs4[k], float) for k in ("loss_4bit_trained", "loss_merged", "loss_gap"))
    paths = published_paths(result)
    assert f"adapter/{WEIGHTS_NAME}" in paths and "merged/model.safetensors" in paths, paths


def test_full_finetune_flow_evaluates_and_publishes_the_model_without_a_merge(
    prefect_harness, run_config, tmp_path
):
    from transformers import AutoModelForCausalLM

    cfg = run_config("name=full", "method=full", "train.max_steps=8", "train.lr=1e-3")
    result = run_flow(cfg, tmp_path)

    assert result["train"]["trainable_share"] == 1.0 and "merge" not in result
    scores = json.loads((cfg.run_dir / "eval.json").read_text())
    assert scores["tuned"]["loss"] < scores["base"]["loss"]
    paths = published_paths(result)
    assert "model/model.safetensors" in paths and not any(
        p.startswith(("adapter/", "merged/")) for p in paths
    )
    model = AutoModelForCausalLM.from_pretrained(
        Path(result["publish"]["uri"], "model"), use_safetensors=True
    )
    assert model.config.num_hidden_layers == 2


def test_publish_task_retry_resumes_the_claimed_version(prefect_harness, run_config, tmp_path, monkeypatch):
    """An upload that fails once: Prefect retries the task, which resumes the same version with the
    claim token kept in publish_state.json; no second version, and no state left behind."""
    from prefect import flow

    from core import store
    from core.run import RunDir
    from tasks.publish import publish

    cfg = run_config("name=pub", "publish.model_name=pub")
    RunDir.create(cfg)
    (cfg.run_dir / "eval.json").write_text("{}\n")
    (cfg.run_dir / "notes.txt").write_text("notes\n")
    real_upload, calls = store._upload_file, []

    def upload(s, local, remote):
        calls.append(remote)
        if len(calls) == 2:
            raise ConnectionResetError("simulated network failure")
        real_upload(s, local, remote)

    monkeypatch.setattr(store, "_upload_file", upload)
    monkeypatch.setattr(publish, "retry_delay_seconds", 0)
    sources = {"eval.json": str(cfg.run_dir / "eval.json"), "notes.txt": str(cfg.run_dir / "notes.txt")}

    @flow
    def just_publish() -> dict:
        return publish(str(cfg.run_dir), sources, {"run": "pub", "content_key": "k1"}, key="k1")

    result = just_publish()
    assert result["version"] == "v0001" and result["skipped"] == ["eval.json"]  # resumed, not restarted
    assert len(calls) == 3
    assert store.list_versions(cfg.publish.store, "pub") == ["v0001"]
    assert not RunDir(cfg.run_dir).publish_state_path.exists()


def test_unreachable_store_fails_the_run_before_any_training(prefect_harness, run_config, tmp_path):
    from core.store import StoreUnavailableError

    cfg = run_config(
        "name=nostore",
        "publish.store=s3://models/deltatune",
        "publish.storage_options={client_kwargs: {endpoint_url: 'http://127.0.0.1:9'}, "
        "config_kwargs: {retries: {max_attempts: 1}, connect_timeout: 1}}",
    )
    with pytest.raises(StoreUnavailableError, match="cannot reach artifact store s3://models/deltatune"):
        run_flow(cfg, tmp_path)
    assert not (cfg.run_dir / "data").exists() and not (cfg.run_dir / "metrics.jsonl").exists()
