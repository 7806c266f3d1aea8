"""The model-registry verbs of the ``deltatune`` command: promote, rollback, versions, pull, gc.

deltatune promote MODEL VERSION --alias production [--force] [--set promote.gates.min_improvement.margin=0.1]
deltatune rollback MODEL --alias production
deltatune versions MODEL
deltatune pull MODEL@ALIAS|MODEL@VERSION DEST
deltatune gc [--older-than 24h] [--dry-run]

Each takes --store URI and --storage-option KEY=VALUE (or a JSON object), defaulting to publish.store and
publish.storage_options of --config (or of the built-in defaults). Exit status: 0 done, 1 refused or
failed, 2 bad input.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from typing import Any

from core import store
from core.config import ConfigError, RunConfig, load_config
from core.errors import DeltatuneError
from flows._help import command

VERBS = ("promote", "rollback", "versions", "pull", "gc")
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*$")
_UNIT_S = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}


class _BadInput(ValueError):
    """A command-line argument that cannot be used (exit status 2)."""


def _store_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="run config YAML whose publish.store / storage_options are the defaults")
    p.add_argument("--store", help="store URI: a local folder or s3://bucket/prefix (default: publish.store)")
    p.add_argument(
        "--storage-option",
        dest="storage_options",
        action="append",
        default=[],
        metavar="KEY=VALUE|JSON",
        help="fsspec option, e.g. client_kwargs.endpoint_url=http://127.0.0.1:9000 or a JSON object "
        "(repeatable; never credentials: they come from the environment)",
    )


def add_parsers(sub: Any) -> None:
    """Add the registry verbs to the ``deltatune`` subparsers."""
    p = command(
        sub,
        "promote",
        "gate a published version and point an alias at it (runs the promote flow)",
        "Re-hash the version's files, run its gates (promote.gates: min_improvement, no_regression, "
        "max_merge_gap, adapter_integrity) and, if every gate passes, move the alias to it by "
        "compare-and-swap: a promotion that raced another and lost fails with nothing changed. "
        "Exit status 0 promoted, 1 refused by a gate or failed, 2 bad input.",
        [
            "deltatune promote tiny-llama-word-kinds v0001 --alias production",
            "deltatune promote my-model v0003 --alias staging --set promote.gates.min_improvement.margin=0.05",
            "deltatune promote my-model v0004 --alias production --force --store s3://bucket/models",
        ],
    )
    p.add_argument("model", help="model name in the store (publish.model_name)")
    p.add_argument("version", help="published version, e.g. v0003")
    p.add_argument("--alias", required=True, help="alias to move, e.g. production")
    p.add_argument("--force", action="store_true", help="promote although a gate fails (recorded as forced)")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="gate setting, e.g. --set promote.gates.min_improvement.margin=0.1 (repeatable)",
    )
    _store_args(p)
    p = command(
        sub,
        "rollback",
        "point an alias back at its previous target",
        "Write a new generation of the alias pointing at the version it pointed at before, after "
        "re-hashing that version's files. A second rollback undoes the first.",
        ["deltatune rollback tiny-llama-word-kinds --alias production"],
    )
    p.add_argument("model", help="model name in the store")
    p.add_argument("--alias", required=True, help="alias to move back, e.g. production")
    _store_args(p)
    p = command(
        sub,
        "versions",
        "list a model's versions, key metrics and aliases",
        "List every published version of a model (those with a manifest) with its key eval metrics, "
        "and where each alias points.",
        [
            "deltatune versions tiny-llama-word-kinds",
            "deltatune versions my-model --json --store s3://bucket/models",
        ],
    )
    p.add_argument("model", help="model name in the store")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    _store_args(p)
    p = command(
        sub,
        "pull",
        "download a version, every file checked, into a new directory",
        "Download MODEL@ALIAS or MODEL@VERSION into a temporary directory beside DEST, check every "
        "file's sha256 against the manifest and rename it to DEST only when all match: a failed pull "
        "leaves no DEST.",
        [
            "deltatune pull tiny-llama-word-kinds@production ./serve/model",
            "deltatune pull my-model@v0003 ./model --store s3://bucket/models",
        ],
    )
    p.add_argument("ref", metavar="MODEL@ALIAS|MODEL@VERSION")
    p.add_argument("dest", help="directory to create (must not exist, or be empty)")
    _store_args(p)
    p = command(
        sub,
        "gc",
        "remove unfinished multipart uploads and abandoned claims",
        "Abort unfinished S3 multipart uploads under the store's prefix and remove claim-only versions "
        "(a .claim, no manifest) whose newest file is older than --older-than. A version with a "
        "manifest is never touched.",
        [
            "deltatune gc --older-than 24h --dry-run",
            "deltatune gc --store s3://bucket/models --older-than 2d",
        ],
    )
    p.add_argument("--older-than", default="24h", help="age, e.g. 24h, 90m, 2d, 3600s (default 24h)")
    p.add_argument("--dry-run", action="store_true", help="list what would be removed, remove nothing")
    _store_args(p)


def run(args: argparse.Namespace) -> int:
    """Run one registry verb; print its result on stdout, or one ``deltatune: ...`` line on stderr."""
    try:
        cfg = _config(args)
        out = _VERB[args.cmd](args, cfg)
    except (ConfigError, _BadInput) as e:
        print(f"deltatune: {e}", file=sys.stderr)
        return 2
    except DeltatuneError as e:
        print(f"deltatune: {args.cmd} failed: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    except ValueError as e:  # a bad name, reference or destination
        print(f"deltatune: {e}", file=sys.stderr)
        return 2
    except Exception as e:  # the log above holds the details; end on the one line that matters
        print(f"deltatune: {args.cmd} failed: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    print(out if isinstance(out, str) else json.dumps(out, indent=2))
    return 0


def _config(args: argparse.Namespace) -> RunConfig:
    """The run config with --store, --storage-option and (promote) --set applied: validated by the
    config's own rules (no credentials in the URI or the options)."""
    overrides = []
    if args.store is not None:
        overrides.append(f"publish.store={json.dumps(args.store)}")  # a quoted YAML string, taken as is
    for item in args.storage_options:
        if item.lstrip().startswith("{"):
            try:
                value = json.loads(item)
            except json.JSONDecodeError as e:
                raise _BadInput(f"--storage-option {item!r} is not a JSON object: {e}") from None
            if not isinstance(value, dict):
                raise _BadInput(f"--storage-option {item!r} is not a JSON object")
            overrides.append(f"publish.storage_options={json.dumps(value)}")
        elif "=" in item and item.split("=", 1)[0].strip():
            overrides.append(f"publish.storage_options.{item}")
        else:
            raise _BadInput(
                f"--storage-option takes KEY=VALUE or a JSON object, e.g. "
                f"client_kwargs.endpoint_url=http://127.0.0.1:9000 (got {item!r})"
            )
    for item in getattr(args, "overrides", []):
        if not item.startswith("promote."):
            raise _BadInput(
                f"--set on {args.cmd} takes promote.* settings, e.g. promote.gates.min_improvement.margin=0.1 (got {item!r})"
            )
        overrides.append(item)
    return load_config(args.config, overrides)


def _opts(cfg: RunConfig) -> dict[str, Any]:
    return dict(cfg.publish.storage_options)


def _promote(args: argparse.Namespace, cfg: RunConfig) -> dict[str, Any]:
    from flows.server import PrefectAPI

    api = PrefectAPI.start()  # the only verb that runs a flow: one API, started while Prefect imports
    try:
        from flows.promote import promote

        with api.session():
            record = promote(
                model=args.model,
                version=args.version,
                alias=args.alias,
                store=cfg.publish.store,
                storage_options=_opts(cfg),
                gates=cfg.promote.gates.model_dump(mode="json"),
                force=args.force,
            )
    finally:
        api.stop()
    keys = ("promoted", "model", "alias", "version", "previous", "generation", "forced")
    return {**{k: record.get(k) for k in keys}, "gates": {g["name"]: g["status"] for g in record["gates"]}}


def _rollback(args: argparse.Namespace, cfg: RunConfig) -> dict[str, Any]:
    record = store.rollback(cfg.publish.store, args.model, args.alias, storage_options=_opts(cfg))
    return {k: record[k] for k in ("model", "alias", "version", "previous", "generation", "action")}


def _versions(args: argparse.Namespace, cfg: RunConfig) -> str | list[dict[str, Any]]:
    rows = store.describe_versions(cfg.publish.store, args.model, storage_options=_opts(cfg))
    if args.json:
        return rows
    if not rows:
        return f"{args.model}: no published versions in {cfg.publish.store}"
    cols = ("version", "created_at", "method", "exact_match", "loss", "max_logit_gap", "aliases")
    cells = [[_cell(r[c]) for c in cols] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(cols)]
    lines = [cols, *cells]
    return "\n".join(
        "  ".join(v.ljust(w) for v, w in zip(line, widths, strict=True)).rstrip() for line in lines
    )


def _cell(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, list):
        return ",".join(v) or "-"
    return str(v)


def _pull(args: argparse.Namespace, cfg: RunConfig) -> dict[str, Any]:
    return store.pull(cfg.publish.store, args.ref, args.dest, storage_options=_opts(cfg))


def _gc(args: argparse.Namespace, cfg: RunConfig) -> dict[str, Any]:
    return store.gc(
        cfg.publish.store,
        older_than_s=parse_duration(args.older_than),
        storage_options=_opts(cfg),
        dry_run=args.dry_run,
    )


def parse_duration(text: str) -> float:
    """Seconds in ``24h``, ``90m``, ``2d``, ``3600s`` or ``3600``."""
    m = _DURATION.match(str(text))
    if not m:
        raise _BadInput(f"--older-than takes a duration such as 24h, 90m, 2d or 3600s (got {text!r})")
    return float(m.group(1)) * _UNIT_S[m.group(2)]


_VERB = {"promote": _promote, "rollback": _rollback, "versions": _versions, "pull": _pull, "gc": _gc}
