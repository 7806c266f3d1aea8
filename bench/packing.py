"""Packing throughput: useful (non-pad) tokens per second, packed vs padded batches vs the padding-free limit (CPU).

.venv/bin/python bench/packing.py --rows 600 --rounds 5 --json /tmp/packing.json

Rows with long-tailed lengths (lognormal, median ~60, clipped to 8..512 tokens) train a tiny Llama (fp32, sdpa,
forward + backward) three ways, interleaved round by round (order rotated, one untimed warm-up each):
  padded   the rows in random order, micro-batches of --rows-per-batch rows right-padded (core.data.collate)
  packed   pack_split (first-fit decreasing into --max-seq-len), micro-batches of --seqs-per-batch packed rows,
           block-diagonal attention from position ids (core.data.collate, no attention_mask)
  limit    the padding-free limit: the same tokens back to back, cut into full --max-seq-len rows, plain causal
           attention (every position a real token; not a correct training layout, the throughput bound)
Per round, useful tokens/s = real tokens of every micro-batch / the thread's CPU time (time.thread_time(); one
torch thread); ratios are medians over rounds of per-round ratios. Targets: packed/padded >= 2, packed/limit >= 0.9.
Also times pack_split itself on --pack-rows rows (rows/s, informational). Not a test: it prints.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import datasets
import numpy as np
import torch
from transformers import LlamaConfig, LlamaForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from core.data import collate  # noqa: E402
from core.data.packing import pack_split  # noqa: E402

TINY = dict(
    hidden_size=128, num_hidden_layers=4, num_attention_heads=4, intermediate_size=256, vocab_size=1024
)
TARGETS = {"packed / padded": 2.0, "packed / limit": 0.9}


def skewed_lengths(n: int, max_len: int, seed: int) -> np.ndarray:
    """Long-tailed row lengths: lognormal with median 60 (sigma 0.9), clipped to 8..max_len."""
    rng = np.random.default_rng(seed)
    return np.clip(rng.lognormal(np.log(60), 0.9, n).astype(np.int64), 8, max_len)


def make_rows(lengths: np.ndarray, vocab: int, seed: int) -> list[dict]:
    """Rows of random ids; the first quarter of each is prompt (-100), as in instruction data."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for n in lengths.tolist():
        ids = torch.randint(3, vocab, (n,), generator=g).tolist()
        cut = n // 4
        rows.append({"input_ids": ids, "labels": [-100] * cut + ids[cut:]})
    return rows


def build_model(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        **TINY,
        num_key_value_heads=TINY["num_attention_heads"],
        max_position_embeddings=512,
        tie_word_embeddings=False,
        attn_implementation="sdpa",
        use_cache=False,
    )
    return LlamaForCausalLM(cfg).float().train()


def micro_batches(rows: list[dict], per_batch: int) -> list[tuple[dict[str, torch.Tensor], int]]:
    """(collated micro-batch, its real tokens: the rows' lengths, padding none)."""
    out = []
    for i in range(0, len(rows), per_batch):
        chunk = rows[i : i + per_batch]
        out.append((collate(chunk, pad_id=0), sum(len(r["input_ids"]) for r in chunk)))
    return out


def run_variant(model, batches) -> tuple[float, float]:
    """Forward and backward over ``batches``, gradients accumulated; (thread CPU s, wall s).

    No optimizer step: its cost is per optimizer step, the same for every layout, while the number of
    micro-batches differs between them."""
    c0, w0 = time.thread_time(), time.perf_counter()
    for b, _ in batches:
        n = max(1, int((b["labels"][:, 1:] != -100).sum()))
        loss = model(**b, num_items_in_batch=n).loss
        loss.backward()
    model.zero_grad(set_to_none=True)
    return time.thread_time() - c0, time.perf_counter() - w0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=600, help="rows trained per variant per round")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--max-seq-len", type=int, default=512)
    p.add_argument("--rows-per-batch", type=int, default=8, help="padded micro-batch, in rows")
    p.add_argument("--seqs-per-batch", type=int, default=2, help="packed and limit micro-batch, in sequences")
    p.add_argument("--pack-rows", type=int, default=100_000, help="rows for the pack_split timing (0: skip)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    datasets.disable_progress_bars()

    lengths = skewed_lengths(args.rows, args.max_seq_len)
    rows = make_rows(lengths, TINY["vocab_size"], args.seed)
    total = int(lengths.sum())
    order = np.random.default_rng(args.seed).permutation(len(rows))  # the train loop shuffles rows too
    padded = micro_batches([rows[i] for i in order], args.rows_per_batch)
    packed_ds, stats = pack_split(datasets.Dataset.from_list(rows), args.max_seq_len)
    packed_rows = list(packed_ds)
    packed = micro_batches(
        [packed_rows[i] for i in np.random.default_rng(args.seed).permutation(len(packed_rows))],
        args.seqs_per_batch,
    )
    stream = [t for r in rows for t in r["input_ids"]]
    flat_labels = [t for r in rows for t in r["labels"]]
    L = args.max_seq_len
    limit_rows = [
        {"input_ids": stream[i : i + L], "labels": flat_labels[i : i + L]}
        for i in range(0, len(stream) - L + 1, L)
    ]
    limit = micro_batches(limit_rows, args.seqs_per_batch)
    variants = {"padded": padded, "packed": packed, "limit": limit}
    tokens = {k: sum(n for _, n in v) for k, v in variants.items()}
    slots = {k: sum(b["input_ids"].numel() for b, _ in v) for k, v in variants.items()}
    assert tokens["padded"] == tokens["packed"] == total, (tokens, total)
    print(
        f"{len(rows)} rows, {total} tokens, lengths median {int(np.median(lengths))} p90 {int(np.percentile(lengths, 90))} "
        f"max {int(lengths.max())}; packed into {stats['sequences']} sequences of <= {L} (fill {stats['fill_ratio']:.3f})"
    )
    for k in variants:
        print(
            f"  {k:7s} {len(variants[k]):4d} micro-batches, {tokens[k]} useful of {slots[k]} positions "
            f"({tokens[k] / slots[k]:.1%})"
        )

    models = {k: build_model(args.seed) for k in variants}
    for k in variants:  # warm-up, untimed
        run_variant(models[k], variants[k][:2])
    names = list(variants)
    per_round: list[dict[str, dict[str, float]]] = []
    for r in range(args.rounds):
        got: dict[str, dict[str, float]] = {}
        for k in names[r % len(names) :] + names[: r % len(names)]:
            cpu, wall = run_variant(models[k], variants[k])
            got[k] = {"cpu_tok_s": tokens[k] / cpu, "wall_tok_s": tokens[k] / wall}
        per_round.append(got)
        print(f"round {r + 1}: " + ", ".join(f"{k} {got[k]['cpu_tok_s']:.0f} tok/s" for k in names))

    def ratio(a: str, b: str, clock: str) -> float:
        return statistics.median(x[a][f"{clock}_tok_s"] / x[b][f"{clock}_tok_s"] for x in per_round)

    print("\n| variant | useful tok/s cpu (median) | wall | useful share of positions |")
    print("|---|---:|---:|---:|")
    for k in names:
        cpu = statistics.median(x[k]["cpu_tok_s"] for x in per_round)
        wall = statistics.median(x[k]["wall_tok_s"] for x in per_round)
        print(f"| {k} | {cpu:.0f} | {wall:.0f} | {tokens[k] / slots[k]:.1%} |")
    print("\n| ratio | cpu | wall | target | result |")
    print("|---|---:|---:|---:|---|")
    results = {}
    ok = True
    for name, target in TARGETS.items():
        a, b = (s.strip() for s in name.split("/"))
        cpu, wall = ratio(a, b, "cpu"), ratio(a, b, "wall")
        passed = cpu >= target
        ok &= passed
        results[name] = {"cpu": cpu, "wall": wall, "target": target, "pass": passed}
        print(f"| {name} | {cpu:.3f} | {wall:.3f} | >= {target} | {'PASS' if passed else 'FAIL'} |")

    pack_timing = None
    if args.pack_rows:
        big = skewed_lengths(args.pack_rows, L, args.seed + 1)
        ds = datasets.Dataset.from_dict(
            {"input_ids": [[1] * n for n in big.tolist()], "labels": [[1] * n for n in big.tolist()]}
        )
        t0 = time.perf_counter()
        _, big_stats = pack_split(ds, L)
        dt = time.perf_counter() - t0
        pack_timing = {"rows": args.pack_rows, "seconds": dt, "rows_per_s": args.pack_rows / dt, **big_stats}
        print(
            f"\npack_split: {args.pack_rows} rows in {dt:.1f} s ({args.pack_rows / dt:.0f} rows/s), "
            f"{big_stats['sequences']} sequences, fill {big_stats['fill_ratio']:.4f}"
        )
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "args": {k: str(v) for k, v in vars(args).items()},
                    "machine": {"python": platform.python_version(), "torch": torch.__version__},
                    "tokens": tokens,
                    "positions": slots,
                    "pack_stats": stats,
                    "rounds": per_round,
                    "ratios": results,
                    "pack_split": pack_timing,
                },
                indent=1,
            )
        )
    print("PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
