"""report_to: TensorBoard and MLflow, offline. What they recorded is read back with their own readers
(tensorboard's EventAccumulator, mlflow's client over a SQLite store), never from our own files."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest


def _scalars(log_dir: Path, tag: str) -> list[tuple[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir))
    acc.Reload()
    return [(e.step, e.value) for e in acc.Scalars(tag)]


def _mlflow_runs(uri: str, experiment: str):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name(experiment)
    assert exp is not None, f"no MLflow experiment {experiment!r} in {uri}"
    return client, client.search_runs([exp.experiment_id])


@pytest.fixture(scope="module")
def mlflow_store(tmp_path_factory) -> str:
    """One SQLite store for this module's unit tests: creating one takes MLflow seconds."""
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"


@pytest.mark.slow
def test_a_finetune_run_reports_steps_config_eval_and_version_to_tensorboard_and_mlflow(
    prefect_harness, run_config, tmp_path, mlflow_store
):
    from core.config import to_yaml
    from flows.finetune import finetune

    cfg = run_config(
        "name=tracked",
        "train.launcher=inprocess",
        "train.max_steps=3",
        "report_to=[tensorboard, mlflow]",
        f"tracking.mlflow_tracking_uri={mlflow_store}",
    )
    path = tmp_path / "run.yaml"
    path.write_text(to_yaml(cfg))
    out = finetune(config=str(path))
    rd = cfg.run_dir.resolve()
    losses = [json.loads(line)["loss"] for line in (rd / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 3

    # TensorBoard: every step's loss, and the eval results at the last step.
    tb = _scalars(rd / "tensorboard", "train/loss")
    assert [s for s, _ in tb] == [1, 2, 3]
    assert [v for _, v in tb] == pytest.approx(losses, rel=1e-5)
    assert _scalars(rd / "tensorboard", "eval/tuned/loss") == [
        (3, pytest.approx(out["eval"]["tuned"]["loss"]))
    ]

    # MLflow: one run holding it all, in the experiment named after the model.
    client, runs = _mlflow_runs(mlflow_store, "tracked")
    assert len(runs) == 1, [r.info.run_name for r in runs]
    run = runs[0]
    assert run.info.run_name == "tracked" and run.info.status == "FINISHED"
    params = run.data.params
    assert params["train.lr"] == "0.001" and params["train.max_steps"] == "3" and params["method"] == "lora"
    history = client.get_metric_history(run.info.run_id, "train/loss")
    assert [m.step for m in sorted(history, key=lambda m: m.step)] == [1, 2, 3]
    assert {"train/lr", "train/grad_norm", "train/tokens_per_s"} <= run.data.metrics.keys()
    assert run.data.metrics["eval/tuned/loss"] == pytest.approx(out["eval"]["tuned"]["loss"])
    assert run.data.metrics["eval/base/loss"] == pytest.approx(out["eval"]["base"]["loss"])
    assert "merge/max_logit_gap" in run.data.metrics
    assert run.data.tags["deltatune.published_uri"] == out["publish"]["uri"]
    assert run.data.tags["deltatune.manifest_sha256"] == out["publish"]["manifest_sha256"]
    assert json.loads((rd / "tracking.json").read_text())["mlflow_run_id"] == run.info.run_id


@pytest.mark.slow  # MLflow creates its SQLite store (~10 s on 2 cores)
def test_a_resumed_training_continues_its_tracker_runs_and_a_new_config_starts_new_ones(
    tmp_path, mlflow_store
):
    from core.config import load_config
    from core.trackers import Trackers

    base = [
        f"output_dir={tmp_path}",
        "name=resumed",
        "report_to=[tensorboard, mlflow]",
        f"tracking.mlflow_tracking_uri={mlflow_store}",
    ]
    cfg = load_config(overrides=base)
    rd = cfg.run_dir

    first = Trackers.for_training(cfg, rd, start=0)
    for step in (1, 2, 3):
        first.log_step(
            {"step": step, "loss": 10.0 + step, "lr": 1e-3, "grad_norm": None, "tokens_per_s": 5.0}
        )
    first.close(failed=True)  # killed after step 3; its last checkpoint was step 2

    again = Trackers.for_training(cfg, rd, start=2)
    for step in (3, 4):
        again.log_step({"step": step, "loss": 20.0 + step, "lr": 1e-3, "grad_norm": 0.5, "tokens_per_s": 5.0})
    again.close()

    # TensorBoard shows one trajectory: the redone step 3 replaces the first attempt's.
    assert _scalars(rd / "tensorboard", "train/loss") == [(1, 11.0), (2, 12.0), (3, 23.0), (4, 24.0)]
    client, runs = _mlflow_runs(mlflow_store, "resumed")
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    steps = sorted(m.step for m in client.get_metric_history(runs[0].info.run_id, "train/loss"))
    assert steps == [1, 2, 3, 3, 4]  # MLflow keeps both values logged at step 3
    assert "train/grad_norm" in runs[0].data.metrics  # None (no norm) was skipped, 0.5 logged

    # Another training configuration in the same run directory: a new MLflow run.
    changed = load_config(overrides=[*base, "train.lr=1e-3"])
    Trackers.for_training(changed, rd, start=0).close()
    _, runs = _mlflow_runs(mlflow_store, "resumed")
    assert len(runs) == 2


@pytest.mark.slow  # MLflow's SQLite store
def test_a_tracker_that_fails_mid_training_is_dropped_and_the_others_go_on(tmp_path, mlflow_store, caplog):
    from mlflow.tracking import MlflowClient

    from core.config import load_config
    from core.trackers import Trackers

    cfg = load_config(
        overrides=[
            f"output_dir={tmp_path}",
            "name=dropped",
            "report_to=[mlflow, tensorboard]",
            f"tracking.mlflow_tracking_uri={mlflow_store}",
        ]
    )
    trackers = Trackers.for_training(cfg, cfg.run_dir, start=0)
    MlflowClient(tracking_uri=mlflow_store).delete_run(trackers.state["mlflow_run_id"])  # gone mid-run
    for step in range(1, 151):  # enough metrics that MLflow's buffer is sent, and refused
        trackers.log_step(
            {"step": step, "loss": 1.0 / step, "lr": 1e-3, "grad_norm": 1.0, "tokens_per_s": 9.0}
        )
    assert [t.name for t in trackers.active] == ["tensorboard"]
    assert "mlflow: log_metrics failed" in caplog.text
    trackers.close()
    assert [s for s, _ in _scalars(cfg.run_dir / "tensorboard", "train/loss")] == list(range(1, 151))


def test_a_tracker_that_cannot_start_is_an_error_naming_it_and_closes_the_others(tmp_path):
    from core.config import load_config
    from core.trackers import TrackerError, Trackers

    cfg = load_config(
        overrides=[
            f"output_dir={tmp_path}",
            "report_to=[tensorboard, mlflow]",
            "tracking.mlflow_tracking_uri=nosuchstore://tracking",
        ]
    )
    with pytest.raises(TrackerError, match=r"report_to: mlflow could not start .*nosuchstore"):
        Trackers.for_training(cfg, cfg.run_dir, start=0)
    assert not (cfg.run_dir / "tracking.json").exists()  # no tracker run recorded as started


def test_tracker_locations_default_to_the_run_directory(tmp_path, monkeypatch):
    from core.config import load_config
    from core.trackers import mlflow_uri, tensorboard_dir

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    cfg = load_config(overrides=[f"output_dir={tmp_path}", "name=where"])
    rd = cfg.run_dir
    assert mlflow_uri(cfg, rd) == f"sqlite:///{rd.resolve() / 'mlflow.db'}"
    assert tensorboard_dir(cfg, rd) == rd / "tensorboard"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    assert mlflow_uri(cfg, rd) == "http://127.0.0.1:5000"


def test_report_to_names_only_known_and_installed_trackers():
    from core.config import ConfigError, load_config

    with pytest.raises(
        ConfigError, match=r"report_to\.0: Input should be 'tensorboard', 'mlflow' or 'wandb'"
    ):
        load_config(overrides=["report_to=[comet]"])
    assert load_config(overrides=["report_to=[mlflow, mlflow]"]).report_to == ["mlflow"]
    if importlib.util.find_spec("wandb") is None:
        with pytest.raises(
            ConfigError, match=r"report_to: names 'wandb', which is not installed: pip install wandb"
        ):
            load_config(overrides=["report_to=[wandb]"])
    # A tracking server's URI is checked like every other URL of a config, and never echoed.
    with pytest.raises(ConfigError, match=r"tracking\.mlflow_tracking_uri") as err:
        load_config(overrides=["tracking.mlflow_tracking_uri=https://user:s3cr3tpw@mlflow.example.com"])
    assert "s3cr3tpw" not in str(err.value)
