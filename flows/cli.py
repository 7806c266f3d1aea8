"""The ``deltatune`` command: run the finetune flow, inspect configs, manage published versions.

Every subcommand's ``--help`` has a description and examples (flows/_help.py). Commands that run a flow
(``run``, ``promote``) use one Prefect API per process (flows/server.py): ``$PREFECT_API_URL`` if set,
else a temporary local server that starts while the flow's code is imported and dies with the process.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import tasks  # noqa: F401  (Prefect defaults before prefect is imported)
from core.config import ConfigError, load_config, to_yaml
from flows import deployments, registry
from flows._help import command
from flows.server import PrefectAPI

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


DESCRIPTION = """\
Fine-tune language models with one Prefect flow: prepare, train (LoRA, QLoRA, or full fine-tuning
under DeepSpeed ZeRO), merge, evaluate, publish. Stages already done for the same content are reused.

With no config, `deltatune run` runs the bundled demo (a tiny offline model, a few minutes on a CPU).
Flows report to the Prefect server that PREFECT_API_URL names, else to a temporary local one.
"""

EXAMPLES = """\
examples:
  deltatune run                                        the bundled demo
  deltatune run deploy/runs/llama3-8b-lora-gpu.yaml --set lora.r=16 --set train.lr=1e-4
  deltatune show-config deploy/runs/demo.yaml          the resolved config, defaults filled in
  deltatune prepare --show 3                           prepare the data, print 3 rows as trained
  deltatune versions tiny-llama-word-kinds             published versions and aliases
  deltatune promote tiny-llama-word-kinds v0001 --alias production
  deltatune COMMAND --help                             one command's options and examples
"""


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="deltatune",
        description=DESCRIPTION,
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="cmd", required=True, metavar="COMMAND")
    run = command(
        sub,
        "run",
        "run the finetune flow: prepare, train, merge, evaluate, publish",
        "Run the finetune flow on a run config (default: the bundled demo, deploy/runs/demo.yaml). "
        "Each stage is keyed by the content that determines it: a stage whose result already exists "
        "for the same content is reused, so running the same config again publishes nothing new and "
        "prints the version already published. Output: which stages ran and which were reused, the "
        "training and evaluation figures, and the published version's URI.\n\n"
        "Flows report to the Prefect server that PREFECT_API_URL names (`prefect server start`, or "
        "Prefect Cloud); without one, to a temporary local server that lives as long as this command.",
        [
            "deltatune run",
            "deltatune run deploy/runs/demo.yaml --set train.max_steps=50",
            "deltatune run my-run.yaml --set data.path=s3://bucket/train.jsonl --set lora.r=16",
            "deltatune run my-run.yaml --refresh",
            "PREFECT_API_URL=http://127.0.0.1:4200/api deltatune run my-run.yaml",
        ],
    )
    _config_arg(run)
    run.add_argument(
        "--refresh",
        action="store_true",
        help="rerun every stage even where a result of the same content exists (publishes a new version)",
    )
    sweep = command(
        sub,
        "sweep",
        "train, score and merge variants of a run config side by side (ranks, targets, QLoRA, full)",
        "Run the sweep flow: every variant in the config's sweep.variants (default: LoRA r = 1, 4, 8, "
        "16, 64 on the attention projections, r = 16 on every linear layer, QLoRA r = 16, full "
        "fine-tuning) is a finetune run of its own, on the same data, steps and seed, scored on the "
        "same eval rows and merged with its gap measured. The dataset is prepared once. Output: a table "
        "(trainable parameters and share checked against r·(d+k), peak memory, time, tokens/s, delta "
        "size, eval loss, task metric, merge gap, forgetting, merged latency), two PNGs and a "
        "recommendation, in <output_dir>/<name>-sweep/ and as Prefect artifacts. A failed variant is a "
        "row of the table. Variants publish nothing unless --publish best.",
        [
            "deltatune sweep --set train.max_steps=100",
            "deltatune sweep my-run.yaml --set sweep.tolerance=0.05",
            "deltatune sweep my-run.yaml --publish best",
        ],
    )
    _config_arg(sweep)
    sweep.add_argument(
        "--publish",
        choices=["none", "best"],
        default="none",
        help="best: publish (and with promote.alias, promote) the recommended variant (default: none)",
    )
    show = command(
        sub,
        "show-config",
        "print the resolved run config as YAML",
        "Load a run config (default: the bundled demo), apply --set overrides, validate it and print "
        "the result with every default filled in: what `deltatune run` would run. Bad keys and "
        "values are errors that name the field (exit status 2).",
        [
            "deltatune show-config",
            "deltatune show-config deploy/runs/llama3-8b-qlora-gpu.yaml --set lora.r=32",
        ],
    )
    _config_arg(show)
    check = command(
        sub,
        "check",
        "check a run config against its model's architecture, without training",
        "Load a run config (default: the bundled demo), build its model from config.json on the meta "
        "device (no weights are loaded) and check what the train stage would hit minutes later: which "
        "modules LoRA adapts (printed with the rule that chose them), target names that match "
        "nothing, ranks, and the layers 4-bit quantization cannot take. `deltatune run` runs the same "
        "check before it prepares any data. Exit status 2 when the config does not fit the model.",
        [
            "deltatune check deploy/runs/llama3-8b-qlora-gpu.yaml",
            "deltatune check --set model.name_or_path=microsoft/Phi-3-mini-4k-instruct --set lora.strict_targets=true",
        ],
    )
    _config_arg(check)
    prep = command(
        sub,
        "prepare",
        "prepare the data as the run would, and show rows with the trained tokens marked",
        "Run the prepare stage of a run config (default: the bundled demo) without training and "
        "without a Prefect server: validate and tokenise the data into the run directory's data/ "
        "(train/, eval/, prepare_report.json), reusing the data cache as `deltatune run` does. Output: "
        "rows kept per split, rows rejected by reason, rows truncated, whether the cache was hit, and "
        "the report's path; with --show N, the first N training rows decoded, the tokens the loss "
        "trains on between ⟦ and ⟧ (coloured on a terminal), with their token counts "
        "(docs/data.md). Exit status 2 when the config does not fit the model (e.g. data.max_seq_len "
        "above its context length), 1 when the data is refused.",
        [
            "deltatune prepare --show 3",
            "deltatune prepare my-run.yaml --set data.max_seq_len=256 --show 5",
            "deltatune prepare my-run.yaml --show 2 --color never | less",
        ],
    )
    _config_arg(prep)
    prep.add_argument(
        "--show",
        type=_rows,
        default=0,
        metavar="N",
        help="print the first N rows of the train split, trained tokens marked (default: 0)",
    )
    prep.add_argument(
        "--color",
        choices=["auto", "always", "never"],
        default="auto",
        help="mark trained tokens in colour (auto: on a terminal, unless NO_COLOR is set) or with ⟦ ⟧",
    )
    tiny = command(
        sub,
        "make-tiny-model",
        "build the offline tiny Llama model and tokenizer",
        "Build the small Llama (hidden 128, 4 layers) and BPE tokenizer from bundled text, pretrain it "
        "briefly and save it with save_pretrained; the demo's builtin:tiny-llama is this model. "
        "Useful to try deltatune, or to test a pipeline, without downloading a model.",
        ["deltatune make-tiny-model ./tiny", "deltatune make-tiny-model ./tiny --pretrain-steps 50"],
    )
    tiny.add_argument("out_dir", help="directory to write (reused if it already holds the same build)")
    tiny.add_argument(
        "--pretrain-steps",
        type=int,
        default=None,
        help="pretraining steps (default 400, about 40 s on 2 cores)",
    )
    registry.add_parsers(sub)
    deployments.add_parsers(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
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
    if args.cmd in deployments.VERBS:
        return deployments.run(args)
    config = args.config or str(DEMO_CONFIG)
    try:
        cfg = load_config(config, args.overrides)
    except ConfigError as e:
        print(f"deltatune: {e}", file=sys.stderr)
        return 2
    if args.cmd == "show-config":
        print(to_yaml(cfg), end="")
        return 0
    if args.cmd == "check":
        from core.preflight import PreflightError, preflight

        try:
            print(json.dumps(preflight(cfg), indent=2))
        except PreflightError as e:
            print(f"deltatune: {e}", file=sys.stderr)
            return 2
        return 0
    if args.cmd == "prepare":
        return _prepare(cfg, args.show, args.color)
    api = PrefectAPI.start()  # boots while the flow's code (torch, transformers, ...) is imported
    try:
        _warm_up(cfg)
        if args.cmd == "sweep":
            from flows.sweep import sweep

            with api.session():
                result = sweep(config=config, overrides=args.overrides, publish=args.publish)
        else:
            from flows.finetune import finetune

            with api.session():
                result = finetune(config=config, overrides=args.overrides, refresh=args.refresh)
    except Exception as e:  # the flow's log above holds the traceback; end on the one line that matters
        print(f"deltatune: {args.cmd} failed: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    finally:
        api.stop()
    if args.cmd == "sweep":
        from core.sweep import to_markdown

        print(to_markdown(result["rows"], result["recommendation"]))
        print(json.dumps({"paths": result["paths"], "published": result.get("published")}, indent=2))
        return 0
    print(json.dumps(_brief(result), indent=2))
    return 0


def _prepare(cfg, show: int, color: str) -> int:
    """`deltatune prepare`: the prepare stage's own call (tasks/prepare.py) on the run directory, no flow."""
    from core.data import load_split, prepare_dataset
    from core.data.show import render_sample, summarize, use_color
    from core.modeling import load_tokenizer
    from core.preflight import PreflightError, check_context
    from core.run import PREPARE_REPORT, RunDir

    report = RunDir.for_config(cfg).data_dir(0) / PREPARE_REPORT
    before = report.stat().st_mtime_ns if report.is_file() else None  # a report of an earlier prepare
    try:
        check_context(cfg)  # before anything is written: the run would refuse this config too
        rd = RunDir.create(cfg)
        cfg = rd.config()  # the resolved config, as the prepare stage reads it back
        tokenizer = load_tokenizer(cfg.model)
        data = prepare_dataset(cfg.data, tokenizer, rd.data_dir(0))
    except PreflightError as e:
        print(f"deltatune: {e}", file=sys.stderr)
        return 2
    except Exception as e:  # the log above holds the details; end on the one line that matters
        fresh = report.is_file() and report.stat().st_mtime_ns != before
        where = f" (report: {report})" if fresh else ""
        print(f"deltatune: prepare failed: {type(e).__name__}: {e}{where}", file=sys.stderr)
        return 1
    print(summarize(json.loads(data.report_path.read_text()), data.report_path))
    if show:
        train = load_split(data.train_dir)
        colored = use_color(sys.stdout, color)
        for i in range(min(show, len(train))):
            print(f"\n--- train row {i + 1} of {len(train)} ---")
            print(render_sample(train[i], tokenizer, color=colored))
    return 0


def _rows(value: str) -> int:
    """argparse type of --show: a number of rows, 0 or more."""
    if not value.isdigit():
        raise argparse.ArgumentTypeError(f"takes a number of rows, 0 or more (got {value!r})")
    return int(value)


def _warm_up(cfg) -> None:
    """The flow's first work, done while the temporary Prefect server still boots (bench/orchestration.py
    measured it idle for ~2 s of a ~10 s boot): load the tokenizer, which imports its transformers and
    tokenizers modules (~3 s the first time in a process, ~0.05 s after). A failure is the flow's to
    report, with its own message: ignored here."""
    from core.modeling import load_tokenizer

    try:
        load_tokenizer(cfg.model)
    except Exception:  # noqa: BLE001
        pass


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
