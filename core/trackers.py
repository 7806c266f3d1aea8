"""Experiment trackers named in ``report_to``: TensorBoard, MLflow and W&B, written from rank 0 only.

    trackers = Trackers.for_training(cfg, run_dir, start=0)   # in the training process (core.train)
    trackers.log_step(metrics_record)                          # each optimizer step's metrics.jsonl line
    trackers.close()                                           # or close(failed=True)
    log_results(cfg, run_dir, flow_result)                     # the flow, after evaluate/publish

Training logs ``train/loss``, ``train/lr``, ``train/grad_norm`` and ``train/tokens_per_s`` per step and
the resolved config, flattened and redacted (core.secretkeys), as params. The flow then adds the eval
results (``eval/<base|tuned|delta>/<metric>``, ``merge/*``) at the last training step and the published
version as tags (``deltatune.published_uri``, ...). Both write into the same tracker run: the MLflow and
W&B run ids are kept in ``<run_dir>/tracking.json`` with the training fingerprint, so a retried or
resumed training (and the flow after it) continues the same run, and a new training configuration in
the same run directory starts a new one. TensorBoard writes to one log dir, and a resumed training
purges the steps it redoes (``SummaryWriter(purge_step=)``).

What a failure does (README, "Experiment trackers"): a tracker that is named but not installed is a
config error (core.config); one that fails to start (a tracking server that cannot be reached) fails
the train stage before its first step, as a tracker of HF's Trainer does; one that fails later is
disabled with a warning and training goes on (metrics.jsonl keeps every step). The flow's results
never fail the run: the version is published by then.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from core.config import RunConfig, to_yaml
from core.errors import DeltatuneError, is_retryable
from core.fsutil import write_json
from core.run import RunDir, training_fingerprint
from core.secretkeys import redact, safe_uri

log = logging.getLogger(__name__)

STEP_METRICS = ("loss", "lr", "grad_norm", "tokens_per_s")
_MLFLOW_MAX_BATCH = 100  # params per MLflow log_batch call (its documented limit is 100)
_MLFLOW_MAX_PARAM = 6000  # characters of one MLflow param value


class TrackerError(DeltatuneError, RuntimeError):
    """A tracker named in ``report_to`` could not start; nothing was trained. ``retryable`` follows the
    cause (a server that cannot be reached may come back; a bad URI does not)."""


def experiment_name(cfg: RunConfig) -> str:
    from core.publish import model_name

    return cfg.tracking.experiment or model_name(cfg)


def tensorboard_dir(cfg: RunConfig, run_dir: str | os.PathLike[str]) -> Path:
    return Path(cfg.tracking.tensorboard_dir or RunDir(run_dir).tensorboard)


def mlflow_uri(cfg: RunConfig, run_dir: str | os.PathLike[str]) -> str:
    """``tracking.mlflow_tracking_uri``, else ``$MLFLOW_TRACKING_URI``, else a SQLite store in the run
    directory (MLflow 3 refuses new file stores unless ``MLFLOW_ALLOW_FILE_STORE`` is set)."""
    uri = cfg.tracking.mlflow_tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
    return uri or f"sqlite:///{RunDir(run_dir).mlflow_db.resolve()}"


def flatten(obj: Any, prefix: str = "") -> dict[str, str]:
    """``{"train.lr": "0.0002", "lora.target_modules": "['q_proj', ...]", ...}``: nested mappings
    joined by dots, every other value as a string."""
    out: dict[str, str] = {}
    if isinstance(obj, Mapping) and obj:
        for k, v in obj.items():
            out.update(flatten(v, f"{prefix}.{k}" if prefix else str(k)))
    elif prefix:
        out[prefix] = str(obj)
    return out


def config_params(cfg: RunConfig) -> dict[str, str]:
    """The resolved config as tracker params; secret-looking option values masked (the config refuses
    them anyway, so this is a second guard)."""
    return flatten(redact(cfg.model_dump(mode="json")))


# ----------------------------------------------------------------------------------------------------
# One class per tracker: start, metrics, tags, close
# ----------------------------------------------------------------------------------------------------


class _TensorBoard:
    name = "tensorboard"

    def __init__(self, cfg: RunConfig, run_dir: Path, state: dict, purge_step: int | None):
        from torch.utils.tensorboard import SummaryWriter

        self.dir = tensorboard_dir(cfg, run_dir)
        self.writer = SummaryWriter(str(self.dir), purge_step=purge_step)

    def log_params(self, params: dict[str, str], config_yaml: str) -> None:
        self.writer.add_text("config", "```yaml\n" + config_yaml + "\n```", 0)

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        for k, v in metrics.items():
            self.writer.add_scalar(k, v, step)

    def set_tags(self, tags: dict[str, str], step: int) -> None:
        for k, v in tags.items():
            self.writer.add_text(k, v, step)

    def close(self, failed: bool) -> None:
        self.writer.close()


class _MLflow:
    name = "mlflow"

    def __init__(self, cfg: RunConfig, run_dir: Path, state: dict, purge_step: int | None):
        from mlflow.tracking import MlflowClient

        self.uri = mlflow_uri(cfg, run_dir)
        self.client = MlflowClient(tracking_uri=self.uri)
        self.run_id = state.get("mlflow_run_id") if state.get("mlflow_tracking_uri") == self.uri else None
        if self.run_id is not None:
            try:
                self.client.update_run(self.run_id, status="RUNNING")
            except Exception as e:  # deleted from the store since: start another
                log.warning("mlflow: cannot resume run %s (%s); starting a new run", self.run_id, e)
                self.run_id = None
        if self.run_id is None:
            name = experiment_name(cfg)
            exp = self.client.get_experiment_by_name(name)
            exp_id = exp.experiment_id if exp is not None else self.client.create_experiment(name)
            run = self.client.create_run(
                exp_id, run_name=cfg.tracking.run_name or cfg.name, tags={"deltatune.run": cfg.name}
            )
            self.run_id = run.info.run_id
        state.update(mlflow_run_id=self.run_id, mlflow_tracking_uri=self.uri)
        self.pending: list[Any] = []
        self.flushed = time.monotonic()

    def log_params(self, params: dict[str, str], config_yaml: str) -> None:
        from mlflow.entities import Param

        items = [Param(k, v[:_MLFLOW_MAX_PARAM]) for k, v in sorted(params.items())]
        for i in range(0, len(items), _MLFLOW_MAX_BATCH):
            self.client.log_batch(self.run_id, params=items[i : i + _MLFLOW_MAX_BATCH])

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.pending += [Metric(k, float(v), now, step) for k, v in metrics.items()]
        # One request every few seconds, not one per step: a remote server is not slowed to the step rate.
        if len(self.pending) >= 500 or time.monotonic() - self.flushed > 5:
            self._flush()

    def _flush(self) -> None:
        batch, self.pending, self.flushed = self.pending, [], time.monotonic()
        for i in range(0, len(batch), 1000):  # MLflow takes at most 1000 metrics per batch
            self.client.log_batch(self.run_id, metrics=batch[i : i + 1000])

    def set_tags(self, tags: dict[str, str], step: int) -> None:
        for k, v in tags.items():
            self.client.set_tag(self.run_id, k, v)

    def close(self, failed: bool) -> None:
        try:
            self._flush()
        finally:
            self.client.set_terminated(self.run_id, status="FAILED" if failed else "FINISHED")


class _WandB:
    name = "wandb"

    def __init__(self, cfg: RunConfig, run_dir: Path, state: dict, purge_step: int | None):
        import wandb

        self.run = wandb.init(
            project=experiment_name(cfg),
            name=cfg.tracking.run_name or cfg.name,
            id=state.get("wandb_run_id"),
            resume="allow",
            dir=str(run_dir),
        )
        state["wandb_run_id"] = self.run.id

    def log_params(self, params: dict[str, str], config_yaml: str) -> None:
        self.run.config.update(params, allow_val_change=True)

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        self.run.log(metrics, step=step)

    def set_tags(self, tags: dict[str, str], step: int) -> None:
        for k, v in tags.items():
            self.run.summary[k] = v

    def close(self, failed: bool) -> None:
        self.run.finish(exit_code=1 if failed else 0)


_KINDS = {"tensorboard": _TensorBoard, "mlflow": _MLflow, "wandb": _WandB}


class Trackers:
    """The trackers of ``report_to`` in this process. After start, a tracker whose call fails is
    warned about and dropped; the others, and training, go on."""

    def __init__(self, active: list[Any], rd: RunDir, state: dict, *, new: bool):
        self.active, self.rd, self.state = active, rd, state
        self.new = new  # no earlier tracker run of this training to continue

    @classmethod
    def open(
        cls, cfg: RunConfig, run_dir: str | os.PathLike[str], *, purge_step: int | None = None
    ) -> Trackers:
        """Start every tracker of ``cfg.report_to``, continuing the runs ``tracking.json`` names for
        this training fingerprint.

        Raises:
            TrackerError: a tracker failed to start (the ones already started are closed).
        """
        rd = RunDir(run_dir)
        fingerprint = training_fingerprint(cfg)
        saved = rd.read_json(rd.tracking_state)
        same = isinstance(saved, dict) and saved.get("fingerprint") == fingerprint
        state = saved if same else {}
        state["fingerprint"] = fingerprint
        active: list[Any] = []
        for name in cfg.report_to:
            try:
                active.append(_KINDS[name](cfg, rd.path, state, purge_step))
            except Exception as e:
                for t in active:
                    _quietly(t.close, True)
                raise TrackerError(
                    f"report_to: {name} could not start ({type(e).__name__}: {e}); check tracking.* "
                    f"(README, 'Experiment trackers') or remove {name} from report_to",
                    retryable=is_retryable(e),
                ) from e
        if active:
            write_json(rd.tracking_state, state)
        return cls(active, rd, state, new=not same)

    @classmethod
    def for_training(cls, cfg: RunConfig, run_dir: str | os.PathLike[str], *, start: int) -> Trackers:
        """Trackers for a training that starts at step ``start`` (0, or the resumed checkpoint's step),
        with the resolved config logged as params."""
        # TensorBoard hides every event at or after purge_step from the earlier files: the first step
        # this attempt logs is start + 1 (metrics.jsonl's steps count from 1).
        trackers = cls.open(cfg, run_dir, purge_step=start + 1)
        trackers._each("log_params", config_params(cfg), to_yaml(cfg))
        return trackers

    def log_step(self, rec: Mapping[str, Any]) -> None:
        """One metrics.jsonl record (core.train): its loss, lr, grad norm and tokens/s at its step."""
        metrics = {f"train/{k}": rec[k] for k in STEP_METRICS if rec.get(k) is not None}
        self._each("log_metrics", metrics, int(rec["step"]))

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        self._each("log_metrics", dict(metrics), step)

    def set_tags(self, tags: Mapping[str, str], step: int) -> None:
        self._each("set_tags", dict(tags), step)

    def close(self, failed: bool = False) -> None:
        for t in self.active:
            try:
                t.close(failed)  # MLflow sends its last buffered metrics here
            except Exception as e:
                log.warning(
                    "%s: closing failed (%s: %s); its last metrics may be missing",
                    t.name,
                    type(e).__name__,
                    e,
                )
        self.active = []

    def _each(self, method: str, *args: Any) -> None:
        for t in list(self.active):
            try:
                getattr(t, method)(*args)
            except Exception as e:
                log.warning(
                    "%s: %s failed (%s: %s); not reporting to it any more",
                    t.name,
                    method,
                    type(e).__name__,
                    e,
                )
                self.active.remove(t)
                _quietly(t.close, True)


def _quietly(fn, *args) -> None:
    try:
        fn(*args)
    except Exception as e:
        log.debug("closing a tracker failed: %s", e)


# ----------------------------------------------------------------------------------------------------
# After the train stage: the flow's eval, merge and publish results
# ----------------------------------------------------------------------------------------------------


def result_metrics(out: Mapping[str, Any]) -> dict[str, float]:
    """Eval and merge numbers of a finetune flow result, as ``eval/<side>/<metric>`` and ``merge/<key>``."""
    metrics: dict[str, float] = {}
    ev = out.get("eval") or {}
    for side in ("base", "tuned", "delta"):
        for k, v in (ev.get(side) or {}).items():
            if k in ("loss", "perplexity", "task_metric", "exact_match") and isinstance(v, (int, float)):
                metrics[f"eval/{side}/{k}"] = float(v)
    for k in ("max_logit_gap", "mean_logit_gap", "loss_gap"):
        v = (out.get("merge") or {}).get(k)
        if isinstance(v, (int, float)):
            metrics[f"merge/{k}"] = float(v)
    return metrics


def result_tags(out: Mapping[str, Any]) -> dict[str, str]:
    pub = out.get("publish") or {}
    tags = {
        "deltatune.published_uri": safe_uri(pub["uri"]) if pub.get("uri") else None,
        "deltatune.model": pub.get("model"),
        "deltatune.version": pub.get("version"),
        "deltatune.manifest_sha256": pub.get("manifest_sha256"),
    }
    promoted = out.get("promote") or {}
    if promoted.get("promoted"):
        tags[f"deltatune.alias.{promoted.get('alias')}"] = str(promoted.get("version"))
    return {k: str(v) for k, v in tags.items() if v is not None}


def log_results(cfg: RunConfig, run_dir: str | os.PathLike[str], out: Mapping[str, Any]) -> bool:
    """Report a finetune flow's eval/merge metrics (at the last training step) and the published
    version (tags) to the trackers of ``report_to``, in the run the training reported to. Never raises:
    returns whether every tracker took them."""
    if not cfg.report_to:
        return True
    try:
        return _log_results(cfg, run_dir, out)
    except Exception as e:  # e.g. tracking.json not writable: the run is done, and says so in its log
        log.warning(
            "reporting the results to %s failed (%s: %s)", ", ".join(cfg.report_to), type(e).__name__, e
        )
        return False


def _log_results(cfg: RunConfig, run_dir: str | os.PathLike[str], out: Mapping[str, Any]) -> bool:
    try:
        trackers = Trackers.open(cfg, run_dir)
    except TrackerError as e:
        log.warning("%s; the eval results and the version were not reported", e)
        return False
    step = int((out.get("train") or {}).get("steps") or 0)
    n = len(trackers.active)
    if trackers.new:  # training was reused from elsewhere, or not tracked: this run gets the config too
        trackers._each("log_params", config_params(cfg), to_yaml(cfg))
    metrics = result_metrics(out)
    trackers.log_metrics(metrics, step)
    trackers.set_tags(result_tags(out), step)
    ok = len(trackers.active) == n
    trackers.close()
    log.info("reported %d eval/merge metrics and the version to %s", len(metrics), ", ".join(cfg.report_to))
    return ok
