"""The promote flow: gate a published version and move an alias to it (compare-and-swap on the alias's log).

deltatune promote tiny-lora v0003 --alias production          # this flow on Prefect's ephemeral API
prefect deploy --prefect-file deploy/prefect.yaml             # entrypoint flows/promote.py:promote
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from prefect import flow, get_run_logger

from core.config import RunConfig
from core.gates import GateError, describe
from core.promotion import promote_version
from core.secretkeys import secret_key_paths


@flow(name="promote")
def promote(
    model: str,
    version: str,
    alias: str,
    store: str = "./artifacts",
    storage_options: dict[str, Any] | None = None,
    gates: dict[str, Any] | None = None,
    force: bool = False,
    fail_on_gate: bool = True,
) -> dict[str, Any]:
    """Promote ``model/version`` to ``alias`` in ``store`` if its gates pass (``gates``: the
    ``promote.gates`` settings as a dict; none = the defaults); ``force`` promotes anyway, recorded.

    A refusal raises GateError, or with ``fail_on_gate`` false returns ``{"promoted": False, ...}``.
    Returns ``{"promoted": True, ...}`` with the alias's new generation record otherwise.
    """
    # Flow parameters are stored by Prefect's API: never credentials (they come from the environment).
    if found := list(secret_key_paths(storage_options or {})):
        raise ValueError(
            f"storage_options has secret-looking key(s) {', '.join(found)}: flow parameters are stored and "
            "shown by Prefect; pass credentials through the environment (AWS_ACCESS_KEY_ID, AWS_PROFILE)"
        )
    logger = get_run_logger()
    try:
        record = promote_version(
            store, model, version, alias, gates=gates, force=force, storage_options=storage_options
        )
    except GateError as e:
        for r in e.results:
            logger.info("gate %s", describe(r))
        if fail_on_gate:
            raise
        logger.warning("%s; %s stays where it was", e, alias)
        return {
            "promoted": False,
            "model": model,
            "version": version,
            "alias": alias,
            "refused": str(e),
            "gates": e.results,
        }
    for r in record["gates"]:
        logger.info("gate %s", describe(r))
    logger.info(
        "%s of %s now points at %s (was %s)%s",
        alias,
        model,
        record["version"],
        record["previous"],
        "; forced past failed gates" if record["forced"] else "",
    )
    return {"promoted": True, **record}


def promote_published(cfg: RunConfig, published: Mapping[str, Any]) -> dict[str, Any]:
    """The end of a finetune flow run: promote the version it published to ``promote.alias``.

    Runs the promote flow as a subflow. A refusal fails the run only with ``promote.fail_on_gate``.

    Args:
        cfg: The run's config (``promote.alias`` must be set).
        published: The publish stage's result (``model`` and ``version``).
    """
    if cfg.promote.alias is None:
        raise ValueError("promote.alias is not set: nothing to promote to")
    return promote(
        model=published["model"],
        version=published["version"],
        alias=cfg.promote.alias,
        store=cfg.publish.store,
        storage_options=dict(cfg.publish.storage_options),
        gates=cfg.promote.gates.model_dump(mode="json"),
        fail_on_gate=cfg.promote.fail_on_gate,
    )
