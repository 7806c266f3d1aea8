"""What a version of a run contains, the lineage its manifest records, and how a run publishes it.

    sources = version_sources(cfg, rd, stages)       # {"adapter": ".../adapter", "eval.json": ...}
    metadata = version_metadata(cfg, stages, keys, flow_run_id=...)
    result = publish_run(cfg, rd, sources, metadata)  # resumes the version a failed attempt claimed

``stages`` holds the results of the stages that ran or were reused in this flow run (prepare, train,
eval, merge), each naming its own files: a reused result may point into another run's directory.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import yaml

from core import store
from core.config import PublishConfig, RunConfig
from core.errors import DeltatuneError
from core.run import CONFIG, EVAL, MERGE_REPORT, PREPARE_REPORT, SUMMARY, RunDir, code_version, config_hash
from core.secretkeys import WHERE_INSTEAD, Finding, find_secrets, text_findings
from core.stages import StageKeys

log = logging.getLogger(__name__)


def model_name(cfg: RunConfig) -> str:
    """The store's name for this run's model: ``publish.model_name``, else the run name."""
    return cfg.publish.model_name or cfg.name


def version_sources(cfg: RunConfig, rd: RunDir, stages: dict[str, dict]) -> dict[str, str]:
    """Destination path in the version -> local file or directory. Only what this flow run's stages
    produced or reused ships: a stale report of an earlier run under the same name never does."""
    sources: dict[str, Path | str] = {
        CONFIG: rd.config_path,
        PREPARE_REPORT: stages["prepare"]["report_path"],
    }
    trained = stages["train"]
    sources[SUMMARY] = trained["summary_path"]
    if "eval" in stages:
        sources[EVAL] = stages["eval"]["report_path"]
    if "merge" in stages:
        sources[MERGE_REPORT] = stages["merge"]["report_path"]
    include = set(cfg.publish.include or ["adapter", "merged", "model"])
    if cfg.method == "full":
        if include & {"model", "merged"}:
            sources["model"] = trained["output_dir"]
    else:
        if "adapter" in include:
            sources["adapter"] = trained["output_dir"]
        if "merged" in include and "merge" in stages:
            sources["merged"] = stages["merge"]["merged_dir"]
    return {k: str(v) for k, v in sources.items()}


def version_metadata(
    cfg: RunConfig, stages: dict[str, dict], keys: StageKeys, *, flow_run_id: str | None = None
) -> dict[str, Any]:
    """The manifest's metadata: headline numbers for listings and gates, and the version's lineage
    (code, flow run, data, base model, method, config). ``content_key`` identifies what was published:
    a rerun that finds its own claimed version with this key finishes it instead of minting another."""
    meta: dict[str, Any] = {
        "run": cfg.name,
        "method": cfg.method,
        "base_model": cfg.model.name_or_path,
        "data_fingerprint": keys.data_fingerprint,
        "content_key": keys.publish,
    }
    t = stages["train"]
    meta["train"] = {k: t[k] for k in ("steps", "final_loss", "trainable_share", "wall_time_s") if k in t}
    if "adapters" in t:
        meta["adapters"] = t["adapters"]
    ev = stages.get("eval")
    if ev is not None:
        meta["eval"] = {
            side: {
                k: ev[side].get(k)
                for k in ("loss", "perplexity", "task_metric", "task_metric_name", "exact_match")
            }
            for side in ("base", "tuned")
            if side in ev
        }
    if "merge" in stages:
        meta["merge"] = {k: stages["merge"].get(k) for k in ("max_logit_gap", "loss_gap")}
    meta["lineage"] = {
        "code": code_version(),
        "flow_run_id": flow_run_id,
        "data_fingerprint": keys.data_fingerprint,
        "eval_fingerprint": ev.get("eval_fingerprint") if ev else None,
        "base_model": {
            "name_or_path": cfg.model.name_or_path,
            "revision": cfg.model.revision,
            "identity": keys.model_identity,
        },
        "method": cfg.method,
        "config_hash": config_hash(cfg),
        "stage_keys": {k: getattr(keys, k) for k in ("prepare", "train", "eval", "merge", "publish")},
    }
    return meta


class CredentialInVersionError(DeltatuneError):
    """What a version would publish holds a credential; nothing was uploaded. Not retryable."""


def check_no_credentials(sources: dict[str, str], metadata: dict[str, Any]) -> None:
    """Refuse a version whose ``run_config.yaml`` (as written on disk, comments included) or manifest
    metadata holds a credential, by core/secretkeys.py's rule: the config's own validation is the first
    line, this one holds even for a file written or edited by hand after it.

    Raises:
        CredentialInVersionError: naming the file or field and the kind of credential, never the value.
    """
    problems: list[str] = []
    if CONFIG in sources:
        path = Path(sources[CONFIG])
        text = path.read_text(errors="replace")
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError:
            data = None
        found: list[Finding] = find_secrets(data) if isinstance(data, (dict, list)) else []
        found = found or text_findings(text)  # by line: a comment, or a file that is not YAML
        problems += [f"{CONFIG} ({path}) {f}" for f in found]
    problems += [f"manifest metadata {f}" for f in find_secrets(metadata)]
    if problems:
        raise CredentialInVersionError(
            "refusing to publish: "
            + "; ".join(problems)
            + ". Nothing was uploaded: a version is readable by "
            f"everyone with store access. Remove the credential from the run config and {WHERE_INSTEAD}"
        )


def publish_run(
    cfg: RunConfig, rd: RunDir, sources: dict[str, str], metadata: dict[str, Any]
) -> dict[str, Any]:
    """Publish ``sources`` as one version, resuming the version a failed attempt of the same content
    claimed (its token is kept in ``publish_state.json``) instead of claiming a new one.

    A state left for another store, model or content is ignored: that content gets a version of its own.

    Raises:
        store.PublishError: the upload stopped part-way; the state to resume it is saved (retryable).
        store.VersionExistsError: the version was taken by another publisher.
        CredentialInVersionError: run_config.yaml or the metadata holds a credential (nothing uploaded).
    """
    check_no_credentials(sources, metadata)
    p, name = cfg.publish, model_name(cfg)
    version, token = p.version, None
    state = rd.publish_state()
    if state is not None and _same_publish(state, p, name, metadata.get("content_key")):
        version, token = state["version"], state["token"]
        log.info("resuming the publish of %s/%s claimed by an earlier attempt", name, version)
    try:
        result = store.publish(
            p.store,
            name,
            sources,
            version=version,
            metadata=metadata,
            storage_options=p.storage_options,
            resume_token=token,
        )
    except store.PublishError as e:
        if e.version and e.token:
            rd.set_publish_state(
                {
                    "store": p.store,
                    "model": name,
                    "version": e.version,
                    "token": e.token,
                    "content_key": metadata.get("content_key"),
                }
            )
        raise
    rd.clear_publish_state()
    return result.to_dict()


def _same_publish(state: dict[str, Any], p: PublishConfig, name: str, content_key: str | None) -> bool:
    same = (state.get("store"), state.get("model"), state.get("content_key")) == (p.store, name, content_key)
    return same and p.version in (None, state.get("version")) and bool(state.get("token"))


def still_published(p: PublishConfig, result: Any) -> bool:
    """Whether a publish result kept from an earlier run still names a version with that very manifest
    (a deleted or re-made version is published again, never reported as done)."""
    if not isinstance(result, dict) or not {"model", "version", "manifest_sha256"} <= result.keys():
        return False
    try:
        sha = store.manifest_sha256(
            p.store, result["model"], result["version"], storage_options=p.storage_options
        )
    except store.VersionNotFoundError:
        return False
    return sha == result["manifest_sha256"]
