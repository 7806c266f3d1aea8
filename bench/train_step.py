"""Train-step time and saved-activation bytes: full fine-tuning, our LoRA/DoRA/QLoRA, PEFT's (CPU, fp32).

.venv/bin/python bench/train_step.py --rounds 5 --steps 3 --models tiny,h512 --json /tmp/train_step.json

Variants run interleaved in one process (round-robin, order rotated every round, warm-up steps discarded);
a step ratio is the median over rounds of the per-round ratio of median step times. Not a test: it prints.
Each step is timed by wall clock and by the thread's CPU time (time.thread_time(); torch runs on this one thread),
which leaves out time the thread sat descheduled on a busy box: PASS/FAIL comes from CPU time, wall is shown beside.
Overhead ratio = (variant - floor) / (PEFT's same variant - floor), from medians over every timed step.
MALLOC_MMAP_THRESHOLD_=65536 steadies RSS (docs/environment.md) but mmaps every tensor over 64 KiB, and here made
every step ~1.5x slower (page faults): use it for RSS, not for these timings; saved bytes never read RSS.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from core.config import LoraConfig, QuantConfig  # noqa: E402
from core.lora import inject_lora  # noqa: E402

ATTN = ["q_proj", "k_proj", "v_proj", "o_proj"]
ALL = "all-linear"  # q k v o gate up down; never lm_head (ours and PEFT's rule alike)
R, ALPHA = 8, 16.0

# Sizes are multiples of 64: bitsandbytes' CPU NF4 kernel needs in_features % blocksize == 0 (docs/environment.md).
MODELS: dict[str, dict] = {
    "tiny": dict(
        hidden_size=128, num_hidden_layers=4, num_attention_heads=4, intermediate_size=256, vocab_size=1024
    ),
    "h512": dict(
        hidden_size=512, num_hidden_layers=4, num_attention_heads=8, intermediate_size=1408, vocab_size=4096
    ),
}


def build_model(name: str, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    spec = MODELS[name]
    cfg = LlamaConfig(
        **spec,
        num_key_value_heads=spec["num_attention_heads"],
        max_position_embeddings=512,
        tie_word_embeddings=False,
        attn_implementation="sdpa",
    )
    return LlamaForCausalLM(cfg).float().train()


# --- variants -------------------------------------------------------------------------------------


def v_full(name: str) -> nn.Module:
    return build_model(name)


def v_floor(name: str) -> nn.Module:
    """Every weight frozen, backward still runs through every layer (embedding output needs grad).

    The cost of a LoRA with free adapters: no implementation of any adapter can step faster than this
    (slightly pessimistic: layer 0's input gradient is computed here, LoRA does not need it).
    """
    model = build_model(name).requires_grad_(False)
    model.get_input_embeddings().register_forward_hook(lambda _m, _i, out: out.requires_grad_())
    return model


def v_ours(targets: list[str] | str) -> Callable[[str], nn.Module]:
    def make(name: str) -> nn.Module:
        model = build_model(name)
        inject_lora(model, LoraConfig(r=R, alpha=ALPHA, dropout=0.0, target_modules=targets))
        return model.train()

    return make


def v_qlora(targets: list[str] | str) -> Callable[[str], nn.Module]:
    def make(name: str) -> nn.Module:
        from core.quant import quantize_model

        model = build_model(name)
        quantize_model(model, QuantConfig(quant_type="nf4", double_quant=True, compute_dtype="float32"))
        inject_lora(model, LoraConfig(r=R, alpha=ALPHA, dropout=0.0, target_modules=targets))
        return model.train()

    return make


def v_peft(targets: list[str] | str) -> Callable[[str], nn.Module]:
    def make(name: str) -> nn.Module:
        import peft

        model = build_model(name)
        cfg = peft.LoraConfig(r=R, lora_alpha=ALPHA, lora_dropout=0.0, target_modules=targets, bias="none")
        return peft.get_peft_model(model, cfg).train()

    return make


def v_ours_dora(targets: list[str] | str) -> Callable[[str], nn.Module]:
    def make(name: str) -> nn.Module:
        model = build_model(name)
        cfg = LoraConfig(r=R, alpha=ALPHA, dropout=0.0, target_modules=targets, use_dora=True)  # type: ignore[call-arg]
        inject_lora(model, cfg)
        return model.train()

    return make


def v_peft_dora(targets: list[str] | str) -> Callable[[str], nn.Module]:
    def make(name: str) -> nn.Module:
        import peft

        model = build_model(name)
        cfg = peft.LoraConfig(
            r=R, lora_alpha=ALPHA, lora_dropout=0.0, target_modules=targets, bias="none", use_dora=True
        )
        return peft.get_peft_model(model, cfg).train()

    return make


# DoRA variants exist only once core.config.LoraConfig has use_dora (our DoRA in core/lora.py).
HAS_DORA = "use_dora" in LoraConfig.model_fields

VARIANTS: dict[str, Callable[[str], nn.Module]] = {
    "full": v_full,
    "floor": v_floor,
    "ours_qkvo": v_ours(ATTN),
    "peft_qkvo": v_peft(ATTN),
    "ours_all": v_ours(ALL),
    "peft_all": v_peft(ALL),
    "qlora_all": v_qlora(ALL),
}
if HAS_DORA:
    VARIANTS |= {
        "ours_dora_qkvo": v_ours_dora(ATTN),
        "peft_dora_qkvo": v_peft_dora(ATTN),
        "ours_dora_all": v_ours_dora(ALL),
        "peft_dora_all": v_peft_dora(ALL),
    }

# (numerator, denominator, target, models it applies to: None = every model)
TARGETS: list[tuple[str, str, str, float, set[str] | None]] = [
    ("step", "ours_qkvo", "peft_qkvo", 0.90, None),
    ("saved", "ours_qkvo", "peft_qkvo", 1.00, None),
    ("step", "ours_all", "peft_all", 0.90, None),
    ("saved", "ours_all", "peft_all", 1.00, None),
    ("step", "ours_qkvo", "full", 0.72, {"h512"}),
    ("step", "qlora_all", "ours_all", 1.10, None),
    ("step", "floor", "peft_qkvo", 0.0, set()),  # info: the best any adapter could do against PEFT
    ("step", "floor", "peft_all", 0.0, set()),
    ("saved", "ours_dora_qkvo", "peft_dora_qkvo", 0.0, set()),
    ("saved", "ours_dora_all", "peft_dora_all", 0.0, set()),
]

# Overhead over the frozen-base floor: (ours - floor) / (peft - floor), every model.
# (label, ours, peft, target)
OVERHEADS: list[tuple[str, str, str, float]] = [
    ("LoRA q,k,v,o", "ours_qkvo", "peft_qkvo", 0.35),
    ("LoRA all-linear", "ours_all", "peft_all", 0.35),
    ("DoRA q,k,v,o", "ours_dora_qkvo", "peft_dora_qkvo", 0.60),
    ("DoRA all-linear", "ours_dora_all", "peft_dora_all", 0.60),
]
CLOCKS = ("cpu", "wall")  # cpu: time.thread_time(), the one PASS/FAIL reads; wall: time.perf_counter()


# --- measurement ----------------------------------------------------------------------------------


@dataclass
class Runner:
    name: str
    model: nn.Module
    opt: torch.optim.Optimizer | None
    trainable: int
    times: list[list[float]] = field(default_factory=list)  # wall, per round, per step (s)
    cpu_times: list[list[float]] = field(default_factory=list)  # this thread's CPU time, same layout (s)
    saved_bytes: int = 0
    saved_count: int = 0


def make_runner(variant: str, model_name: str) -> Runner:
    model = VARIANTS[variant](model_name)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.0) if params else None
    return Runner(variant, model, opt, sum(p.numel() for p in params))


def step(r: Runner, ids: torch.Tensor) -> tuple[float, float]:
    """One optimizer step; returns (wall s, thread CPU s).

    With torch at 1 thread, forward, the CPU autograd engine's backward and AdamW all run on the calling
    thread, so its CPU time is the step's work without the time the scheduler gave other jobs.
    """
    c0, t0 = time.thread_time(), time.perf_counter()
    loss = r.model(input_ids=ids, labels=ids).loss
    loss.backward()
    if r.opt is not None:
        r.opt.step()
        r.opt.zero_grad(set_to_none=True)
    return time.perf_counter() - t0, time.thread_time() - c0


def saved_activation_bytes(model: nn.Module, ids: torch.Tensor) -> tuple[int, int]:
    """Bytes autograd keeps for backward after one forward, counted by ``saved_tensors_hooks``.

    Every tensor autograd packs is keyed by its untyped storage (``data_ptr``), so views and tensors saved
    by several nodes count once, at the full storage size. Storages of parameters and buffers (frozen
    weights, packed 4-bit weights, rotary tables) are not activations and are left out.
    """
    weights = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()] if t.numel()}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        s = t.untyped_storage()
        if s.data_ptr() not in weights and s.nbytes():
            seen[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()  # free the graph; the gradients are dropped below
    model.zero_grad(set_to_none=True)
    return sum(seen.values()), len(seen)


def bench_model(
    model_name: str, variants: list[str], rounds: int, steps: int, warmup: int, batch: int, seq: int
):
    vocab = MODELS[model_name]["vocab_size"]
    ids = torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(1))  # (B, T)
    runners = [make_runner(v, model_name) for v in variants]
    for r in runners:
        r.saved_bytes, r.saved_count = saved_activation_bytes(r.model, ids)
        for _ in range(warmup):
            step(r, ids)
    gc.collect()
    gc.disable()  # no collector pauses inside a timed step
    try:
        for k in range(rounds):
            order = runners[k % len(runners) :] + runners[: k % len(runners)]  # rotate: no fixed position
            for r in order:
                wall, cpu = zip(*(step(r, ids) for _ in range(steps)), strict=True)
                r.times.append(list(wall))
                r.cpu_times.append(list(cpu))
            gc.collect()
            print(f"  [{model_name}] round {k + 1}/{rounds} done", file=sys.stderr, flush=True)
    finally:
        gc.enable()
    return runners


def _times(r: Runner, clock: str) -> list[list[float]]:
    return r.cpu_times if clock == "cpu" else r.times


def med_ms(r: Runner, clock: str = "wall") -> float:
    return 1e3 * statistics.median(t for rnd in _times(r, clock) for t in rnd)


def ratio(kind: str, a: Runner, b: Runner, clock: str = "wall") -> float:
    if kind == "saved":
        return a.saved_bytes / b.saved_bytes
    ta, tb = _times(a, clock), _times(b, clock)
    per_round = [statistics.median(x) / statistics.median(y) for x, y in zip(ta, tb, strict=True)]
    return statistics.median(per_round)


def overhead(ours: Runner, peft: Runner, floor: Runner, clock: str) -> float | None:
    """(ours - floor) / (peft - floor) of median step times; None where peft <= floor (no valid ratio).

    Medians over every timed step, not per round: a per-round difference of two noisy medians can flip sign.
    """
    f = med_ms(floor, clock)
    den = med_ms(peft, clock) - f
    return (med_ms(ours, clock) - f) / den if den > 0 else None


def _fmt(v: float | None) -> str:
    return "invalid (PEFT ≤ floor)" if v is None else f"{v:.3f}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=3, help="timed steps per variant per round")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps per variant before round 1")
    ap.add_argument("--models", default="tiny,h512", help=f"comma list of {list(MODELS)}")
    ap.add_argument("--variants", default=",".join(VARIANTS), help=f"comma list of {list(VARIANTS)}")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--threads", type=int, default=1, help="torch threads; 1 is steadiest on a shared box")
    ap.add_argument("--json", type=Path, default=None, help="write every number here")
    args = ap.parse_args(argv)
    models = [m for m in args.models.split(",") if m]
    variants = [v for v in args.variants.split(",") if v]
    unknown = [m for m in models if m not in MODELS] + [v for v in variants if v not in VARIANTS]
    if unknown:
        ap.error(f"unknown model/variant {unknown}; models: {list(MODELS)}, variants: {list(VARIANTS)}")

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    load = os.getloadavg()
    print(
        f"# torch {torch.__version__}, {platform.machine()}, nproc {os.cpu_count()}, threads {args.threads}, "
        f"load {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}, MALLOC_MMAP_THRESHOLD_="
        f"{os.environ.get('MALLOC_MMAP_THRESHOLD_', 'unset')}, batch {args.batch}x{args.seq}, "
        f"rounds {args.rounds} x steps {args.steps} (warm-up {args.warmup}), r={R} alpha={ALPHA:g} dropout=0, "
        f"DoRA {'in' if HAS_DORA else 'absent (core.config.LoraConfig has no use_dora)'}; PASS/FAIL from thread CPU time"
    )
    out: dict = {"args": {k: str(v) for k, v in vars(args).items()}, "load_start": load, "models": {}}
    all_ok = True
    for m in models:
        runners = {
            r.name: r
            for r in bench_model(m, variants, args.rounds, args.steps, args.warmup, args.batch, args.seq)
        }
        print(f"\n## {m}: {MODELS[m]}")
        print(
            "| variant | step ms wall (median) | min | max | step ms CPU (median) | min | max "
            "| saved activations MiB | saved tensors | trainable |"
        )
        print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
        rows = {}
        for r in runners.values():
            flat = [t for rnd in r.times for t in rnd]
            cflat = [t for rnd in r.cpu_times for t in rnd]
            rows[r.name] = dict(
                step_ms=med_ms(r), min_ms=1e3 * min(flat), max_ms=1e3 * max(flat),
                cpu_step_ms=med_ms(r, "cpu"), cpu_min_ms=1e3 * min(cflat), cpu_max_ms=1e3 * max(cflat),
                saved_bytes=r.saved_bytes, saved_tensors=r.saved_count, trainable=r.trainable,
                times_s=r.times, cpu_times_s=r.cpu_times,
            )  # fmt: skip
            print(
                f"| {r.name} | {med_ms(r):.1f} | {1e3 * min(flat):.1f} | {1e3 * max(flat):.1f} | "
                f"{med_ms(r, 'cpu'):.1f} | {1e3 * min(cflat):.1f} | {1e3 * max(cflat):.1f} | "
                f"{r.saved_bytes / 2**20:.2f} | {r.saved_count} | {r.trainable:,} |"
            )
        print("\n| ratio | CPU | wall | target | result (CPU) |")
        print("|---|---:|---:|---:|---|")
        checks = []
        for kind, a, b, target, only in TARGETS:
            if a not in runners or b not in runners:
                continue
            vals = {c: ratio(kind, runners[a], runners[b], c) for c in CLOCKS}
            value = vals["cpu"]
            applies = only is None or m in only
            verdict = ("PASS" if value <= target else "FAIL") if applies else "(info)"
            shown = f"≤ {target:.2f}" if only != set() else "-"
            all_ok &= verdict != "FAIL"
            label = f"{kind} {a} / {b}"
            wall = f"{vals['wall']:.3f}" if kind == "step" else "-"
            print(f"| {label} | {value:.3f} | {wall} | {shown} | {verdict} |")
            checks.append(
                dict(kind=kind, num=a, den=b, value=value, clock="cpu" if kind == "step" else "bytes",
                     value_cpu=value, value_wall=vals["wall"], target=target, result=verdict)
            )  # fmt: skip
        overheads = []
        if "floor" in runners:
            print("\n| overhead (variant − floor) / (PEFT's − floor) | CPU | wall | target | result (CPU) |")
            print("|---|---:|---:|---:|---|")
            for label, a, b, target in OVERHEADS:
                if a not in runners or b not in runners:
                    continue
                vals = {c: overhead(runners[a], runners[b], runners["floor"], c) for c in CLOCKS}
                v = vals["cpu"]
                verdict = "INVALID" if v is None else ("PASS" if v <= target else "FAIL")
                all_ok &= verdict == "PASS"
                print(
                    f"| {label}: {a} vs {b} | {_fmt(v)} | {_fmt(vals['wall'])} | ≤ {target:.2f} | {verdict} |"
                )
                overheads.append(
                    dict(label=label, num=a, den=b, cpu=v, wall=vals["wall"], target=target, result=verdict)
                )
        out["models"][m] = dict(spec=MODELS[m], variants=rows, checks=checks, overheads=overheads)
        del runners
        gc.collect()
    out["load_end"] = os.getloadavg()
    print(f"\n# load at end {out['load_end'][0]:.2f} {out['load_end'][1]:.2f} {out['load_end'][2]:.2f}")
    if args.json:
        args.json.write_text(json.dumps(out, indent=1))
    return 0 if all_ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
