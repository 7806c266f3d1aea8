"""The sweep flow: variants of one run config trained, scored and merged side by side, then one table,
two pictures and a recommendation: the LoRA-vs-full comparison measured on your model and data.

deltatune sweep deploy/runs/demo.yaml --set train.max_steps=100      # the default variants
deltatune sweep my-run.yaml --publish best                           # and publish the recommended one

Each variant is a finetune subflow (its own run name, publish off): the dataset is prepared once and
reused by every variant through the stage cache, and a rerun of the sweep reuses every finished variant.
A variant that fails is a row of the table, not the end of the sweep.
"""

from __future__ import annotations

import contextvars
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Literal

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from core.config import RunConfig, SweepVariant, load_config
from core.secretkeys import ConfigRef, Override
from core.sweep import COLUMNS, failed_row, recommend, to_markdown, variant_row, write_outputs
from flows.finetune import finetune
from tasks._report import slug
from tasks.sweep import measure_latency_task


def variant_overrides(base: RunConfig, variant: SweepVariant, overrides: list[str]) -> list[str]:
    """The finetune overrides of one variant: the sweep's own, the variant's, its run name; unpublished."""
    return [*overrides, *variant.overrides, f"name={base.name}-{variant.name}", "publish.enabled=false"]


def _run_variant(config: str | None, base: RunConfig, variant: SweepVariant, overrides: list[str]) -> dict:
    ov = variant_overrides(base, variant, overrides)
    try:
        cfg = load_config(config, ov)
    except Exception as e:  # a variant the config refuses (e.g. DoRA under ZeRO-3): a failed row
        return failed_row(variant.name, None, f"{type(e).__name__}: {e}")
    state = finetune(config=config, overrides=ov, return_state=True)
    if not state.is_completed():
        try:
            state.result()
        except Exception as e:  # noqa: BLE001 - the error is the row's, the sweep goes on
            return failed_row(variant.name, cfg, f"{type(e).__name__}: {e}")
        return failed_row(variant.name, cfg, state.message or state.name)
    result = state.result()
    latency = measure_latency_task(result["run_dir"], result)
    return variant_row(variant.name, cfg, result, result["preflight"]["trainable_formula"], latency)


@flow(name="sweep")
def sweep(
    config: ConfigRef | None = None,
    overrides: list[Override] | None = None,
    publish: Literal["none", "best"] = "none",
) -> dict[str, Any]:
    """Run every variant of ``sweep.variants`` on the run config (a YAML path; none = the bundled demo).

    ``publish="best"`` then runs the recommended variant's finetune flow again with publishing on: its
    stages are reused, so it only publishes (and, with ``promote.alias``, promotes through the gates).
    Returns the rows, the recommendation and the paths of the table and pictures.
    """
    logger = get_run_logger()
    overrides = list(overrides or [])
    base = load_config(config, overrides)
    variants = base.sweep.variants
    logger.info("sweep %s: %d variants, %d at a time", base.name, len(variants), base.sweep.concurrency)
    if base.sweep.concurrency == 1:
        rows = [_run_variant(config, base, v, overrides) for v in variants]
    else:  # subflows in threads, each in a copy of this flow's context (its parent run)
        with ThreadPoolExecutor(base.sweep.concurrency) as pool:
            futures = [
                pool.submit(contextvars.copy_context().run, _run_variant, config, base, v, overrides)
                for v in variants
            ]
            rows = [f.result() for f in futures]
    rec = recommend(rows, base.sweep)
    out_dir = base.run_dir.parent / f"{base.name}-sweep"
    paths = write_outputs(rows, rec, out_dir)
    for w in rec["warnings"]:
        logger.warning("sweep: %s", w)
    logger.info("sweep: recommended %s (%s); table %s", rec["variant"], rec.get("reason"), paths["markdown"])
    key = slug(f"sweep-{base.name}")
    create_table_artifact(
        [{h: r.get(k) for k, h, _ in COLUMNS} for r in rows], key=key, description=f"sweep of {base.name}"
    )
    pictures = "\n".join(f"- {name}: `{p}`" for name, p in paths.items())
    create_markdown_artifact(
        f"# Sweep of {base.name}\n\n" + to_markdown(rows, rec) + f"\nFiles:\n{pictures}\n",
        key=f"{key}-summary",
    )
    out: dict[str, Any] = {"rows": rows, "recommendation": rec, "paths": paths}
    if publish == "best" and rec["variant"]:
        best = next(v for v in variants if v.name == rec["variant"])
        ov = [o for o in variant_overrides(base, best, overrides) if o != "publish.enabled=false"]
        out["published"] = finetune(config=config, overrides=ov).get("publish")
    return out
