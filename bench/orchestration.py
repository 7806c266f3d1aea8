"""How much of the demo's wall time is orchestration: `deltatune run` (the Prefect flow, its API server,
task runs, persisted results) against the same stages called directly, side by side in one run.

    .venv/bin/python bench/orchestration.py --rounds 2 --steps 200
    .venv/bin/python bench/orchestration.py --rounds 2 --steps 200 --api-url http://127.0.0.1:4200/api

Both variants are fresh processes (interpreter start and imports count on both sides) doing the same
work on the same config: stage keys, prepare, train, evaluate, merge, publish (``--refresh`` makes the
flow redo every stage, and each round publishes a new version). The plain variant is the flow's body
without Prefect: core functions called in order. Orchestration share = 1 - plain / flow, the median of
per-round ratios; the variants alternate within a round, the order flipping each round. A warm-up run of
each (not timed) builds the tiny model and migrates Prefect's database first, as a user's first run does.
``--api-url`` measures against a running server (PREFECT_API_URL) instead of the temporary one.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def plain(config: str, overrides: list[str]) -> None:
    """The finetune flow's work with no Prefect: what the flow orchestrates."""
    sys.path.insert(0, str(REPO))
    from core.config import load_config
    from core.data import prepare_dataset
    from core.evaluate import evaluate
    from core.launch import run_training
    from core.merge import merge
    from core.modeling import load_tokenizer
    from core.publish import publish_run, version_metadata, version_sources
    from core.run import RunDir
    from core.stages import stage_keys

    cfg = load_config(config, overrides)
    rd = RunDir.create(cfg)
    rd.forget_training()  # as the flow's --refresh: train again, never return the last round's training
    keys = stage_keys(cfg)
    data = prepare_dataset(cfg.data, load_tokenizer(cfg.model), rd.data_dir(0))
    trained = run_training(cfg, rd.path, data.train_dir, on_line=lambda line: None)
    scores = evaluate(cfg, rd.path, data.eval_dir, trained["output_dir"])
    merged = merge(cfg, rd.path, trained["output_dir"], data.eval_dir)
    done = {
        "prepare": {"report_path": str(data.report_path), "fingerprint": data.fingerprint},
        "train": {**trained, "summary_path": str(rd.summary)},
        "eval": {**scores, "report_path": str(rd.eval_report)},
        "merge": {**merged, "report_path": str(rd.merge_report)},
    }
    publish_run(cfg, rd, version_sources(cfg, rd, done), version_metadata(cfg, done, keys, flow_run_id=None))


def timed(argv: list[str], env: dict[str, str], log: Path) -> float:
    start = time.perf_counter()
    with log.open("a") as out:
        rc = subprocess.run(argv, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT).returncode
    if rc != 0:
        sys.exit(f"{argv[2:4]} failed ({rc}); see {log}")
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--steps", type=int, default=200, help="train.max_steps of the demo")
    ap.add_argument("--api-url", help="a running Prefect server's API URL (default: a temporary one)")
    ap.add_argument("--json", help="write the measurements here")
    ap.add_argument("--plain", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)  # the child process
    args = ap.parse_args()
    if args.plain is not None:
        plain(args.plain[0], args.plain[1:])
        return
    work = Path(tempfile.mkdtemp(prefix="bench-orchestration-"))
    config = str(REPO / "deploy" / "runs" / "demo.yaml")
    sets = [
        f"train.max_steps={args.steps}",
        f"train.save_every={args.steps}",
        f"output_dir={work / 'runs'}",
        f"publish.store={work / 'artifacts'}",
        f"cache.storage={work / 'results'}",
    ]
    env = {**os.environ, "PREFECT_HOME": str(work / "prefect-home"), "PYTHONPATH": str(REPO)}
    env.pop("PREFECT_API_URL", None)
    if args.api_url:
        env["PREFECT_API_URL"] = args.api_url
    flow_argv = [sys.executable, "-m", "flows.cli", "run", config, "--refresh"]
    flow_argv += [a for kv in sets for a in ("--set", kv)]
    plain_argv = [sys.executable, str(Path(__file__).resolve()), "--plain", config, *sets]
    log = work / "bench.log"
    print(f"# work dir {work}; logs in {log}", flush=True)
    print(f"warm-up: flow {timed(flow_argv, env, log):.1f}s, plain {timed(plain_argv, env, log):.1f}s")
    rows = []
    for r in range(args.rounds):
        order = [("flow", flow_argv), ("plain", plain_argv)]
        times = {name: timed(argv, env, log) for name, argv in (order if r % 2 == 0 else order[::-1])}
        share = 1 - times["plain"] / times["flow"]
        rows.append({**times, "share": share})
        print(f"round {r}: flow {times['flow']:.1f}s  plain {times['plain']:.1f}s  orchestration {share:.1%}")
    med = statistics.median(r["share"] for r in rows)
    target = 0.15
    print(
        f"orchestration share of the demo ({args.steps} steps), median of {len(rows)} rounds: {med:.1%} "
        f"(target <= {target:.0%}: {'PASS' if med <= target else 'FAIL'})"
    )
    if args.json:
        Path(args.json).write_text(json.dumps({"steps": args.steps, "rounds": rows, "median_share": med}))


if __name__ == "__main__":
    main()
