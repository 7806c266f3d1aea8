"""What a finetune run shows in Prefect: artifacts built from the stages' own results.

    report_run(cfg, out, stages)        # end of the flow: summary, sample generations, link to the version
    with TrainProgress.start(cfg, run_dir, train_data):   # the train task: a progress artifact
        run_training(...)

Artifact keys are stable per model (``<model-slug>-summary``, ``-samples``, ``-version``,
``-train-progress``), so the UI's Artifacts page shows each model's history across runs. Prefect keys
take lowercase letters, digits and dashes only (prefect.types.names), hence the slug. Building or
sending an artifact never fails the run: a failure is logged and the run goes on. Nothing secret is
shown: no storage options, and URIs without their query string (where a signed URL's token would be).
"""

from __future__ import annotations

import contextvars
import json
import logging
import re
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from core.config import RunConfig
from core.publish import model_name
from core.run import PREPARE_REPORT, RunDir
from core.stages import snapshot_bytes

log = logging.getLogger(__name__)

STAGES = ("prepare", "train", "merge", "evaluate", "publish")
SAMPLE_ROWS = 20  # sample generations in the table (eval.json keeps eval.sample_rows per side)


def slug(name: str) -> str:
    """A Prefect artifact key made of ``name``: lowercase letters, digits and single dashes."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "model"


def artifact_keys(cfg: RunConfig) -> dict[str, str]:
    base = slug(model_name(cfg))
    return {k: f"{base}-{k}" for k in ("summary", "samples", "version", "train-progress")}


def safe_uri(uri: str) -> str:
    """``uri`` without query string or fragment (signed URLs carry their credentials there) and
    without user info (refused at config load already)."""
    parts = urlsplit(str(uri))
    if not parts.scheme or len(parts.scheme) == 1:  # a local path (or a Windows drive letter)
        return str(uri)
    host = parts.hostname or ""
    netloc = f"{host}:{parts.port}" if parts.port else host
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))


def version_link(uri: str) -> str:
    """A link for the version: ``file://`` for a local store, the store's own URI otherwise."""
    if "://" in str(uri):
        return safe_uri(uri)
    return Path(uri).resolve().as_uri()


def _fmt(v: Any, digits: int = 4) -> str:
    if v is None:
        return "–"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, Mapping):  # a gate that measures several values (max_merge_gap)
        return ", ".join(f"{k} {_fmt(x, digits)}" for k, x in v.items() if x is not None) or "–"
    if isinstance(v, float):
        return f"{v:.{digits}g}" if abs(v) < 1e-3 and v != 0 else f"{v:.{digits}f}"
    return str(v)


def _size(n: int | None) -> str:
    if n is None:
        return "–"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


# ----------------------------------------------------------------------------------------------------
# The summary
# ----------------------------------------------------------------------------------------------------


def summary_markdown(
    cfg: RunConfig, out: Mapping[str, Any], status: Mapping[str, str], seconds: Mapping[str, float]
) -> str:
    """The run's summary as markdown, from the flow's result ``out`` and the Stages runner's records."""
    lines = [f"# {cfg.name}: {cfg.method} fine-tune of `{cfg.model.name_or_path}`", ""]
    pub = out.get("publish")
    if pub:
        lines += [
            f"**Published** `{safe_uri(pub['uri'])}` ({pub['model']} {pub['version']})  ",
            f"manifest sha256 `{pub['manifest_sha256']}`",
            "",
        ]
    lines += ["## Stages", "", "| stage | status | wall time (s) |", "|---|---|---|"]
    for name in STAGES:
        if name in status or name in seconds:
            lines.append(f"| {name} | {status.get(name, 'failed')} | {_fmt(seconds.get(name), 2)} |")
    lines.append("")

    ev = out.get("eval")
    mg = out.get("merge") or {}
    if ev:
        lines += [f"## Evaluation ({ev.get('rows', '?')} held-out rows)", ""]
        metric = ev.get("metric") or "exact_match"
        head = "exact match" if metric == "exact_match" else f"{metric} | exact match"
        lines += [
            f"| model | loss | perplexity | {head} |",
            "|---|---|---|---|" + ("---|" if metric != "exact_match" else ""),
        ]

        def cells(s: dict[str, Any]) -> str:
            task = "" if metric == "exact_match" else f" {_fmt(s.get('task_metric'), 3)} |"
            return f"{_fmt(s.get('loss'))} | {_fmt(s.get('perplexity'), 3)} |{task} {_fmt(s.get('exact_match'), 3)} |"

        for side in ("base", "tuned", "merged"):
            if side in ev:
                lines.append(f"| {side} | {cells(ev[side])}")
        if "delta" in ev:
            lines.append(f"| tuned − base | {cells(ev['delta'])}")
        if "merged_vs_tuned" in ev:
            lines.append(f"| merged − tuned | {cells(ev['merged_vs_tuned'])}")
        f = ev.get("forgetting")
        if f:
            lines += [
                "",
                f"Forgetting ({f.get('rows')} texts of {f.get('source')}): loss base {_fmt(f.get('base_loss'))}, "
                f"tuned {_fmt(f.get('tuned_loss'))}, rise {_fmt(f.get('delta'))}",
            ]
        lines.append("")
    if mg:
        lines += ["## Merge", ""]
        lines.append(
            f"- max logit gap {_fmt(mg.get('max_logit_gap'))} (allowed {_fmt(mg.get('max_logit_gap_allowed'))}), "
            f"mean {_fmt(mg.get('mean_logit_gap'))}"
        )
        if mg.get("loss_merged") is not None:
            lines.append(
                f"- loss on {mg.get('gap_rows')} rows: adapter-on-base {_fmt(mg.get('loss_adapter'))}, "
                f"merged {_fmt(mg.get('loss_merged'))} (gap {_fmt(mg.get('loss_gap'))})"
            )
        q = mg.get("vs_4bit_trained")
        if q:
            lines.append(
                f"- vs the 4-bit model trained: max logit gap {_fmt(q.get('max_logit_gap'))}, "
                f"loss {_fmt(q.get('loss_4bit_trained'))} → {_fmt(q.get('loss_merged'))}"
            )
        lines.append("")

    tr = out.get("train") or {}
    lines += ["## Training", ""]
    if "steps" in tr:
        share = tr.get("trainable_share")
        lines += [
            f"- {tr['steps']} steps, final loss {_fmt(tr.get('final_loss'))}, "
            f"{_fmt(tr.get('wall_time_s'), 1)} s training, {tr.get('tokens', '–')} tokens"
            + (f", resumed from step {tr['resumed_from_step']}" if tr.get("resumed_from_step") else ""),
            f"- trainable parameters {tr.get('trainable_params', '–'):,} of {tr.get('total_params', '–'):,}"
            f" ({share:.3%})"
            if isinstance(share, float) and isinstance(tr.get("trainable_params"), int)
            else "- trainable parameters –",
        ]
        if isinstance(tr.get("adapters"), dict):  # which modules were adapted, and by which rule
            a = tr["adapters"]
            kinds = ", ".join(f"{k} ×{n}" for k, n in a.get("kinds", {}).items())
            lines.append(
                f"- adapters on {a.get('count', '–')} modules ({kinds}); targets: {a.get('rule', '–')}"
            )
    trained_size = snapshot_bytes(tr.get("files"), tr.get("output_dir"))
    what = "model" if cfg.method == "full" else "adapter"
    lines.append(f"- {what} on disk: {_size(trained_size)}")
    if mg:
        lines.append(
            f"- merged model on disk: {_size(snapshot_bytes(mg.get('files'), mg.get('merged_dir')))}"
        )
    if pub:
        total = sum(f["size"] for f in pub.get("files", []))
        lines.append(f"- version: {len(pub.get('files', []))} files, {_size(total)}")
    lines.append("")

    promo = out.get("promote")
    if promo:
        lines += ["## Promotion", ""]
        alias = promo.get("alias") or cfg.promote.alias
        if promo.get("promoted"):
            forced = " (forced past failed gates)" if promo.get("forced") else ""
            lines.append(f"**{alias}**: {promo.get('previous') or '(none)'} → {promo.get('version')}{forced}")
        else:
            lines.append(f"**{alias}** not moved: {promo.get('refused', 'refused by its gates')}")
        gates = promo.get("gates") or []
        if gates:
            lines += ["", "| gate | status | value | threshold | detail |", "|---|---|---|---|---|"]
            for g in gates:
                detail = str(g.get("detail", "")).replace("|", "\\|")
                lines.append(
                    f"| {g.get('name')} | {g.get('status')} | {_fmt(g.get('value'))} | {_fmt(g.get('threshold'))} | {detail} |"
                )
        lines.append("")
    if cfg.report_to:
        lines += [f"Reported to: {', '.join(cfg.report_to)}", ""]
    return "\n".join(lines)


def sample_rows(eval_report: str | Path | None, limit: int = SAMPLE_ROWS) -> list[dict[str, Any]]:
    """Rows of prompt, reference, base and tuned generations from eval.json (empty when absent)."""
    if not eval_report:
        return []
    results = RunDir.read_json(Path(eval_report))
    if not isinstance(results, dict):
        return []
    tuned = (results.get("tuned") or {}).get("samples") or []
    base = (results.get("base") or {}).get("samples") or []
    rows = []
    for i, t in enumerate(tuned[:limit]):
        b = base[i] if i < len(base) and base[i].get("prompt") == t.get("prompt") else {}
        rows.append(
            {
                "prompt": t.get("prompt"),
                "reference": t.get("reference"),
                "base": b.get("prediction"),
                "tuned": t.get("prediction"),
                "tuned matches": t.get("match"),
                "tuned score": t.get("score"),
            }
        )
    return rows


# ----------------------------------------------------------------------------------------------------
# Sending them
# ----------------------------------------------------------------------------------------------------


def _attempt(what: str, fn, *args, **kwargs) -> Any:
    try:
        return fn(*args, **kwargs)
    except Exception as e:  # an artifact is a view of the run: it never fails the run
        log.warning("could not create the %s artifact (%s: %s); the run goes on", what, type(e).__name__, e)
        return None


def report_run(cfg: RunConfig, out: Mapping[str, Any], stages: Any) -> dict[str, Any]:
    """Create the run's artifacts (summary, sample table, version link) from the flow result ``out``
    and the Stages runner ``stages`` (its ``status`` and ``seconds``). Returns the ids created by key;
    a key whose artifact could not be built or sent is missing (and logged)."""
    from prefect.artifacts import create_link_artifact, create_markdown_artifact, create_table_artifact

    keys = artifact_keys(cfg)

    def summary():
        return create_markdown_artifact(
            summary_markdown(cfg, out, stages.status, stages.seconds),
            key=keys["summary"],
            description=f"{cfg.name}: stages, metrics, sizes, version and promotion",
        )

    def samples():
        rows = sample_rows((out.get("eval") or {}).get("report_path"))
        if not rows:
            return None
        return create_table_artifact(
            rows,
            key=keys["samples"],
            description=f"{cfg.name}: sample generations on held-out prompts, base vs tuned",
        )

    def version():
        pub = out.get("publish")
        if not pub:
            return None
        return create_link_artifact(
            version_link(pub["uri"]),
            link_text=f"{pub['model']} {pub['version']}",
            key=keys["version"],
            description=f"manifest sha256 {pub['manifest_sha256']}",
        )

    made = {
        name: _attempt(name, fn)
        for name, fn in (("summary", summary), ("samples", samples), ("version", version))
    }
    return {k: v for k, v in made.items() if v is not None}


class TrainProgress:
    """A progress artifact for the train stage, fed by the ``metrics.jsonl`` lines the training
    process appends (one per step) from a thread that tails the file, a few updates a second at most.

        with TrainProgress.start(cfg, run_dir, train_data):
            run_training(...)      # on success the artifact ends at 100
    """

    INTERVAL_S = 0.5

    def __init__(self, cfg: RunConfig, metrics: Path, total: int | None):
        self.cfg, self.metrics, self.total = cfg, metrics, total
        self.id: Any = None
        self.step, self.loss, self.sent = 0, None, -1.0
        self.offset = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @classmethod
    def start(cls, cfg: RunConfig, run_dir: str | Path, train_data: str | Path) -> TrainProgress:
        rd = RunDir(run_dir)
        total = None
        report = RunDir.read_json(Path(train_data).parent / PREPARE_REPORT)
        if isinstance(report, dict) and "train" in report:
            from core.schedule import total_steps

            try:
                total = total_steps(cfg, report["train"])
            except ValueError:  # too few rows: the training process says so itself
                total = None
        return cls(cfg, rd.metrics, total)

    def __enter__(self) -> TrainProgress:
        from prefect.artifacts import create_progress_artifact

        self._read()  # a resumed run starts where its metrics stand
        self.id = _attempt(
            "train-progress",
            create_progress_artifact,
            self._percent(),
            key=artifact_keys(self.cfg)["train-progress"],
            description=self._describe(),
        )
        self.sent = self._percent()
        if self.id is not None and self.total:
            # The Prefect client's settings live in context variables: the thread runs in a copy.
            ctx = contextvars.copy_context()
            self._thread = threading.Thread(target=ctx.run, args=(self._follow,), daemon=True)
            self._thread.start()
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        if self.id is None:
            return
        self._read()
        if exc_type is None:
            self.step = self.total or self.step
            self._send(100.0, f"done: {self._describe()}")
        else:
            self._send(self._percent(), f"stopped ({exc_type.__name__}): {self._describe()}")

    def _percent(self) -> float:
        if not self.total:
            return 0.0
        return round(min(100.0, 100.0 * self.step / self.total), 1)

    def _describe(self) -> str:
        loss = f", loss {self.loss:.4f}" if isinstance(self.loss, (int, float)) else ""
        return f"{self.cfg.name}: step {self.step} of {self.total or '?'}{loss}"

    def _read(self) -> None:
        """Advance over the whole lines appended since the last read (the file is rewritten shorter
        when a resumed training truncates it: then read it from the start)."""
        try:
            if self.metrics.stat().st_size < self.offset:
                self.offset = 0
            with self.metrics.open("rb") as f:
                f.seek(self.offset)
                chunk = f.read()
        except FileNotFoundError:
            return
        done = chunk[: chunk.rfind(b"\n") + 1]
        self.offset += len(done)
        for line in done.splitlines():
            try:
                rec = json.loads(line)
                self.step, self.loss = int(rec["step"]), rec.get("loss")
            except (ValueError, KeyError, TypeError):
                continue

    def _send(self, percent: float, description: str) -> None:
        from prefect.artifacts import update_progress_artifact

        _attempt("train-progress", update_progress_artifact, self.id, percent, description=description)
        self.sent = percent

    def _follow(self) -> None:
        while not self._stop.wait(self.INTERVAL_S):
            self._read()
            if self._percent() != self.sent:
                self._send(self._percent(), self._describe())
