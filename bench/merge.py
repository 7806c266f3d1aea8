"""Streaming (shard-wise) vs in-memory merge: peak RSS and wall time, each merge in its own fresh process.

.venv/bin/python bench/merge.py --rounds 3 --json /tmp/merge.json

A Llama built from config (~136 M parameters, ~545 MB of fp32 weights) is saved in 128 MB shards with a
perturbed LoRA adapter on every linear layer but the head; the two modes then merge it alternately (the
order flips each round), each in a new interpreter so that its peak RSS is its own. Peak RSS is the merge's
(core.merge.gap.peak_rss: the kernel's VmHWM reset at the start, plus a sampler), printed as the process
peak and as what the merge added above the RSS it started at (imports of torch and transformers: ~0.5 GB).
Ratios are streaming / in_memory, medians over rounds. PASS/FAIL: process peak RSS ratio <= 0.6; time is
printed for information. Not a test: it prints.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run from a checkout without installing

from core.adapter import save_adapter  # noqa: E402
from core.config import LoraConfig  # noqa: E402
from core.lora import inject_lora, lora_modules  # noqa: E402

MODES = ("streaming", "in_memory")
TARGET_RSS = 0.6
SPEC = dict(
    hidden_size=1024,
    intermediate_size=2816,
    num_hidden_layers=8,
    num_attention_heads=16,
    num_key_value_heads=16,
    vocab_size=16000,
    max_position_embeddings=512,
    tie_word_embeddings=False,
)
TARGETS = r".*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"

_CHILD = """
import json, sys, time
sys.path.insert(0, {repo!r})
t0 = time.perf_counter()
from core.config import load_config
from core.merge import merge_weights
from core.merge.sharded import skeleton
skeleton({base!r})  # imports and lazy modules of both modes, before the merge's RSS is counted
cfg = load_config(overrides=["model.name_or_path=" + {base!r}, "merge.mode={mode}", "merge.max_shard_size={shard}"])
info = merge_weights(cfg, {adapter!r}, {out!r})
info["process_seconds"] = time.perf_counter() - t0
print(json.dumps(info))
"""


def build(root: Path, shard: str) -> tuple[Path, Path, int]:
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**SPEC)).float()
    n_params = sum(p.numel() for p in model.parameters())
    model.save_pretrained(root / "base", max_shard_size=shard)
    lcfg = LoraConfig(r=16, target_modules=TARGETS)
    inject_lora(model, lcfg)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for _, m in lora_modules(model):
            m.lora_B.weight.copy_(torch.randn(m.lora_B.weight.shape, generator=g) * 0.01)
    save_adapter(model, root / "adapter", lcfg, base_model=str(root / "base"))
    return root / "base", root / "adapter", n_params


def run_one(mode: str, base: Path, adapter: Path, out: Path, shard: str) -> dict:
    code = _CHILD.format(
        repo=str(REPO), base=str(base), mode=mode, adapter=str(adapter), out=str(out), shard=shard
    )
    t0 = time.perf_counter()
    # MALLOC_MMAP_THRESHOLD_: freed tensors leave RSS at once, so the peak is the merge's (docs/environment.md)
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    if res.returncode:
        raise SystemExit(f"{mode} merge failed:\n{res.stderr[-3000:]}")
    info = json.loads(res.stdout.strip().splitlines()[-1])
    info["wall_seconds"] = time.perf_counter() - t0
    shutil.rmtree(out, ignore_errors=True)
    return info


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--shard", default="128MB", help="shard size of the base and of the merged output")
    ap.add_argument("--workdir", default=None, help="where the model is built (default: a temp dir)")
    ap.add_argument("--json", default=None, help="write the raw figures here")
    args = ap.parse_args(argv)

    root = Path(args.workdir or tempfile.mkdtemp(prefix="bench-merge-"))
    base, adapter, n_params = build(root, args.shard)
    n_shards = len(list(base.glob("model-*.safetensors")))
    print(
        f"bench/merge.py  {platform.node()}  load {os.getloadavg()[0]:.2f}  torch {torch.__version__}  "
        f"{n_params / 1e6:.0f} M params, {n_params * 4 / 1e6:.0f} MB fp32 in {n_shards} shards of {args.shard}"
    )
    rows: dict[str, list[dict]] = {m: [] for m in MODES}
    for r in range(args.rounds):
        for mode in MODES if r % 2 == 0 else MODES[::-1]:
            info = run_one(mode, base, adapter, root / f"out-{mode}", args.shard)
            rows[mode].append(info)
            print(
                f"  round {r} {mode:>9}: peak {info['peak_rss_mb']:7.0f} MB (+{info['peak_rss_delta_mb']:6.0f} MB "
                f"above start), merge {info['merge_seconds']:6.2f} s, process {info['process_seconds']:6.2f} s"
            )

    def ratio(key: str) -> float:
        return statistics.median(
            s[key] / m[key] for s, m in zip(rows["streaming"], rows["in_memory"], strict=True)
        )

    def med(mode: str, key: str) -> float:
        return statistics.median(x[key] for x in rows[mode])

    figures = {
        "peak_rss_ratio": ratio("peak_rss_mb"),
        "peak_rss_delta_ratio": ratio("peak_rss_delta_mb"),
        "merge_time_ratio": ratio("merge_seconds"),
        "process_time_ratio": ratio("process_seconds"),
    }
    print(f"\n{'':28}{'streaming':>12}{'in_memory':>12}{'ratio':>9}")
    for label, key, rkey in (
        ("peak RSS (MB)", "peak_rss_mb", "peak_rss_ratio"),
        ("RSS above start (MB)", "peak_rss_delta_mb", "peak_rss_delta_ratio"),
        ("merge time (s)", "merge_seconds", "merge_time_ratio"),
        ("process time (s)", "process_seconds", "process_time_ratio"),
    ):
        verdict = (
            ("PASS" if figures[rkey] <= TARGET_RSS else "FAIL") if rkey == "peak_rss_ratio" else "(info)"
        )
        target = f"target <= {TARGET_RSS}" if rkey == "peak_rss_ratio" else ""
        print(
            f"{label:28}{med('streaming', key):12.2f}{med('in_memory', key):12.2f}{figures[rkey]:9.3f}  {verdict} {target}"
        )
    if args.json:
        Path(args.json).write_text(
            json.dumps({"figures": figures, "rows": rows, "params": n_params}, indent=2)
        )
    if not args.workdir:
        shutil.rmtree(root, ignore_errors=True)
    return 0 if figures["peak_rss_ratio"] <= TARGET_RSS else 1


if __name__ == "__main__":
    raise SystemExit(main())
