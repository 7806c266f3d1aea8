"""One-GPU training throughput and peak memory: full fine-tuning (with MFU), our LoRA, our QLoRA, PEFT LoRA.

python bench/gpu_train.py                       # ~1.3B Llama shape, bf16, 8x1024 tokens/step; a few minutes on an H200

Builds the model from a LlamaConfig (no download), runs each variant in turn (warm-up steps discarded), prints a
table and appends it to bench/RESULTS.md under "GPU". Needs CUDA (and a CUDA build of torch + bitsandbytes).
"""

from __future__ import annotations

import argparse
import datetime as dt
import gc
import json
import sys
import time
from pathlib import Path

import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

from core.config import LoraConfig, QuantConfig  # noqa: E402
from core.lora import inject_lora  # noqa: E402

VARIANTS = ("full", "ours_lora", "ours_qlora", "peft_lora")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--layers", type=int, default=22)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--kv-heads", type=int, default=16)
    ap.add_argument("--mlp", type=int, default=5632)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=10, help="timed optimizer steps per variant")
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps per variant first")
    ap.add_argument("--variants", default=",".join(VARIANTS), help=f"comma list of {list(VARIANTS)}")
    ap.add_argument("--targets", default="all-linear", help="LoRA targets: all-linear or a comma list")
    ap.add_argument("--r", type=int, default=8)
    ap.add_argument("--alpha", type=float, default=16.0)
    ap.add_argument("--grad-ckpt", action="store_true", help="activation checkpointing (if memory runs out)")
    ap.add_argument("--peak-tflops", type=float, default=989.0, help="dense bf16 peak (H100/H200 SXM: 989)")
    ap.add_argument("--results", default=str(ROOT / "bench" / "RESULTS.md"), help="append here; '' to skip")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    bad = [v for v in args.variants.split(",") if v not in VARIANTS]
    if bad:
        ap.error(f"unknown variants {bad}; choose from {list(VARIANTS)}")
    return args


def build(args: argparse.Namespace) -> LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = LlamaConfig(
        hidden_size=args.hidden,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        intermediate_size=args.mlp,
        vocab_size=args.vocab,
        max_position_embeddings=max(args.seq, 2048),
        tie_word_embeddings=False,
        attn_implementation="sdpa",
    )
    with torch.device("cuda"):  # initialise on the GPU: a CPU init of ~1B weights takes minutes
        model = LlamaForCausalLM(cfg)
    return model.to(torch.bfloat16).train()


def make_variant(name: str, args: argparse.Namespace) -> tuple[nn.Module, str]:
    targets: list[str] | str = args.targets if args.targets == "all-linear" else args.targets.split(",")
    model = build(args)
    note = ""
    if name == "full":
        note = "bf16 weights, grads and AdamW states (no fp32 master copy)"
    elif name == "ours_lora":
        inject_lora(model, LoraConfig(r=args.r, alpha=args.alpha, target_modules=targets))
        note = "adapters bf16 (base dtype)"
    elif name == "ours_qlora":
        from core.quant import quantize_model

        quantize_model(
            model, QuantConfig(quant_type="nf4", double_quant=True, compute_dtype="bfloat16"), device="cuda"
        )
        inject_lora(model, LoraConfig(r=args.r, alpha=args.alpha, target_modules=targets))
        note = "NF4 + double quant, bf16 compute, adapters fp32"
    elif name == "peft_lora":
        import peft

        cfg = peft.LoraConfig(r=args.r, lora_alpha=args.alpha, lora_dropout=0.0, target_modules=targets)
        model = peft.get_peft_model(model, cfg)  # PEFT default autocast_adapter_dtype=True: fp32 adapters
        note = "PEFT defaults: adapters fp32"
    if args.grad_ckpt:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model.train(), note


def run_variant(name: str, args: argparse.Namespace) -> dict:
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    model, note = make_variant(name, args)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5, weight_decay=0.0, fused=True)
    ids = torch.randint(0, args.vocab, (args.batch, args.seq), device="cuda")  # (B, T)

    def step() -> torch.Tensor:
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    for _ in range(args.warmup):
        step()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(args.steps):
        loss = step()
    torch.cuda.synchronize()
    elapsed = time.perf_counter() - t0
    tokens = args.batch * args.seq * args.steps
    n_total = sum(p.numel() for p in model.parameters())
    row = dict(
        variant=name,
        step_ms=1e3 * elapsed / args.steps,
        tokens_per_s=tokens / elapsed,
        peak_gib=torch.cuda.max_memory_allocated() / 2**30,
        trainable=sum(p.numel() for p in params),
        loss=float(loss),
        note=note,
    )
    if name == "full":
        # 6·N FLOPs per token (forward 2N + backward 4N); N leaves out the input embedding (a lookup, no
        # matmul) and attention's T² term is not counted, as in the PaLM paper's MFU.
        n = n_total - model.get_input_embeddings().weight.numel()
        row["n_params"] = n
        row["mfu"] = 6 * n * row["tokens_per_s"] / (args.peak_tflops * 1e12)
    return row


def table(rows: list[dict]) -> str:
    lines = [
        "| variant | step ms | tokens/s | peak GiB | trainable | MFU | notes |",
        "|---|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        mfu = f"{100 * r['mfu']:.1f}%" if "mfu" in r else "-"
        lines.append(
            f"| {r['variant']} | {r['step_ms']:.1f} | {r['tokens_per_s']:,.0f} | {r['peak_gib']:.2f} | "
            f"{r['trainable']:,} | {mfu} | {r['note']} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        print(
            f"bench/gpu_train.py needs a CUDA GPU; this torch ({torch.__version__}) sees none. "
            "Run it on a GPU machine with a CUDA build of torch and bitsandbytes installed.",
            file=sys.stderr,
        )
        return 2
    torch.backends.cuda.matmul.allow_tf32 = True
    device = torch.cuda.get_device_name()
    cmd = "python bench/gpu_train.py " + " ".join(sys.argv[1:] if argv is None else argv)
    print(f"# {device}, torch {torch.__version__}, {args.batch}x{args.seq} tokens/step, {args.steps} steps")
    rows = []
    for name in args.variants.split(","):
        try:
            rows.append(run_variant(name, args))
        except torch.OutOfMemoryError:
            print(f"{name}: out of GPU memory; rerun with --grad-ckpt or a smaller --batch", file=sys.stderr)
            rows.append(dict(variant=name, step_ms=float("nan"), tokens_per_s=0.0, peak_gib=float("nan"),
                             trainable=0, note="OOM"))  # fmt: skip
        print(f"  {rows[-1]['variant']}: {rows[-1]['step_ms']:.1f} ms/step", file=sys.stderr, flush=True)
    text = table(rows)
    print(text)
    if args.json:
        args.json.write_text(json.dumps(dict(device=device, args=vars(args),
                                             rows=rows), indent=1, default=str))  # fmt: skip
    if args.results:
        stamp = dt.datetime.now().strftime("%Y-%m-%d %H:%M")
        shape = f"hidden {args.hidden}, {args.layers} layers, heads {args.heads}/{args.kv_heads}, mlp {args.mlp}, vocab {args.vocab}"
        with open(args.results, "a") as f:
            f.write(
                f"\n## GPU: {stamp}, {device}\n\n`{cmd}` (torch {torch.__version__}; {shape}; bf16; "
                f"{args.batch}x{args.seq} tokens/step; LoRA r={args.r} alpha={args.alpha:g} on {args.targets}; "
                f"MFU = 6·N·tokens/s / {args.peak_tflops:g} TFLOPS)\n\n{text}\n"
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
