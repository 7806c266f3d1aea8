"""The ``deltatune`` command line.

deltatune run [CONFIG] [--set key=value ...]     # the finetune flow on Prefect's ephemeral API
deltatune make-tiny-model OUT_DIR                # the offline tiny Llama + tokenizer
deltatune show-config [CONFIG] [--set ...]       # the resolved config as YAML
deltatune promote MODEL VERSION --alias NAME     # gate a version, move the alias (the promote flow)
deltatune rollback MODEL --alias NAME            # the alias back to its previous target
deltatune versions MODEL                         # versions, key metrics, aliases
deltatune pull MODEL@ALIAS|MODEL@VERSION DEST    # download, every sha256 checked
deltatune gc [--older-than 24h] [--dry-run]      # unfinished uploads and abandoned claims
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import tasks  # noqa: F401  (Prefect defaults before prefect is imported)
from core.config import ConfigError, load_config, to_yaml
from flows import registry

DEMO_CONFIG = Path(__file__).resolve().parents[1] / "deploy" / "runs" / "demo.yaml"


def _config_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "config", nargs="?", help=f"run config YAML (default: {DEMO_CONFIG.name}, the bundled demo)"
    )
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="dotted override, e.g. --set train.lr=1e-4 (repeatable)",
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="deltatune", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="cmd", required=True)
    run = sub.add_parser(
        "run",
        help="run the finetune flow (stages whose result already exists for the same content are reused)",
    )
    _config_arg(run)
    run.add_argument(
        "--refresh",
        action="store_true",
        help="rerun every stage even where a result of the same content exists (publishes a new version)",
    )
    _config_arg(sub.add_parser("show-config", help="print the resolved run config"))
    tiny = sub.add_parser(
        "make-tiny-model",
        help="build the offline tiny Llama model and tokenizer",
        description="Build the small Llama (hidden 128, 4 layers) and BPE tokenizer from bundled text, "
        "pretrain it briefly and save it with save_pretrained; the demo's builtin:tiny-llama is this model.",
    )
    tiny.add_argument("out_dir", help="directory to write (reused if it already holds the same build)")
    tiny.add_argument(
        "--pretrain-steps",
        type=int,
        default=None,
        help="pretraining steps (default 400, about 40 s on 2 cores)",
    )
    registry.add_parsers(sub)
    args = parser.parse_args(argv)
    if bad := [o for o in getattr(args, "overrides", []) if "=" not in o]:
        parser.error(f"--set takes KEY=VALUE in one argument, e.g. --set train.lr=1e-4 (got {bad[0]!r})")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per Prefect API call otherwise

    if args.cmd == "make-tiny-model":
        from core.tiny import make_tiny_model

        kwargs = {} if args.pretrain_steps is None else {"pretrain_steps": args.pretrain_steps}
        print(make_tiny_model(args.out_dir, **kwargs))
        return 0
    if args.cmd in registry.VERBS:
        return registry.run(args)
    config = args.config or str(DEMO_CONFIG)
    try:
        cfg = load_config(config, args.overrides)
    except ConfigError as e:
        print(f"deltatune: {e}", file=sys.stderr)
        return 2
    if args.cmd == "show-config":
        print(to_yaml(cfg), end="")
        return 0
    from flows.finetune import finetune

    try:
        result = finetune(config=config, overrides=args.overrides, refresh=args.refresh)
    except Exception as e:  # the flow's log above holds the traceback; end on the one line that matters
        print(f"deltatune: run failed: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    print(json.dumps(_brief(result), indent=2))
    return 0


def _brief(result: dict) -> dict:
    out = {
        "run_dir": result["run_dir"],
        "stages": result["stages"],  # which stages ran and which were reused ("cached")
        "train": {k: result["train"].get(k) for k in ("steps", "final_loss", "wall_time_s")},
    }
    if "eval" in result:
        out["exact_match"] = {
            s: result["eval"][s]["exact_match"] for s in ("base", "tuned") if s in result["eval"]
        }
    if "merge" in result:
        out["merge_max_logit_gap"] = result["merge"].get("max_logit_gap")
    if "publish" in result:
        out["published"] = result["publish"]["uri"]
    return out


if __name__ == "__main__":
    sys.exit(main())
