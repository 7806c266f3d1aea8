"""The train stage: full fine-tuning, LoRA or QLoRA, one process or many, resuming from step checkpoints.

    python -m core.train --run-dir runs/demo --train-data runs/demo/data/train      # one process
    python -m torch.distributed.run --nproc_per_node 2 -m core.train --run-dir ... # N ranks (core.launch)

Every multi-process run goes through one DeepSpeed engine (ZeRO stage 0 is plain data parallel): the
path CI exercises with 2 CPU ranks over gloo is the one GPUs run. A single LoRA/QLoRA process uses a
plain torch loop. Never imports prefect: progress is reported through files in the run directory.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import logging
import math
import os
import resource
import shutil
import signal
import socket
import sys
import time
import warnings
from collections.abc import Iterator
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# ruff: noqa: E402  (a rank arms its death signal before the heavy imports below)


def _parent_of(pid: int) -> int:
    """The parent pid of ``pid`` (from /proc), or -1 if it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return -1
    return int(stat[stat.rindex(")") + 2 :].split()[1])  # after "pid (comm) ": state, ppid, ...


if __name__ == "__main__" and int(os.environ.get("WORLD_SIZE", "1")) > 1 and sys.platform == "linux":
    # Die with the launcher from the first moment, not only from main(): importing torch and
    # transformers takes seconds, and a launcher killed meanwhile left its ranks running under init
    # (tests/test_distributed.py::test_launcher_killed_during_startup_leaves_no_rank).
    _launcher_pid = os.getppid()
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG
    # A launcher that died before that line leaves this rank re-parented, and the signal armed on the
    # wrong parent. core.launch names the supervisor of a torchrun launch, which is this rank's
    # grandparent for as long as the launcher lives (core.launch.SUPERVISOR_PID_ENV).
    _supervisor = os.environ.get("DELTATUNE_SUPERVISOR_PID")
    if os.getppid() != _launcher_pid or (_supervisor and _parent_of(_launcher_pid) != int(_supervisor)):
        os._exit(1)

import torch
from torch import nn

from core import checkpoint as ckpt
from core.adapter import adapter_params, save_adapter
from core.config import RunConfig, read_resolved
from core.data import collate, load_split
from core.fsutil import writing_dir
from core.launch import error_file, is_retryable, set_pdeathsig
from core.lora import count_parameters, inject_lora
from core.modeling import load_model, load_tokenizer, pick_device, resolve_source

log = logging.getLogger(__name__)

METRICS = "metrics.jsonl"
SUMMARY = "train_summary.json"


@dataclass
class DistEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_environ(cls) -> DistEnv:
        e = os.environ
        return cls(int(e.get("RANK", 0)), int(e.get("WORLD_SIZE", 1)), int(e.get("LOCAL_RANK", 0)))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def resolve_precision(precision: str, device: torch.device) -> str:
    """``auto`` means bf16 on a GPU that has it, fp16 on older GPUs, fp32 on the CPU."""
    if precision != "auto":
        if precision in ("bf16", "fp16") and device.type == "cpu":
            raise ValueError(f"train.precision={precision} needs a GPU; use fp32 or auto on the CPU")
        return precision
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "fp32"


# ----------------------------------------------------------------------------------------------------
# Data order: a pure function of (seed, step), so resuming needs only the step counter
# ----------------------------------------------------------------------------------------------------


def steps_per_epoch(num_rows: int, batch_size: int) -> int:
    return num_rows // batch_size


def total_steps(cfg: RunConfig, num_rows: int) -> int:
    spe = steps_per_epoch(num_rows, cfg.train.batch_size)
    if spe == 0 and cfg.train.max_steps is None:
        raise ValueError(
            f"{num_rows} training rows are fewer than train.batch_size={cfg.train.batch_size}; "
            "lower batch_size or add data"
        )
    return cfg.train.max_steps or cfg.train.epochs * spe


def step_rows(step: int, num_rows: int, cfg: RunConfig) -> torch.Tensor:
    """Row indices of optimizer step ``step`` (0-based) over all ranks: a pure function of (seed, step).

    Each epoch is a permutation seeded by (seed, epoch); step s reads rows [s·B, (s+1)·B) of it.
    Epochs with a partial last batch drop it.
    """
    bsz = cfg.train.batch_size
    spe = max(1, steps_per_epoch(num_rows, bsz))
    epoch, pos = divmod(step, spe)
    g = torch.Generator().manual_seed(cfg.train.seed * 100_003 + epoch)
    order = torch.randperm(num_rows, generator=g)
    if bsz > num_rows:  # max_steps with a tiny dataset: wrap around within the epoch
        return order.repeat(math.ceil(bsz / num_rows))[:bsz]
    return order[pos * bsz : (pos + 1) * bsz]


def micro_batches(step: int, num_rows: int, cfg: RunConfig, env: DistEnv) -> Iterator[list[int]]:
    """This rank's micro-batches of step ``step``: micro-batch k of rank r is slice k·world + r."""
    batch, micro = step_rows(step, num_rows, cfg), cfg.micro_batch_size
    for k in range(cfg.train.grad_accum):
        start = (k * env.world_size + env.rank) * micro
        yield batch[start : start + micro].tolist()


def lr_factor(step: int, total: int, cfg: RunConfig) -> float:
    """Linear warmup then cosine/linear decay to ``min_lr_ratio`` (multiplies each group's lr)."""
    t = cfg.train
    warmup = t.warmup_steps if t.warmup_steps is not None else int(t.warmup_ratio * total)
    if step < warmup:
        return (step + 1) / (warmup + 1)
    if t.lr_scheduler == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    decay = 0.5 * (1 + math.cos(math.pi * progress)) if t.lr_scheduler == "cosine" else 1 - progress
    return t.min_lr_ratio + (1 - t.min_lr_ratio) * decay


def param_groups(model: nn.Module, cfg: RunConfig) -> list[dict[str, Any]]:
    """AdamW groups: no weight decay on biases and norms; LoRA+ gives lora_B its own lr."""
    groups: dict[tuple[bool, bool], list[nn.Parameter]] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        decay = p.ndim >= 2 and "norm" not in name
        is_b = cfg.lora.lr_ratio_b is not None and "lora_B" in name
        groups.setdefault((decay, is_b), []).append(p)
    out = []
    for (decay, is_b), params in sorted(groups.items()):
        lr = cfg.train.lr * (cfg.lora.lr_ratio_b if is_b else 1.0)
        out.append({"params": params, "weight_decay": cfg.train.weight_decay if decay else 0.0, "lr": lr})
    return out


# ----------------------------------------------------------------------------------------------------
# Backends: the same loop drives a plain torch optimizer or a DeepSpeed engine
# ----------------------------------------------------------------------------------------------------


class _Backend:
    model: nn.Module
    env: DistEnv

    def forward_backward(self, batch: dict[str, torch.Tensor], step_tokens: int) -> torch.Tensor:
        """Loss of one micro-batch as (sum of its token losses) / ``step_tokens``, the trained tokens
        of the whole step on every rank; backpropagated so the update follows that global token mean."""

    def optimizer_step(self) -> float | None: ...
    def lr(self) -> float: ...
    def save(self, path: Path) -> None: ...
    def load(self, path: Path) -> None: ...

    def all_reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        return t

    def barrier(self) -> None:
        pass

    def close(self) -> None:
        """Release what the backend holds beyond Python objects (DeepSpeed's hooks and buffers)."""


class PlainBackend(_Backend):
    """One process: torch AdamW, LambdaLR, autocast on GPUs, clipping, accumulation."""

    def __init__(self, model: nn.Module, cfg: RunConfig, total: int, device: torch.device, precision: str):
        self.model, self.cfg, self.device, self.env = model, cfg, device, DistEnv()
        self.opt = torch.optim.AdamW(param_groups(model, cfg), lr=cfg.train.lr, betas=cfg.train.adam_betas)
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, lambda s: lr_factor(s, total, cfg))
        amp = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
        self.autocast = torch.autocast(device.type, dtype=amp) if amp else nullcontext()
        self.scaler = torch.amp.GradScaler(device.type) if precision == "fp16" else None

    def forward_backward(self, batch, step_tokens):
        with self.autocast:
            loss = self.model(**batch, num_items_in_batch=step_tokens).loss
        (self.scaler.scale(loss) if self.scaler else loss).backward()
        return loss.detach()

    def optimizer_step(self):
        params = [p for g in self.opt.param_groups for p in g["params"]]
        if self.scaler:
            self.scaler.unscale_(self.opt)
        clip = self.cfg.train.max_grad_norm
        norm = torch.nn.utils.clip_grad_norm_(params, clip if clip else float("inf"))
        skipped = False
        if self.scaler:
            scale = self.scaler.get_scale()
            self.scaler.step(self.opt)  # skips the update when a gradient overflowed ...
            self.scaler.update()  # ... and lowers the scale
            skipped = self.scaler.get_scale() < scale
        else:
            self.opt.step()
        if not skipped:  # as DeepSpeed's fp16 engine: a skipped update does not advance the schedule
            self.sched.step()
        self.opt.zero_grad(set_to_none=True)
        return float(norm)

    def lr(self):
        return self.opt.param_groups[0]["lr"]

    def save(self, path):
        from safetensors.torch import save_file

        trainable = {
            n: p.detach().cpu().contiguous() for n, p in self.model.named_parameters() if p.requires_grad
        }
        save_file(trainable, str(path / "trainable.safetensors"))
        state = {"optimizer": self.opt.state_dict(), "scheduler": self.sched.state_dict()}
        if self.scaler:  # fp16: the loss scale decides which later steps overflow and are skipped
            state["scaler"] = self.scaler.state_dict()
        torch.save(state, path / "optim.pt")

    def load(self, path):
        from safetensors.torch import load_file

        state = load_file(str(path / "trainable.safetensors"))
        params = dict(self.model.named_parameters())
        with torch.no_grad():
            for n, t in state.items():
                params[n].copy_(t)
        opt = torch.load(path / "optim.pt", weights_only=True)
        self.opt.load_state_dict(opt["optimizer"])
        self.sched.load_state_dict(opt["scheduler"])
        if self.scaler and "scaler" in opt:
            self.scaler.load_state_dict(opt["scaler"])


def deepspeed_config(cfg: RunConfig, precision: str) -> dict[str, Any]:
    """The DeepSpeed config: ``train.deepspeed_config`` (its "auto" values filled) or one built from
    ``zero_stage``/offload. Batch sizes, clipping and precision always come from the run config."""
    t = cfg.train
    if t.deepspeed_config:
        path = Path(t.deepspeed_config)
        if not path.is_file():
            raise FileNotFoundError(
                f"train.deepspeed_config={path} does not exist; use one of deploy/deepspeed/*.json or unset it"
            )
        ds = json.loads(path.read_text())
        for owned in ("optimizer", "scheduler"):
            if ds.pop(owned, None) is not None:
                log.info("ignoring %r in %s: deltatune builds it from train.*", owned, path)
    else:
        zero: dict[str, Any] = {"stage": cfg.zero_stage}
        if t.offload_optimizer:
            zero["offload_optimizer"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
        if t.offload_params:
            zero["offload_param"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
        ds = {"zero_optimization": zero}
    fill = {
        "train_batch_size": t.batch_size,
        "train_micro_batch_size_per_gpu": cfg.micro_batch_size,
        "gradient_accumulation_steps": t.grad_accum,
        "gradient_clipping": t.max_grad_norm or 0.0,
    }
    for key, value in fill.items():
        have = ds.get(key, "auto")
        if have != "auto" and have != value:
            raise ValueError(
                f'{t.deepspeed_config}: {key}={have} conflicts with the run config ({value}); set it to "auto"'
            )
        ds[key] = value
    ds["bf16"] = {"enabled": precision == "bf16"}
    ds["fp16"] = {"enabled": precision == "fp16"}
    zero = ds.setdefault("zero_optimization", {"stage": cfg.zero_stage})
    if zero.get("stage") == 3:
        zero.setdefault("stage3_gather_16bit_weights_on_model_save", True)
    # torch's AdamW: no C++ op to build, also with a CPU-offloaded optimizer (shared/FACTS.md).
    ds["zero_force_ds_cpu_optimizer"] = False
    ds.setdefault("steps_per_print", 10**9)
    ds.setdefault("wall_clock_breakdown", False)
    return ds


class DeepSpeedBackend(_Backend):
    """Any number of ranks (or one) through ``deepspeed.initialize`` and ZeRO stage 0-3."""

    def __init__(self, model: nn.Module, cfg: RunConfig, total: int, ds_config: dict, env: DistEnv):
        import deepspeed

        self.cfg, self.env, self.ds_config = cfg, env, ds_config
        opt = torch.optim.AdamW(param_groups(model, cfg), lr=cfg.train.lr, betas=cfg.train.adam_betas)
        self.engine, self.opt, _, self.sched = deepspeed.initialize(
            model=model,
            optimizer=opt,
            lr_scheduler=lambda o: torch.optim.lr_scheduler.LambdaLR(o, lambda s: lr_factor(s, total, cfg)),
            config=ds_config,
        )
        self.model = self.engine.module
        self.stage = ds_config["zero_optimization"].get("stage", 0)

    def forward_backward(self, batch, step_tokens):
        batch = {k: v.to(self.engine.device) for k, v in batch.items()}
        loss = self.engine(**batch, num_items_in_batch=step_tokens).loss
        # The loss is already a share of the step's global token mean: no 1/grad_accum scaling, and
        # x world_size to undo DeepSpeed's averaging of gradients over ranks.
        self.engine.backward(loss * self.env.world_size, scale_wrt_gas=False)
        self.engine.step()  # applies the update only at the accumulation boundary
        return loss.detach().float()

    def optimizer_step(self):
        norm = self.engine.get_global_grad_norm()
        return None if norm is None else float(norm)

    def lr(self):
        return self.engine.get_lr()[0]

    def save(self, path):
        self.engine.save_checkpoint(
            str(path.parent),
            tag=path.name,
            save_latest=False,
            exclude_frozen_parameters=self.cfg.method != "full",
        )

    def load(self, path):
        load_path, _ = self.engine.load_checkpoint(
            str(path.parent),
            tag=path.name,
            load_module_strict=self.cfg.method == "full",
            load_optimizer_states=True,
            load_lr_scheduler_states=True,
        )
        if load_path is None:
            raise ckpt.UnreadableCheckpointError(
                f"DeepSpeed could not load checkpoint {path}; delete that directory to resume from the "
                "one before it, or start fresh under a new run name"
            )

    def all_reduce_sum(self, t):
        import torch.distributed as dist

        # On the engine's device: NCCL reduces CUDA tensors only (gloo, CI's backend, takes either).
        on_device = t.to(self.engine.device)
        dist.all_reduce(on_device, op=dist.ReduceOp.SUM)
        return on_device.to(t.device)

    def barrier(self):
        import torch.distributed as dist

        dist.barrier()

    def close(self):
        self.engine.destroy()


# ----------------------------------------------------------------------------------------------------
# The loop
# ----------------------------------------------------------------------------------------------------


@dataclass
class TrainResult:
    output_dir: Path  # adapter/ for lora and qlora, model/ for full
    summary: dict[str, Any]


def _peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _truncate_metrics(path: Path, last_step: int) -> None:
    """Keep metric lines up to the step training restarts from (none for a fresh start), so the file
    reads as one uninterrupted run; a line torn by a kill mid-write is dropped too."""
    if not path.is_file():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line)["step"] <= last_step:
                keep.append(line)
        except (json.JSONDecodeError, KeyError, TypeError):
            continue
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(ln + "\n" for ln in keep))
    tmp.replace(path)


def _build_model(cfg: RunConfig, source: str, device: torch.device, ds_config: dict | None) -> nn.Module:
    if ds_config and ds_config["zero_optimization"].get("stage") == 3 and cfg.method == "full":
        # Keeps from_pretrained partitioning weights as they load (zero.Init), so a model larger than
        # one device's memory can be loaded at all. Must stay referenced while loading.
        from transformers.integrations import HfDeepSpeedConfig

        hf_ds = HfDeepSpeedConfig(ds_config)  # noqa: F841
    quant = cfg.quant if cfg.method == "qlora" else None
    # DeepSpeed places the model itself, but 4-bit weights are quantized where they will live.
    on_device = ds_config is None or quant is not None
    model = load_model(cfg.model, source=source, quant=quant, device=device if on_device else None)
    model.config.use_cache = False
    if cfg.train.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if cfg.method != "full":
            model.enable_input_require_grads()  # the frozen embeddings' output must carry grad
    if cfg.method != "full":
        inject_lora(model, cfg.lora)  # adapters are created on their base weight's device
    return model


def _save_final(backend: _Backend, cfg: RunConfig, run_dir: Path, tokenizer) -> Path:
    model, env = backend.model, backend.env
    zero3 = isinstance(backend, DeepSpeedBackend) and backend.stage == 3
    if cfg.method == "full":
        out = run_dir / "model"
        sd = backend.engine._zero3_consolidated_16bit_state_dict() if zero3 else None  # collective
        if env.is_main:
            with writing_dir(out) as tmp:
                model.save_pretrained(tmp, state_dict=sd, safe_serialization=True)
                tokenizer.save_pretrained(tmp)
        return out
    out = run_dir / "adapter"
    params = adapter_params(model, cfg.lora.modules_to_save)
    if zero3:
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(params.values()), modifier_rank=None):
            sd = {k: v.detach().cpu().clone() for k, v in params.items()}
    else:
        sd = {k: v.detach().cpu().contiguous() for k, v in params.items()}
    if env.is_main:
        save_adapter(model, out, cfg.lora, base_model=cfg.model.name_or_path, state_dict=sd)
    return out


def train(cfg: RunConfig, run_dir: str | Path, train_data: str | Path) -> TrainResult:
    """Train per ``cfg`` in this process (one rank of many under a launcher, or alone).

    Resumes from the newest complete checkpoint in ``run_dir/checkpoints`` written by the same
    training configuration; a finished run (``train_summary.json`` present) returns at once.
    """
    run_dir = Path(run_dir)
    env = DistEnv.from_environ()
    fingerprint, data_fp = ckpt.training_fingerprint(cfg), ckpt.data_fingerprint(train_data)
    summary_path = run_dir / SUMMARY
    finished = None
    if summary_path.is_file():
        summary = json.loads(summary_path.read_text())
        same = (summary.get("fingerprint"), summary.get("data_fingerprint")) == (fingerprint, data_fp)
        if same and Path(summary["output_dir"]).exists():
            finished = TrainResult(Path(summary["output_dir"]), summary)
    if finished is not None and env.world_size == 1:
        log.info("training already finished (%s); nothing to do", summary_path)
        return finished
    ckpt_root = run_dir / "checkpoints"
    resume = ckpt.latest_complete(ckpt_root, fingerprint, data_fp)  # raises on a config or data mismatch

    use_ds = cfg.method == "full" or env.world_size > 1
    if use_ds:
        if "MASTER_ADDR" not in os.environ:  # one DeepSpeed process without a launcher
            os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1")
            os.environ.setdefault("MASTER_PORT", str(_free_port()))
        import deepspeed

        # Before anything reads the world size (HfDeepSpeedConfig validates batch sizes against it).
        deepspeed.init_distributed()
    if env.world_size != cfg.world_size:
        raise ValueError(
            f"launched with WORLD_SIZE={env.world_size} but the config asks for {cfg.world_size} processes "
            "(train.num_processes x train.num_nodes); launch through core.launch"
        )
    device = pick_device(env.local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if env.world_size > 1:
        # Every rank must start from the same place, or the collectives of the loop pair up wrongly and
        # hang: ranks on nodes that do not share run_dir see different checkpoints and summaries.
        _same_on_every_rank(-1 if finished is not None else (resume.step if resume else 0), device, run_dir)
        if finished is not None:
            log.info("training already finished (%s); nothing to do", summary_path)
            return finished
    precision = resolve_precision(cfg.train.precision, device)
    torch.manual_seed(cfg.train.seed)

    rows = load_split(train_data)
    num_rows = len(rows)
    # Tokens each row trains (labels after the causal shift): every rank derives a step's global
    # token count from the data order alone, without a collective.
    row_tokens = torch.tensor([sum(t != -100 for t in labels[1:]) for labels in rows["labels"]])
    total = total_steps(cfg, num_rows)
    source = resolve_source(cfg.model.name_or_path, storage_options=cfg.model.storage_options)
    tokenizer = load_tokenizer(cfg.model)
    ds_config = deepspeed_config(cfg, precision) if use_ds else None
    model = _build_model(cfg, source, device, ds_config)
    trainable, n_total = count_parameters(model)
    model.train()
    backend: _Backend
    if use_ds:
        backend = DeepSpeedBackend(model, cfg, total, ds_config, env)
    else:
        backend = PlainBackend(model, cfg, total, device, precision)

    start = 0
    # Counters of the steps before this attempt, carried in the checkpoint's meta so that the summary
    # covers the whole run, not the last attempt (time lost between a checkpoint and a kill is not counted).
    tokens_before, seconds_before = 0, 0.0
    metrics_path = run_dir / METRICS
    if resume is not None:
        backend.load(resume.path)
        ckpt.load_rng(resume.path, env.rank)
        start = resume.step
        tokens_before = int(resume.meta.get("tokens", 0))
        seconds_before = float(resume.meta.get("train_time_s", 0.0))
        if env.is_main:
            log.info("resumed from %s (step %d of %d)", resume.path, start, total)
    if env.is_main:
        _truncate_metrics(metrics_path, start)
    if env.is_main:
        log.info(
            "training %s: %d steps, %d rows, batch %d (micro %d x accum %d x %d ranks), %s, %s trainable of %s",
            cfg.method,
            total,
            num_rows,
            cfg.train.batch_size,
            cfg.micro_batch_size,
            cfg.train.grad_accum,
            env.world_size,
            precision,
            f"{trainable:,}",
            f"{n_total:,}",
        )
    bar = _progress(total, start, env)
    pad_id = tokenizer.pad_token_id
    t_start = time.perf_counter()
    tokens_total = 0
    last_loss = float("nan")
    with metrics_path.open("a") if env.is_main else nullcontext() as mf:
        for step in range(start, total):
            t0 = time.perf_counter()
            loss_sum = torch.zeros(2, dtype=torch.float64)  # (this rank's share of the loss, its tokens)
            step_lr = backend.lr()  # the lr this step's update uses (the scheduler steps inside it)
            step_tokens = int(row_tokens[step_rows(step, num_rows, cfg)].sum())
            for idx in micro_batches(step, num_rows, cfg, env):
                batch = collate([rows[i] for i in idx], pad_id)
                if not use_ds:
                    batch = {k: v.to(device) for k, v in batch.items()}
                loss_sum[0] += backend.forward_backward(batch, step_tokens).double().cpu()
                loss_sum[1] += int(batch["attention_mask"].sum())
            grad_norm = backend.optimizer_step()
            stats = backend.all_reduce_sum(loss_sum.to(torch.float64))
            if not math.isfinite(float(stats[0])):
                raise FloatingPointError(f"loss is {float(stats[0])} at step {step + 1}; lower train.lr")
            dt = time.perf_counter() - t0
            last_loss = float(stats[0])  # the step's token-mean loss over all ranks
            tokens_total += int(stats[1])
            done = step + 1
            if env.is_main:
                rec = {
                    "step": done,
                    "loss": round(last_loss, 6),
                    "lr": step_lr,
                    "grad_norm": None if grad_norm is None else round(grad_norm, 6),
                    "tokens": int(stats[1]),
                    "tokens_per_s": round(int(stats[1]) / dt, 1),
                    "step_time_s": round(dt, 4),
                    "peak_mem_mb": round(_peak_memory_mb(device), 1),
                }
                mf.write(json.dumps(rec) + "\n")
                mf.flush()
                bar.update(1)
                bar.set_postfix(loss=f"{last_loss:.4f}", lr=f"{rec['lr']:.2e}")
                if done % cfg.train.log_every == 0 or done == total:
                    log.info(
                        "step %d/%d loss %.4f lr %.3e tok/s %.0f",
                        done,
                        total,
                        last_loss,
                        rec["lr"],
                        rec["tokens_per_s"],
                    )
            if cfg.train.save_every and done % cfg.train.save_every == 0 and done < total:
                meta = {
                    "fingerprint": fingerprint,
                    "data_fingerprint": data_fp,
                    "method": cfg.method,
                    "tokens": tokens_before + tokens_total,
                    "train_time_s": round(seconds_before + time.perf_counter() - t_start, 3),
                }
                _save_checkpoint(backend, ckpt_root, done, meta, cfg.train.keep_last)
    bar.close()
    out = _save_final(backend, cfg, run_dir, tokenizer)
    backend.barrier()
    backend.close()
    summary = {
        "method": cfg.method,
        "output_dir": str(out),
        "steps": total,
        "resumed_from_step": start if resume else None,
        "final_loss": last_loss,
        "wall_time_s": round(seconds_before + time.perf_counter() - t_start, 2),  # every attempt
        "attempt_wall_time_s": round(time.perf_counter() - t_start, 2),
        "tokens": tokens_before + tokens_total,  # processed (attention mask), over steps 1..total
        "peak_mem_mb": round(_peak_memory_mb(device), 1),  # this attempt's
        "trainable_params": trainable,
        "total_params": n_total,
        "trainable_share": trainable / n_total,
        "world_size": env.world_size,
        "zero_stage": backend.stage if use_ds else None,  # the DeepSpeed config file may set it
        "precision": precision,
        "fingerprint": fingerprint,
        "data_fingerprint": data_fp,
    }
    if env.is_main:
        tmp = summary_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(summary, indent=2))
        tmp.replace(summary_path)
        log.info("training done: %s", json.dumps(summary))
        if not cfg.train.keep_checkpoints and ckpt_root.is_dir():
            shutil.rmtree(ckpt_root)  # the outputs and summary supersede them; a new config starts clean
    return TrainResult(out, summary)


def _same_on_every_rank(start: int, device: torch.device, run_dir: Path) -> None:
    """Raise on every rank unless all of them pass the same ``start`` (-1: already finished)."""
    import torch.distributed as dist

    t = torch.tensor([start, -start], dtype=torch.int64, device=device)  # NCCL needs a device tensor
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    high, low = int(t[0]), -int(t[1])
    if high != low:
        raise ValueError(
            f"ranks disagree on where training stands in {run_dir} (steps {low} and {high}; -1 = finished): "
            "every node must see the same run directory. Put output_dir on a filesystem shared by all "
            "nodes (NFS, Lustre, a mounted bucket), or remove the stale checkpoints/summary on the nodes"
        )


def _save_checkpoint(backend: _Backend, root: Path, step: int, meta: dict, keep_last: int) -> None:
    env = backend.env
    path = root / ckpt.step_dir_name(step)
    if env.is_main:
        if path.exists():  # a torn write of this same step from a killed attempt
            shutil.rmtree(path)
        path.mkdir(parents=True)
    backend.barrier()
    backend.save(path)
    ckpt.save_rng(path, env.rank)
    backend.barrier()  # every rank has written its shards and RNG state
    if env.is_main:
        ckpt.mark_complete(
            path,
            {"step": step, "world_size": env.world_size, **meta},
        )
        ckpt.prune(root, keep_last)
        log.info("checkpoint %s complete", path)
    backend.barrier()


def _progress(total: int, start: int, env: DistEnv):
    from tqdm import tqdm

    return tqdm(
        total=total,
        initial=start,
        disable=not (env.is_main and sys.stderr.isatty()),
        desc="train",
        unit="step",
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run-dir", required=True, help="run directory holding run_config.yaml")
    p.add_argument("--train-data", required=True, help="prepared train split (datasets save_to_disk dir)")
    p.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # the deepspeed launcher's
    args = p.parse_args(argv)
    if args.local_rank is not None:
        os.environ.setdefault("LOCAL_RANK", str(args.local_rank))
    env = DistEnv.from_environ()
    # DeepSpeed 0.19 calls this deprecated collective every step; one warning per step drowns the log.
    warnings.filterwarnings(
        "ignore", message=r".*all_gather_into_tensor.* is deprecated", category=FutureWarning
    )
    if env.world_size > 1:
        set_pdeathsig()  # a rank dies with its launcher: no orphan ranks
    logging.basicConfig(
        level=logging.INFO if env.is_main else logging.WARNING,
        format=f"%(asctime)s [rank{env.rank}] %(levelname)s %(name)s: %(message)s",
        stream=sys.stdout,
    )
    try:
        train(read_resolved(args.run_dir), args.run_dir, args.train_data)
    except Exception as e:
        # Every rank records its own failure; the supervisor reads them to decide whether a retry can help.
        err = {"type": type(e).__name__, "message": str(e), "retryable": is_retryable(e), "rank": env.rank}
        path = error_file(Path(args.run_dir), env.rank)
        path.with_suffix(".tmp").write_text(json.dumps(err))
        path.with_suffix(".tmp").replace(path)  # a rank killed mid-write leaves no torn file
        raise
    _leave_process_group()
    return 0


def _leave_process_group() -> None:
    """Leave the rank group together and in order before the interpreter exits.

    Without this, a rank that finishes first closes its sockets while a peer's gloo threads are still
    joinable; the peer then dies in its C++ teardown ("terminate called without an active exception",
    SIGABRT) after a run that succeeded, and the launcher reports the whole run failed.
    """
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
