"""Stage results reused across flow runs, through Prefect's own result persistence and cache policies.

Each stage task is called with a ``key`` from ``core.stages.stage_keys`` (the content that determines
its result). ``StageCache`` makes that key the task's cache key, its result is persisted as JSON to the
result storage that ``cache:`` names, and a later flow run that computes the same key gets the result
back as a ``Cached`` state without running the stage, provided the result's check still passes (its
files are intact, its version is still published); a result that fails its check is never returned:
the stage runs again under the next key of the chain ``<key>``, ``<key>.1``, ``<key>.2``, ...
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prefect.cache_policies import NO_CACHE, CachePolicy
from prefect.filesystems import RemoteFileSystem, WritableFileSystem

from core.config import CacheConfig, cache_root
from core.run import digest
from core.stages import intact

log = logging.getLogger(__name__)

# Stale results of one key that are stepped over before giving up caching for that stage run.
_MAX_STALE = 20


@dataclass
class StageCache(CachePolicy):
    """Key a stage by its ``key`` parameter, stepping over persisted results whose check fails."""

    stage: str = ""
    check: Callable[[Any], bool] | None = field(default=None, compare=False)

    def compute_key(
        self, task_ctx, inputs: dict[str, Any], flow_parameters: dict[str, Any], **kwargs
    ) -> str | None:
        base = f"{self.stage}-{inputs['key']}"
        store = task_ctx.result_store
        for n in range(_MAX_STALE):
            key = base if n == 0 else f"{base}.{n}"
            if not store.exists(key):
                return key
            try:
                value = store.read(key).result
            except Exception as e:  # an unreadable record (another serializer, a torn upload)
                log.warning(
                    "%s: persisted result %s is unreadable (%s); stepping over it", self.stage, key, e
                )
                continue
            if self.check is None or self.check(value):
                return key
            log.warning(
                "%s: the result persisted as %s no longer holds (files gone or changed); rerunning",
                self.stage,
                key,
            )
        return None  # Prefect then runs the stage without persisting under a key


def result_storage(cfg: CacheConfig) -> Path | WritableFileSystem:
    """Where stage results persist: a local folder, or any fsspec URI (s3://bucket/prefix) as a
    RemoteFileSystem block. Prefect wants a non-local block saved server-side (tasks refer to it by
    id), so it is saved under a name derived from the URI and options: never credentials, which the
    config refuses and fsspec takes from the environment."""
    uri = cfg.storage or str(cache_root() / "results")
    if "://" not in uri or uri.startswith("file://"):
        return Path(uri.removeprefix("file://")).expanduser().resolve()
    block = RemoteFileSystem(basepath=uri.rstrip("/"), settings=dict(cfg.storage_options))
    block.save(f"deltatune-results-{digest([uri, cfg.storage_options])}", overwrite=True)
    return block


def cache_options(
    cfg: CacheConfig, stage: str, check: Callable[[Any], bool], *, refresh: bool
) -> dict[str, Any]:
    """``Task.with_options`` keywords that cache ``stage`` per ``cfg`` (none of it when disabled)."""
    if not cfg.enabled:
        return {"cache_policy": NO_CACHE}
    return {
        "cache_policy": StageCache(stage=stage, check=check),
        "persist_result": True,
        "result_serializer": "json",
        "result_storage": result_storage(cfg),
        "refresh_cache": refresh,
    }


class Stages:
    """Calls stage tasks with their key and ``cache:``'s options, and records for each whether it ran
    or its persisted result was reused (``status``: {"prepare": "cached", "train": "ran", ...}) and
    its wall time in this flow run (``seconds``: {"prepare": 0.4, ...}, also for a stage that failed).

    With ``run_name``, each task run is named ``<stage>-<run name>`` (``train-demo``), so the Prefect
    UI's task runs read as the stages of that run."""

    def __init__(self, cfg: CacheConfig, *, refresh: bool = False, run_name: str | None = None):
        self.cfg, self.refresh, self.run_name = cfg, refresh, run_name
        self.status: dict[str, str] = {}
        self.seconds: dict[str, float] = {}

    def __call__(self, task, key: str, *, check: Callable[[Any], bool] = intact, **options):
        named = {"task_run_name": f"{task.name}-{self.run_name}"} if self.run_name else {}
        configured = task.with_options(
            **{**cache_options(self.cfg, task.name, check, refresh=self.refresh), **named, **options}
        )

        def call(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                state = configured(*args, key=key, return_state=True, **kwargs)
                result = state.result()  # raises the stage's own exception when it failed
            finally:
                self.seconds[task.name] = round(time.perf_counter() - t0, 3)
            self.status[task.name] = "cached" if state.name == "Cached" else "ran"
            return result

        return call
