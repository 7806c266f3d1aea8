"""Promote a published version to an alias once its gates pass; the gates read their evidence from the store.

record = promote_version("s3://bucket/models", "tiny-lora", "v0003", "production")  # GateError if refused
record = promote_version(..., force=True)   # promoted although a gate failed; recorded as forced
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from core import store
from core.adapter import WEIGHTS_NAME
from core.config import GatesConfig
from core.gates import Baseline, Evidence, GateError, describe, failed, run_gates
from core.run import EVAL, MERGE_REPORT

log = logging.getLogger(__name__)

ADAPTER_WEIGHTS = f"adapter/{WEIGHTS_NAME}"  # where a published version keeps its adapter's tensors


def gates_config(gates: GatesConfig | Mapping[str, Any] | None) -> GatesConfig:
    """A ``GatesConfig`` from itself, a plain dict (e.g. a Prefect flow parameter) or None (defaults).

    Raises:
        pydantic.ValidationError: An unknown gate, key or value.
    """
    if isinstance(gates, GatesConfig):
        return gates
    return GatesConfig.model_validate(dict(gates or {}))


def gather_evidence(
    reader: store.VersionReader, version: str, state: store.AliasState, *, adapter: bool = True
) -> Evidence:
    """The candidate's reports (and adapter, if ``adapter``) and the alias's current target's, each file
    checked against its manifest. A current target that is gone or altered is reported on the baseline
    (promoting another version is how such an alias gets fixed), never raised."""
    current = None
    if state.version is not None:
        try:
            current = Baseline(
                state.version, reader.manifest(state.version), reader.read_json(state.version, EVAL)
            )
        except (store.VersionNotFoundError, store.IntegrityError, ValueError) as exc:
            current = Baseline(state.version, None, None, error=str(exc))
    return Evidence(
        version=version,
        manifest=reader.manifest(version),
        eval=reader.read_json(version, EVAL),
        merge_report=reader.read_json(version, MERGE_REPORT),
        adapter=reader.read(version, ADAPTER_WEIGHTS) if adapter else None,
        current=current,
    )


def promote_version(
    store_uri: str,
    model: str,
    version: str,
    alias: str,
    *,
    gates: GatesConfig | Mapping[str, Any] | None = None,
    force: bool = False,
    storage_options: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Run the gates on a published version and, if none fails (or ``force``), point ``alias`` at it.

    The alias is read once; the version's files are all re-hashed; the gates judge the candidate
    against the target read then; the alias's next generation is written only if it is still the one
    read (``store.promote``). Every gate's result is stored on that generation.

    Args:
        store_uri: Store root.
        model: Model name.
        version: A published version.
        alias: e.g. ``"production"``.
        gates: Gate settings (``promote.gates`` of a run config, or a dict of it); None: the defaults.
        force: Promote although a gate failed; the generation records ``forced: true``.
        storage_options: Passed to fsspec.

    Returns:
        The alias's new generation record (``gates`` holds each gate's result).

    Raises:
        GateError: A gate failed and ``force`` is false; ``results`` on it has every gate's result.
        store.IntegrityError / store.VersionNotFoundError: The version is altered or not published
            (``force`` does not override these).
        store.AliasConflictError: The alias moved while this promotion decided.
        store.StoreUnavailableError: The store cannot be reached; the alias is unchanged.
    """
    cfg = gates_config(gates)
    target = f"{model}/{version} to {alias!r}"

    def check(state: store.AliasState, reader: store.VersionReader) -> list[dict[str, Any]]:
        evidence = gather_evidence(reader, version, state, adapter=cfg.adapter_integrity.enabled)
        results = [r.to_dict() for r in run_gates(evidence, cfg)]
        for r in results:
            log.debug("gate %s", describe(r))
        if failed(results):
            if not force:
                raise GateError(target, results)
            log.warning("promoting %s although %d gate(s) failed (forced)", target, len(failed(results)))
        return results

    return store.promote(
        store_uri, model, version, alias, check=check, forced=force, storage_options=storage_options
    )
