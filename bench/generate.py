"""Greedy generation speed: batched vs one row at a time, and merged / unmerged-adapter latency vs the base.

.venv/bin/python bench/generate.py --rounds 7 --new 32 --json /tmp/generate.json

CPU, fp32, a hidden-256 Llama built from config, through core.evaluate.greedy_generate (left padding, KV cache;
EOS off, so every row makes --new tokens). Every variant runs once per round, interleaved (order rotated each
round), after one untimed warm-up each; a ratio is the median over rounds of the per-round ratio. Each call is
timed by thread CPU time (time.thread_time(); torch on this one thread), which PASS/FAIL reads, and by wall.
Not a test: it prints.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from core.config import LoraConfig  # noqa: E402
from core.evaluate import greedy_generate  # noqa: E402
from core.lora import inject_lora, lora_modules, merge_and_unload  # noqa: E402

MODEL = dict(
    hidden_size=256,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=4,
    intermediate_size=704,
    vocab_size=2048,
)
R, ALPHA = 8, 16.0  # LoRA of the default targets (every attention and MLP projection), and of q,k,v,o
BATCH = 16
CLOCKS = ("cpu", "wall")

# (name, numerator, denominator, target or None, higher_is_better): ratio = time(numerator) / time(denominator)
# for the same tokens, so the batched speed-up is time(one-by-one) / time(batched).
TARGETS = [
    ("batched tokens/s ÷ one-by-one (batch 16)", "one_by_one", "batched", 4.0, True),
    ("merged latency ÷ base", "merged", "base", 1.02, False),
    ("unmerged adapter latency ÷ base", "adapter", "base", 1.20, False),
    ("unmerged adapter (q,k,v,o) latency ÷ base", "adapter_qkvo", "base", 1.20, False),
    # No target: a deep copy of the base times like the base, so this is the noise of a latency ratio.
    ("base copy latency ÷ base (noise floor)", "base_copy", "base", None, False),
]


class IdsOnly:
    """The tokenizer greedy_generate needs, without a vocabulary: pad 0, no EOS, counts generated tokens."""

    pad_token_id = 0
    eos_token_id = None

    def __init__(self) -> None:
        self.tokens = 0
        self.last: list[list[int]] = []

    def batch_decode(self, ids: torch.Tensor, skip_special_tokens: bool = True) -> list[str]:
        self.tokens += ids.numel()  # (B, new)
        self.last = ids.tolist()
        return [""] * ids.shape[0]


def build_base(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        **MODEL, max_position_embeddings=512, tie_word_embeddings=False, attn_implementation="sdpa"
    )
    model = LlamaForCausalLM(cfg).float().eval()
    model.generation_config.eos_token_id = None  # every row generates --new tokens
    return model


def with_adapter(base: nn.Module, targets: list[str] | str = "attention-mlp") -> nn.Module:
    """Our LoRA on a copy of the base, B perturbed (a zero B would change nothing), adapters active."""
    model = copy.deepcopy(base)
    inject_lora(model, LoraConfig(r=R, alpha=ALPHA, dropout=0.0, target_modules=targets))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for _, m in lora_modules(model):
            m.lora_B.weight.copy_(torch.randn(m.lora_B.weight.shape, generator=g) * 0.02)
    return model.eval()


def prompts(n: int, seed: int = 0) -> list[list[int]]:
    """``n`` random prompts of lengths 8, 10, ..., so a batch needs left padding."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, MODEL["vocab_size"], (8 + 2 * i,), generator=g).tolist() for i in range(n)]


def timed(fn: Callable[[], None]) -> dict[str, float]:
    c0, w0 = time.thread_time(), time.perf_counter()
    fn()
    return {"cpu": time.thread_time() - c0, "wall": time.perf_counter() - w0}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--new", type=int, default=32, help="new tokens per row")
    ap.add_argument("--latency-prompts", type=int, default=8, help="latency prompts, one at a time")
    ap.add_argument("--threads", type=int, default=1, help="torch threads; 1 is steadiest on a shared box")
    ap.add_argument("--json", type=Path, default=None, help="write every number here")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    base = build_base()
    adapter = with_adapter(base)
    merged = merge_and_unload(copy.deepcopy(adapter)).eval()
    assert type(merged.model.layers[0].self_attn.q_proj) is nn.Linear  # same architecture as the base
    tok = IdsOnly()
    batch_prompts, lat_prompts = prompts(BATCH), prompts(args.latency_prompts, seed=1)

    def gen(model: nn.Module, ps: list[list[int]], batch_size: int) -> Callable[[], None]:
        return lambda: greedy_generate(model, ps, tok, args.new, batch_size)

    throughput = {"batched": gen(base, batch_prompts, BATCH), "one_by_one": gen(base, batch_prompts, 1)}
    latency = {
        "base": base,
        "merged": merged,
        "adapter": adapter,
        "adapter_qkvo": with_adapter(base, ["q_proj", "k_proj", "v_proj", "o_proj"]),
        "base_copy": copy.deepcopy(base),
    }
    # Warm-up, and sanity: the merged weights differ from the base and give adapter-on-base's tokens.
    outs = {}
    for name, model in latency.items():
        gen(model, lat_prompts, 1)()
        outs[name] = tok.last
    for fn in throughput.values():
        fn()
    tok.tokens = 0
    throughput["batched"]()
    assert tok.tokens == BATCH * args.new, (tok.tokens, BATCH * args.new)  # no row stopped early

    load = os.getloadavg()
    print(
        f"# torch {torch.__version__}, {platform.machine()}, nproc {os.cpu_count()}, threads {args.threads}, "
        f"load {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}; Llama {MODEL}; {args.new} new tokens per row; "
        f"batch {BATCH} prompts of 8..{8 + 2 * (BATCH - 1)} tokens; latency: {args.latency_prompts} prompts "
        f"one at a time, the variants interleaved prompt by prompt; LoRA r={R} alpha={ALPHA:g} on every "
        f"attention and MLP projection (adapter) or q,k,v,o; rounds {args.rounds}; PASS/FAIL from thread CPU time"
    )
    print(
        f"# merged greedy tokens == adapter-on-base's: {outs['merged'] == outs['adapter']}; "
        f"!= base's: {outs['merged'] != outs['base']}"
    )

    def rotated(names: list[str], k: int) -> list[str]:
        return names[k % len(names) :] + names[: k % len(names)]

    times: dict[str, list[dict[str, float]]] = {n: [] for n in [*throughput, *latency]}
    for r in range(args.rounds):
        for name in rotated(list(throughput), r):
            times[name].append(timed(throughput[name]))
        # Latency variants side by side for each prompt (order rotated), summed over the prompts: pairs
        # calls a fraction of a second apart, so load that drifts on a shared box hits each variant alike.
        total = {n: {c: 0.0 for c in CLOCKS} for n in latency}
        for i, prompt in enumerate(lat_prompts):
            for name in rotated(list(latency), r + i):
                t = timed(gen(latency[name], [prompt], 1))
                for c in CLOCKS:
                    total[name][c] += t[c]
        for name in latency:
            times[name].append(total[name])

    print("\n| variant | tokens | CPU s (median) | wall s (median) | tokens/s (CPU) |")
    print("|---|---:|---:|---:|---:|")
    rows = {}
    for name, ts in times.items():
        tokens = (BATCH if name in ("batched", "one_by_one") else args.latency_prompts) * args.new
        med = {c: statistics.median(t[c] for t in ts) for c in CLOCKS}
        rows[name] = dict(tokens=tokens, **{f"{c}_s": med[c] for c in CLOCKS}, times=ts)
        print(f"| {name} | {tokens} | {med['cpu']:.3f} | {med['wall']:.3f} | {tokens / med['cpu']:.0f} |")

    print("\n| ratio | CPU | wall | target | result (CPU) |")
    print("|---|---:|---:|---:|---|")
    checks, all_ok = [], True
    for label, num, den, target, higher in TARGETS:
        vals = {
            c: statistics.median(a[c] / b[c] for a, b in zip(times[num], times[den], strict=True))
            for c in CLOCKS
        }
        if target is None:
            shown, result = "-", "(info)"
        else:
            ok = vals["cpu"] >= target if higher else vals["cpu"] <= target
            all_ok &= ok
            shown, result = f"{'≥' if higher else '≤'} {target:.2f}", "PASS" if ok else "FAIL"
        print(f"| {label} | {vals['cpu']:.3f} | {vals['wall']:.3f} | {shown} | {result} |")
        checks.append(dict(label=label, num=num, den=den, target=target, **vals, result=result))
    if args.json:
        args.json.write_text(json.dumps({"args": vars(args) | {"json": str(args.json)}, "load": load,
                                         "variants": rows, "checks": checks}, indent=2))  # fmt: skip
    return 0 if all_ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
