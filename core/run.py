"""One owner for a run directory: its file and folder names, the resolved config, the fingerprints that
decide what may be reused (data, training, code), whether training finished, and the small state files.

    rd = RunDir.create(cfg)        # <output_dir>/<name>/ with run_config.yaml written
    cfg = RunDir(path).config()    # what every later stage reads back
    rd.write_json(rd.eval_report, results)   # every JSON state file goes through fsutil.atomic_write

Layout (docs/run-directory.md): run_config.yaml, data/ (data-node<N>/ on other nodes), metrics.jsonl,
checkpoints/step-NNNNNN/, adapter/ or model/, train_summary.json, train_error[.rank<R>].json, eval.json,
merged/, merge_report.json, publish_state.json, startup/rank<R>.json.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import yaml

from core.config import RunConfig, load_config, to_yaml
from core.fsutil import atomic_write, read_json, write_json

log = logging.getLogger(__name__)

CONFIG = "run_config.yaml"
PREPARE_REPORT = "prepare_report.json"
METRICS = "metrics.jsonl"
SUMMARY = "train_summary.json"
EVAL = "eval.json"
MERGE_REPORT = "merge_report.json"
PUBLISH_STATE = "publish_state.json"
TRACKING_STATE = "tracking.json"  # the experiment-tracker run ids to resume (core.trackers)
_ERROR = "train_error"
STARTUP = "startup"

_REPO = Path(__file__).resolve().parents[1]
# The sources whose content decides what a stage produces (flows/ only orchestrates them).
_CODE_DIRS = ("core", "tasks")


class RunDir:
    """A run directory, ``<output_dir>/<name>``; paths are absolute once made by ``for_config``."""

    def __init__(self, path: str | os.PathLike[str]):
        self.path = Path(path)

    @classmethod
    def for_config(cls, cfg: RunConfig) -> RunDir:
        return cls(cfg.run_dir.resolve())

    @classmethod
    def create(cls, cfg: RunConfig) -> RunDir:
        """The run directory of ``cfg``, created, with the resolved config written into it."""
        rd = cls.for_config(cfg)
        rd.write_config(cfg)
        return rd

    def __repr__(self) -> str:
        return f"RunDir({str(self.path)!r})"

    def __fspath__(self) -> str:
        return str(self.path)

    # --- layout -----------------------------------------------------------------------------------
    @property
    def config_path(self) -> Path:
        return self.path / CONFIG

    def data_dir(self, node: int = 0) -> Path:
        """Where the prepare stage puts the splits; every node of a multi-node run has its own copy."""
        return self.path / ("data" if node == 0 else f"data-node{node}")

    @property
    def metrics(self) -> Path:
        return self.path / METRICS

    @property
    def checkpoints(self) -> Path:
        return self.path / "checkpoints"

    def trained_dir(self, method: str) -> Path:
        """The train stage's output: ``adapter/`` for lora and qlora, ``model/`` for full fine-tuning."""
        return self.path / ("model" if method == "full" else "adapter")

    @property
    def summary(self) -> Path:
        return self.path / SUMMARY

    @property
    def eval_report(self) -> Path:
        return self.path / EVAL

    @property
    def merged(self) -> Path:
        return self.path / "merged"

    @property
    def merge_report(self) -> Path:
        return self.path / MERGE_REPORT

    @property
    def publish_state_path(self) -> Path:
        return self.path / PUBLISH_STATE

    @property
    def tracking_state(self) -> Path:
        return self.path / TRACKING_STATE

    @property
    def tensorboard(self) -> Path:
        """TensorBoard's default log dir (``tracking.tensorboard_dir`` unset)."""
        return self.path / "tensorboard"

    @property
    def mlflow_db(self) -> Path:
        """MLflow's default SQLite store (``tracking.mlflow_tracking_uri`` and $MLFLOW_TRACKING_URI unset)."""
        return self.path / "mlflow.db"

    def error_file(self, rank: int) -> Path:
        """Where rank ``rank`` records the exception that stopped it (rank 0: ``train_error.json``)."""
        return self.path / (f"{_ERROR}.json" if rank == 0 else f"{_ERROR}.rank{rank}.json")

    def error_files(self) -> list[Path]:
        return sorted(self.path.glob(f"{_ERROR}*.json"))

    def phase_file(self, rank: int) -> Path:
        """Where rank ``rank`` records its start-up phase (core.startup; the launch watchdog reads it)."""
        return self.path / STARTUP / f"rank{rank}.json"

    # --- config -----------------------------------------------------------------------------------
    def write_config(self, cfg: RunConfig) -> Path:
        """Write the resolved config atomically (every later stage and every version reads it back)."""
        return atomic_write(self.config_path, to_yaml(cfg))

    def config(self) -> RunConfig:
        """The resolved config written by ``write_config``."""
        return load_config(self.config_path)

    # --- small state files ------------------------------------------------------------------------
    @staticmethod
    def write_json(path: Path, obj: Any) -> Path:
        """Every JSON file of a run is written whole or not at all (a kill never leaves a torn one)."""
        return write_json(path, obj)

    @staticmethod
    def read_json(path: Path) -> Any | None:
        """The JSON at ``path``, or None when it is missing or unreadable (a file of an older layout)."""
        try:
            return read_json(path)
        except FileNotFoundError:
            return None
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            log.warning("ignoring unreadable %s: %s", path, e)
            return None

    def finished(self, cfg: RunConfig, train_data: str | Path) -> dict[str, Any] | None:
        """The train summary if training finished with this config's trajectory on this data and its
        output is still there; else None (a run to start or resume)."""
        summary = self.read_json(self.summary)
        if not isinstance(summary, dict):
            return None
        same = (summary.get("fingerprint"), summary.get("data_fingerprint")) == (
            training_fingerprint(cfg),
            data_fingerprint(train_data),
        )
        return summary if same and Path(summary.get("output_dir", "")).exists() else None

    def forget_training(self) -> None:
        """Make the next train stage start from step 0 (``deltatune run --refresh``): drop the summary
        and every checkpoint. The previous output stays until the new training replaces it whole."""
        self.summary.unlink(missing_ok=True)
        shutil.rmtree(self.checkpoints, ignore_errors=True)

    def publish_state(self) -> dict[str, Any] | None:
        """The claim a failed publish left (store, model, version, token, content key), if any."""
        state = self.read_json(self.publish_state_path)
        return state if isinstance(state, dict) else None

    def set_publish_state(self, state: dict[str, Any]) -> None:
        self.write_json(self.publish_state_path, state)

    def clear_publish_state(self) -> None:
        self.publish_state_path.unlink(missing_ok=True)


# ----------------------------------------------------------------------------------------------------
# Fingerprints: what decides whether a checkpoint may be resumed and a stage's result reused
# ----------------------------------------------------------------------------------------------------


def digest(obj: Any, length: int = 16) -> str:
    """A short sha256 of ``obj``'s canonical JSON: the form of every fingerprint and stage key."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:length]


def training_fingerprint(cfg: RunConfig) -> str:
    """Hash of every setting that changes the training trajectory; resuming requires it to match."""
    return digest(trajectory(cfg))


def trajectory(cfg: RunConfig) -> dict[str, Any]:
    """Every setting that changes the training trajectory, as plain data.

    Left out: what only affects scheduling or output (retries, timeouts, save/log cadence), and the
    later stages (eval, merge, publish).
    """
    t = cfg.train.model_dump(
        mode="json",
        exclude={
            "retries",
            "retry_delay_s",
            "timeout_s",
            "startup_timeout_s",
            "save_every",
            "keep_last",
            "keep_checkpoints",
            "log_every",
            "launcher",
            "gpu_slots_limit",
        },
    )
    t.update(node_rank=None, master_addr=None, master_port=None, hostfile=None)
    if cfg.train.deepspeed_config and Path(cfg.train.deepspeed_config).is_file():
        # The file's content decides the ZeRO layout of the checkpoint, not its name.
        t["deepspeed_config"] = hashlib.sha256(Path(cfg.train.deepspeed_config).read_bytes()).hexdigest()
    return {
        "method": cfg.method,
        "model": cfg.model.model_dump(mode="json"),
        "data": cfg.data.model_dump(mode="json", exclude={"cache_dir", "storage_options"}),
        "lora": cfg.lora.model_dump(mode="json") if cfg.method != "full" else None,
        "quant": cfg.quant.model_dump(mode="json") if cfg.method == "qlora" else None,
        "train": t,
    }


def data_fingerprint(train_data: str | Path) -> str:
    """The content hash of a prepared split (the prepare stage's cache key), so that a run resumed
    or re-run on changed data under the same path is detected."""
    report = Path(train_data).parent / PREPARE_REPORT
    if report.is_file():
        return read_json(report)["fingerprint"]
    state = Path(train_data) / "state.json"  # a split saved some other way: datasets' own fingerprint
    return json.loads(state.read_text()).get("_fingerprint", "") if state.is_file() else ""


@functools.cache
def code_version() -> dict[str, Any]:
    """deltatune's package version, git commit (when run from a checkout) and a hash of the sources of
    ``core/`` and ``tasks/``: the last is part of every stage key, so changed code never reuses a result."""
    h = hashlib.sha256()
    for sub in _CODE_DIRS:
        for path in sorted((_REPO / sub).rglob("*.py")):
            h.update(path.relative_to(_REPO).as_posix().encode() + b"\0" + path.read_bytes() + b"\0")
    return {"package": _package_version(), "git_commit": _git_commit(), "source_sha256": h.hexdigest()[:16]}


def _package_version() -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("deltatune")
    except PackageNotFoundError:
        return None


def _git_commit() -> str | None:
    if not (_REPO / ".git").exists():
        return None
    try:
        out = subprocess.run(
            ["git", "-C", str(_REPO), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def config_hash(cfg: RunConfig) -> str:
    """A hash of the whole resolved config (recorded in every manifest's lineage)."""
    return digest(yaml.safe_load(to_yaml(cfg)))
