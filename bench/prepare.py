"""Prepare at scale: rows/s of the prepare stage against a plain ``datasets.map(batched=True)`` of the same
tokenizer on the same texts, and the peak RSS of preparing 1 M rows; each run in its own fresh process.

.venv/bin/python bench/prepare.py                       # 100k rows side by side, then 1M rows for RSS
.venv/bin/python bench/prepare.py --rows 20000 --big 0  # other sizes (--big 0: skip the RSS run)

The rows are alpaca rows (instruction, optional input, output) of random words, median ~70 tokens with the
builtin tiny-llama tokenizer (``builtin:tiny-llama``, built on first use). ``ours``: core.data.prepare_dataset
(stream the file into Arrow, tokenise with core.data.Encoder in batches in data.num_proc processes (auto),
validate, dedupe, split, save). ``plain``: ``datasets.Dataset.from_json`` then ``.map(batched=True,
num_proc=same)`` tokenising the rendered prompt + output in one call per batch, nothing checked or masked.
Peak RSS is ``resource.getrusage`` SELF + CHILDREN (the largest worker) of the run's process, an upper
bound of the tree's peak. PASS/FAIL: 1M-row peak RSS < 1 GiB; the rows/s ratio is printed for information.
Not a test: it prints.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TARGET_RSS_MB = 1024
WORDS = (
    "the a of to and in is it you that he was for on are with as his they be at one have this from or had by "
    "word but what some we can out other were all there when up use your how said an each she which do their "
    "time if will way about many then them write would like so these her long make thing see him two has look "
    "more day could go come did number sound no most people my over know water than call first who may down"
).split()

_CHILD = """
import json, resource, sys, time
sys.path.insert(0, {repo!r})
import os, threading
t0 = time.perf_counter()

def _pss_kb(pid):
    try:
        with open(f"/proc/{{pid}}/smaps_rollup") as f:
            return next(int(l.split()[1]) for l in f if l.startswith("Pss:"))
    except (OSError, StopIteration):
        return 0

def _tree(pid):
    out = [pid]
    try:
        for task in os.listdir(f"/proc/{{pid}}/task"):
            with open(f"/proc/{{pid}}/task/{{task}}/children") as f:
                out += [q for c in f.read().split() for q in _tree(int(c))]
    except OSError:
        pass
    return out

peak_pss = [0]
def _sample():
    while True:
        peak_pss[0] = max(peak_pss[0], sum(_pss_kb(p) for p in _tree(os.getpid())))
        time.sleep(0.1)

threading.Thread(target=_sample, daemon=True).start()
import datasets
from core.config import DataConfig, ModelConfig
from core.modeling import load_tokenizer
tok = load_tokenizer(ModelConfig())
t1 = time.perf_counter()
base_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
if {mode!r} == "ours":
    from core.data import prepare_dataset
    from core.data.prepare import num_proc_for
    cfg = DataConfig(path={data!r}, eval_fraction=0.01, max_seq_len=256)  # the context of builtin:tiny-llama
    prep = prepare_dataset(cfg, tok, {out!r}, cache_dir={cache!r})
    report = json.loads(prep.report_path.read_text())
    rows, nproc = report["total"], report["num_proc"]
else:
    from core.data import PROMPT_TEMPLATE_ALPACA, PROMPT_TEMPLATE_ALPACA_NO_INPUT
    from core.data.prepare import num_proc_for
    datasets.utils.disable_progress_bars()
    ds = datasets.Dataset.from_json({data!r}, cache_dir={cache!r})
    nproc = num_proc_for(DataConfig(), len(ds))

    def tokenise(b):
        texts = [
            (PROMPT_TEMPLATE_ALPACA.format(instruction=i, input=x) if x else
             PROMPT_TEMPLATE_ALPACA_NO_INPUT.format(instruction=i)) + o
            for i, x, o in zip(b["instruction"], b["input"], b["output"])
        ]
        return tok(texts)

    ds = ds.map(tokenise, batched=True, num_proc=nproc if nproc > 1 else None, remove_columns=ds.column_names)
    rows = len(ds)
seconds = time.perf_counter() - t1
rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss + resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
print(json.dumps({{"mode": {mode!r}, "rows": rows, "seconds": seconds, "setup_seconds": t1 - t0,
                  "num_proc": nproc, "peak_rss_mb": rss / 1024, "base_rss_mb": base_rss / 1024,
                  "peak_pss_mb": peak_pss[0] / 1024}}))
"""


def make_rows(path: Path, n: int, seed: int = 0) -> int:
    """``n`` distinct alpaca rows of random words (every tenth with an input); returns the file size."""
    rng = random.Random(seed)
    with path.open("w") as f:
        for i in range(n):
            row = {
                "instruction": f"{i} " + " ".join(rng.choices(WORDS, k=rng.randint(5, 30))),
                "input": " ".join(rng.choices(WORDS, k=rng.randint(3, 20))) if i % 10 == 0 else "",
                "output": " ".join(rng.choices(WORDS, k=int(rng.lognormvariate(3.5, 0.6)) + 1)),
            }
            f.write(json.dumps(row) + "\n")
    return path.stat().st_size


def run(mode: str, data: Path, root: Path) -> dict:
    code = _CHILD.format(
        repo=str(REPO),
        mode=mode,
        data=str(data),
        out=str(root / f"out-{mode}"),
        cache=str(root / f"cache-{mode}"),
    )
    env = {**os.environ, "DELTATUNE_LOG_LEVEL": "WARNING", "HF_DATASETS_CACHE": str(root / "hf")}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    if proc.returncode:
        sys.exit(f"{mode} failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=100_000, help="rows of the side-by-side throughput run")
    ap.add_argument("--big", type=int, default=1_000_000, help="rows of the peak-RSS run (0: skip it)")
    ap.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = ap.parse_args()
    print(
        f"machine: {platform.machine()}, nproc {os.cpu_count()}, load {os.getloadavg()}, python {platform.python_version()}"
    )
    results: dict = {}
    head = (
        "| variant | rows | seconds | rows/s | num_proc | peak RSS MiB (SELF+CHILDREN) | of it at start "
        "(imports, tokenizer) | peak tree PSS MiB |\n|---|---:|---:|---:|---:|---:|---:|---:|"
    )

    def line(mode: str, r: dict) -> str:
        return (
            f"| {mode} | {r['rows']:,} | {r['seconds']:.1f} | {r['rows'] / r['seconds']:,.0f} | {r['num_proc']} "
            f"| {r['peak_rss_mb']:.0f} | {r['base_rss_mb']:.0f} | {r['peak_pss_mb']:.0f} |"
        )

    with tempfile.TemporaryDirectory(prefix="bench-prepare-") as tmp:
        root = Path(tmp)
        data = root / "rows.jsonl"
        size = make_rows(data, args.rows)
        print(f"\n{args.rows:,} rows, {size / 2**20:.1f} MiB of JSON lines\n{head}")
        for mode in ("ours", "plain"):
            results[mode] = run(mode, data, root)
            print(line(mode, results[mode]))
        ours, plain = results["ours"], results["plain"]
        ratio = (ours["rows"] / ours["seconds"]) / (plain["rows"] / plain["seconds"])
        results["ratio"] = ratio
        verdicts = [f"| rows/s ours / plain, {args.rows:,} rows | {ratio:.3f} | - | (info) |"]
        if args.big:
            data.unlink()
            size = make_rows(data, args.big, seed=1)
            r = results["big"] = run("ours", data, root)
            print(f"\n{args.big:,} rows, {size / 2**20:.0f} MiB of JSON lines\n{head}\n{line('ours', r)}")
            ok = r["peak_rss_mb"] < TARGET_RSS_MB
            verdicts.append(
                f"| peak RSS MiB (SELF+CHILDREN), {args.big:,} rows | {r['peak_rss_mb']:.0f} | < {TARGET_RSS_MB} "
                f"| {'PASS' if ok else 'FAIL'} |"
            )
            verdicts.append(f"| peak tree PSS MiB, {args.big:,} rows | {r['peak_pss_mb']:.0f} | - | (info) |")
        print("\n| figure | value | target | result |\n|---|---:|---:|---|\n" + "\n".join(verdicts))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
