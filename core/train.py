"""The train stage: full fine-tuning, LoRA or QLoRA, one process or many, resuming from step checkpoints.

    python -m core.train --run-dir runs/demo --train-data runs/demo/data/train      # one process
    python -m torch.distributed.run --nproc_per_node 2 -m core.train --run-dir ... # N ranks (core.launch)

Every multi-process run goes through one DeepSpeed engine (ZeRO stage 0 is plain data parallel): the
path CI exercises with 2 CPU ranks over gloo is the one GPUs run. A single LoRA/QLoRA process uses a
plain torch loop. ``train()`` is ``setup()`` -> ``loop()`` -> ``finish()``. Never imports prefect:
progress is reported through files in the run directory.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import resource
import shutil
import socket
import sys
import time
import warnings
from collections.abc import Iterator
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from core.process import SUPERVISOR_PID_ENV, parent_of, set_pdeathsig

# ruff: noqa: E402  (a rank arms its death signal before the heavy imports below)

if __name__ == "__main__" and int(os.environ.get("WORLD_SIZE", "1")) > 1 and sys.platform == "linux":
    # Die with the launcher from the first moment, not only from main(): importing torch and
    # transformers takes seconds, and a launcher killed meanwhile left its ranks running under init
    # (tests/test_distributed.py::test_launcher_killed_during_startup_leaves_no_rank).
    _launcher_pid = os.getppid()
    set_pdeathsig()
    # A launcher that died before that line leaves this rank re-parented, and the signal armed on the
    # wrong parent. core.launch names the supervisor of a torchrun launch, which is this rank's
    # grandparent for as long as the launcher lives.
    _supervisor = os.environ.get(SUPERVISOR_PID_ENV)
    if os.getppid() != _launcher_pid or (_supervisor and parent_of(_launcher_pid) != int(_supervisor)):
        os._exit(1)

import torch
from torch import nn

from core import checkpoint as ckpt
from core.adapter import adapter_params, save_adapter
from core.config import RunConfig
from core.data import collate, load_split, trained_tokens
from core.errors import is_retryable
from core.fsutil import atomic_write, writing_dir
from core.lora import InjectionReport, count_parameters, inject_lora
from core.modeling import load_model, load_tokenizer, pick_device, resolve_source
from core.run import RunDir, data_fingerprint, training_fingerprint
from core.schedule import lr_factor, step_rows, total_steps
from core.startup import TRAINING, mark
from core.targets import count_kinds
from core.trackers import Trackers

log = logging.getLogger(__name__)


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
# Data order (core.schedule): this rank's share of a step
# ----------------------------------------------------------------------------------------------------


def micro_batches(step: int, num_rows: int, cfg: RunConfig, env: DistEnv) -> Iterator[list[int]]:
    """This rank's micro-batches of step ``step``: micro-batch k of rank r is slice k·world + r."""
    batch, micro = step_rows(step, num_rows, cfg), cfg.micro_batch_size
    for k in range(cfg.train.grad_accum):
        start = (k * env.world_size + env.rank) * micro
        yield batch[start : start + micro].tolist()


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

        # Both files are read before anything is applied: one that fails to read changes nothing.
        state = load_file(str(path / "trainable.safetensors"))
        opt = torch.load(path / "optim.pt", weights_only=True)
        params = dict(self.model.named_parameters())
        with torch.no_grad():
            for n, t in state.items():
                params[n].copy_(t)
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
    # torch's AdamW: no C++ op to build, also with a CPU-offloaded optimizer (docs/environment.md).
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
            raise ckpt.UnreadableCheckpointError(f"DeepSpeed found no checkpoint to load in {path}")

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
# setup -> loop -> finish
# ----------------------------------------------------------------------------------------------------


@dataclass
class TrainResult:
    output_dir: Path  # adapter/ for lora and qlora, model/ for full
    summary: dict[str, Any]


@dataclass
class Session:
    """One attempt at training a run, built by :func:`setup` and advanced by :func:`loop`."""

    cfg: RunConfig
    run: RunDir
    env: DistEnv
    fingerprint: str  # training_fingerprint(cfg): what a checkpoint must match to be resumed
    data_fp: str  # data_fingerprint of the split
    device: torch.device
    precision: str
    rows: Any  # the prepared train split (a datasets.Dataset)
    row_tokens: torch.Tensor  # (num_rows,) tokens each row trains (labels after the causal shift)
    total: int  # optimizer steps of the whole run
    tokenizer: Any
    backend: _Backend
    trainable: int
    n_total: int
    resume: ckpt.Checkpoint | None = None
    # Complete checkpoints that failed their check or their load: deleted once a newer one is complete.
    damaged: list[Path] = field(default_factory=list)
    # Counters of the steps before this attempt, carried in the checkpoint's meta so that the summary
    # covers the whole run, not the last attempt (time lost between a checkpoint and a kill is not counted).
    tokens_before: int = 0
    seconds_before: float = 0.0
    # This attempt's progress.
    t_start: float = 0.0
    tokens: int = 0
    last_loss: float = math.nan
    trackers: Trackers | None = None  # rank 0's report_to trackers (core.trackers), while the loop runs
    adapters: InjectionReport | None = None  # lora/qlora: the modules adapted and the rule that chose them

    @property
    def start(self) -> int:
        return self.resume.step if self.resume is not None else 0

    @property
    def uses_deepspeed(self) -> bool:
        return isinstance(self.backend, DeepSpeedBackend)


def train(cfg: RunConfig, run_dir: str | Path, train_data: str | Path) -> TrainResult:
    """Train per ``cfg`` in this process (one rank of many under a launcher, or alone).

    Resumes from the newest complete, intact checkpoint in ``run_dir/checkpoints`` written by the same
    training configuration; a finished run (``train_summary.json`` present) returns at once.
    """
    session = setup(cfg, run_dir, train_data)
    if isinstance(session, TrainResult):
        return session
    if session.env.is_main and cfg.report_to:  # before step 1: a tracker that cannot start stops the run
        session.trackers = Trackers.for_training(cfg, session.run.path, start=session.start)
    try:
        loop(session)
        result = finish(session)
    except BaseException:
        if session.trackers is not None:
            session.trackers.close(failed=True)
        raise
    if session.trackers is not None:
        session.trackers.close()
    return result


def setup(cfg: RunConfig, run_dir: str | Path, train_data: str | Path) -> Session | TrainResult:
    """Everything before the first step: the process group, the resume point (agreed by every rank),
    the data, the model and its backend, the resumed state. A finished run gives its TrainResult.

    Raises:
        CheckpointMismatchError: the newest checkpoint is from another configuration or other data.
        UnreadableCheckpointError: a checkpoint failed to load (it is marked; a retry passes it by).
    """
    rd, env = RunDir(run_dir), DistEnv.from_environ()
    fingerprint, data_fp = training_fingerprint(cfg), data_fingerprint(train_data)
    summary = rd.finished(cfg, train_data)
    finished = TrainResult(Path(summary["output_dir"]), summary) if summary is not None else None
    if finished is not None and env.world_size == 1:
        log.info("training already finished (%s); nothing to do", rd.summary)
        return finished
    ckpt.latest_complete(rd.checkpoints, fingerprint, data_fp)  # raises on a config or data mismatch
    resume, damaged = ckpt.newest_intact(ckpt.list_complete(rd.checkpoints), report=env.is_main)

    use_ds = cfg.method == "full" or env.world_size > 1
    if use_ds:
        if "MASTER_ADDR" not in os.environ:  # one DeepSpeed process without a launcher
            os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1")
            os.environ.setdefault("MASTER_PORT", str(_free_port()))
        mark(rd, env.rank, "importing DeepSpeed")
        import deepspeed  # at call time: a single LoRA/QLoRA process never needs it (seconds to import)

        from core.extensions import ensure_comm_op

        # init_distributed JIT-builds this op on the CPU: build it first, under deltatune's lock, which
        # clears a stale torch build lock that would block here forever (core/extensions.py).
        ensure_comm_op(on_phase=lambda phase, detail: mark(rd, env.rank, phase, detail))
        addr = f"{os.environ['MASTER_ADDR']}:{os.environ.get('MASTER_PORT')}"
        mark(rd, env.rank, "rendezvous", f"joining the process group of {env.world_size} rank(s) at {addr}")
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
        _same_on_every_rank(-1 if finished is not None else (resume.step if resume else 0), device, rd.path)
        if finished is not None:
            log.info("training already finished (%s); nothing to do", rd.summary)
            return finished
    precision = resolve_precision(cfg.train.precision, device)
    torch.manual_seed(cfg.train.seed)

    mark(rd, env.rank, "loading the model", f"the data {train_data} and the model {cfg.model.name_or_path}")
    rows = load_split(train_data)
    # Tokens each row trains (labels after the causal shift): every rank derives a step's global
    # token count from the data order alone, without a collective.
    row_tokens = trained_tokens(rows)
    total = total_steps(cfg, len(rows))
    source = resolve_source(cfg.model.name_or_path, storage_options=cfg.model.storage_options)
    tokenizer = load_tokenizer(cfg.model)
    ds_config = deepspeed_config(cfg, precision) if use_ds else None
    model, adapters = _build_model(cfg, source, device, ds_config)
    trainable, n_total = count_parameters(model)
    model.train()
    backend: _Backend
    if use_ds:
        mark(rd, env.rank, "initializing DeepSpeed", f"deepspeed.initialize with {env.world_size} rank(s)")
        backend = DeepSpeedBackend(model, cfg, total, ds_config, env)
    else:
        backend = PlainBackend(model, cfg, total, device, precision)
    s = Session(
        cfg=cfg,
        run=rd,
        env=env,
        fingerprint=fingerprint,
        data_fp=data_fp,
        device=device,
        precision=precision,
        rows=rows,
        row_tokens=row_tokens,
        total=total,
        tokenizer=tokenizer,
        backend=backend,
        trainable=trainable,
        n_total=n_total,
        damaged=[c.path for c in damaged],
        adapters=adapters,
    )
    mark(rd, env.rank, "resuming", f"loading checkpoint {resume.path}" if resume else "no checkpoint")
    _load_resume_point(s, resume)
    mark(rd, env.rank, "first step", f"step {s.start + 1}: its collectives need every rank")
    if env.is_main:
        _truncate_metrics(rd.metrics, s.start)
        log.info(
            "training %s: %d steps, %d rows, batch %d (micro %d x accum %d x %d ranks), %s, %s trainable of %s",
            cfg.method,
            total,
            len(rows),
            cfg.train.batch_size,
            cfg.micro_batch_size,
            cfg.train.grad_accum,
            env.world_size,
            precision,
            f"{trainable:,}",
            f"{n_total:,}",
        )
    return s


def _load_resume_point(s: Session, resume: ckpt.Checkpoint | None) -> None:
    """Load ``resume`` (and this rank's RNG state) into ``s``; see :func:`_is_damage` for what counts.

    A checkpoint that fails to load is marked ``UNREADABLE``. One process then loads the newest intact
    checkpoint before it, which overwrites every trained tensor and the optimizer, scheduler and RNG
    state; with none left, or with several ranks (a peer may be waiting inside a collective of the
    load), it stops with a retryable error, and the retry passes the marked checkpoint by.
    """
    while resume is not None:
        try:
            s.backend.load(resume.path)
            ckpt.load_rng(resume.path, s.env.rank)
            break
        except Exception as e:
            if not _is_damage(e):
                raise
            ckpt.mark_unreadable(resume, e)
            s.damaged.append(resume.path)
            older = [c for c in ckpt.list_complete(s.run.checkpoints) if c.step < resume.step]
            failed, (resume, damaged) = resume, ckpt.newest_intact(older, report=s.env.is_main)
            s.damaged += [c.path for c in damaged]
            what = (
                f"checkpoint {failed.path} could not be loaded on rank {s.env.rank} ({type(e).__name__}: {e})"
            )
            if s.env.world_size > 1 or resume is None:
                then = "the one before it" if resume is not None else "step 0"
                raise ckpt.UnreadableCheckpointError(
                    f"{what}; it is marked {ckpt.UNREADABLE}, so a retry resumes from {then}"
                ) from e
            log.warning(
                "%s; it is marked %s; resuming from %s instead", what, ckpt.UNREADABLE, resume.path.name
            )
    s.resume = resume
    if resume is not None:
        s.tokens_before = int(resume.meta.get("tokens", 0))
        s.seconds_before = float(resume.meta.get("train_time_s", 0.0))
        if s.env.is_main:
            log.info("resumed from %s (step %d of %d)", resume.path, resume.step, s.total)


def _is_damage(exc: Exception) -> bool:
    """Whether a failed load says the checkpoint itself is bad (a torn or foreign file), rather than
    this machine (out of memory) or a passing I/O error, after which the checkpoint may load."""
    if isinstance(exc, (torch.OutOfMemoryError, MemoryError)):
        return False
    return not isinstance(exc, OSError) or isinstance(exc, FileNotFoundError)


def loop(s: Session) -> None:
    """Optimizer steps ``s.start`` .. ``s.total``: one metrics line per step, a log line every
    ``train.log_every`` steps, a checkpoint every ``train.save_every`` (but the last)."""
    cfg, env, backend = s.cfg, s.env, s.backend
    num_rows, pad_id = len(s.rows), s.tokenizer.pad_token_id
    flatten = _flatten_packed(s)
    bar = _progress(s.total, s.start, env)
    s.t_start = time.perf_counter()
    with s.run.metrics.open("a") if env.is_main else nullcontext() as mf:
        for step in range(s.start, s.total):
            t0 = time.perf_counter()
            loss_sum = torch.zeros(2, dtype=torch.float64)  # (this rank's share of the loss, its tokens)
            step_lr = backend.lr()  # the lr this step's update uses (the scheduler steps inside it)
            step_tokens = int(s.row_tokens[step_rows(step, num_rows, cfg)].sum())
            for idx in micro_batches(step, num_rows, cfg, env):
                rows = [s.rows[i] for i in idx]
                batch = collate(rows, pad_id, flatten=flatten)
                if not s.uses_deepspeed:
                    batch = {k: v.to(s.device) for k, v in batch.items()}
                loss_sum[0] += backend.forward_backward(batch, step_tokens).double().cpu()
                loss_sum[1] += sum(len(r["input_ids"]) for r in rows)  # real tokens: padding is none
            grad_norm = backend.optimizer_step()
            stats = backend.all_reduce_sum(loss_sum.to(torch.float64))
            if not math.isfinite(float(stats[0])):
                raise FloatingPointError(f"loss is {float(stats[0])} at step {step + 1}; lower train.lr")
            dt = time.perf_counter() - t0
            s.last_loss = float(stats[0])  # the step's token-mean loss over all ranks
            s.tokens += int(stats[1])
            done = step + 1
            if done == s.start + 1:
                mark(s.run, env.rank, TRAINING, f"step {done} done")  # start-up is over (core.startup)
            if env.is_main:
                rec = {
                    "step": done,
                    "loss": round(s.last_loss, 6),
                    "lr": step_lr,
                    "grad_norm": None if grad_norm is None else round(grad_norm, 6),
                    "tokens": int(stats[1]),
                    "tokens_per_s": round(int(stats[1]) / dt, 1),
                    "step_time_s": round(dt, 4),
                    "peak_mem_mb": round(_peak_memory_mb(s.device), 1),
                }
                mf.write(json.dumps(rec) + "\n")
                mf.flush()
                if s.trackers is not None:
                    s.trackers.log_step(rec)
                bar.update(1)
                bar.set_postfix(loss=f"{s.last_loss:.4f}", lr=f"{rec['lr']:.2e}")
                if done % cfg.train.log_every == 0 or done == s.total:
                    log.info(
                        "step %d/%d loss %.4f lr %.3e tok/s %.0f",
                        done,
                        s.total,
                        s.last_loss,
                        rec["lr"],
                        rec["tokens_per_s"],
                    )
            if cfg.train.save_every and done % cfg.train.save_every == 0 and done < s.total:
                _save_checkpoint(s, done)
    bar.close()


def _flatten_packed(s: Session) -> bool:
    """Whether micro-batches of packed rows go in as one (1, sum of lengths) row: flash-attention-2
    reads packed rows from position ids at batch size 1 only (``_is_packed_sequence`` in
    transformers/modeling_flash_attention_utils.py); sdpa and eager take (B, T) packed rows
    (``find_packed_sequence_indices`` in transformers/masking_utils.py). docs/packing.md."""
    if "position_ids" not in s.rows.column_names:
        return False
    impl = getattr(s.backend.model.config, "_attn_implementation", None) or ""
    return "flash" in impl


def finish(s: Session) -> TrainResult:
    """The final adapter or model, ``train_summary.json``, and the step checkpoints it supersedes."""
    cfg, env, rd = s.cfg, s.env, s.run
    out = _save_final(s.backend, cfg, rd, s.tokenizer)
    s.backend.barrier()
    s.backend.close()
    summary = {
        "method": cfg.method,
        "output_dir": str(out),
        "steps": s.total,
        "resumed_from_step": s.start if s.resume else None,
        "final_loss": s.last_loss,
        "wall_time_s": round(s.seconds_before + time.perf_counter() - s.t_start, 2),  # every attempt
        "attempt_wall_time_s": round(time.perf_counter() - s.t_start, 2),
        "tokens": s.tokens_before + s.tokens,  # processed (real, not padding), over steps 1..total
        "peak_mem_mb": round(_peak_memory_mb(s.device), 1),  # this attempt's
        "trainable_params": s.trainable,
        "total_params": s.n_total,
        "trainable_share": s.trainable / s.n_total,
        "world_size": env.world_size,
        "zero_stage": s.backend.stage if s.uses_deepspeed else None,  # the DeepSpeed config file may set it
        "precision": s.precision,
        "fingerprint": s.fingerprint,
        "data_fingerprint": s.data_fp,
    }
    if s.adapters is not None:  # what was adapted, not what was asked for (README, "Model families")
        summary["adapters"] = adapter_record(s.adapters)
    if env.is_main:
        rd.write_json(rd.summary, summary)
        log.info("training done: %s", json.dumps(summary))
        if not cfg.train.keep_checkpoints and rd.checkpoints.is_dir():
            shutil.rmtree(rd.checkpoints)  # the outputs and summary supersede them; a new config starts clean
        else:
            ckpt.remove(s.damaged)  # the finished output is their successor
    return TrainResult(out, summary)


def adapter_record(report: InjectionReport) -> dict[str, Any]:
    """The adapted modules for train_summary.json and the manifest: the rule that chose them, how many
    of each kind, every path, and the ranks where rank_pattern made them differ."""
    record: dict[str, Any] = {
        "rule": report.rule,
        "count": len(report.targets),
        "kinds": count_kinds(report.targets),
    }
    if len(set(report.ranks.values())) > 1:
        record["ranks"] = dict(report.ranks)
    record["modules"] = list(report.targets)
    return record


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
    atomic_write(path, "".join(ln + "\n" for ln in keep))


def _build_model(
    cfg: RunConfig, source: str, device: torch.device, ds_config: dict | None
) -> tuple[nn.Module, InjectionReport | None]:
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
    report = inject_lora(model, cfg.lora) if cfg.method != "full" else None  # on their base weight's device
    return model, report


def _save_final(backend: _Backend, cfg: RunConfig, rd: RunDir, tokenizer) -> Path:
    model, env = backend.model, backend.env
    zero3 = isinstance(backend, DeepSpeedBackend) and backend.stage == 3
    out = rd.trained_dir(cfg.method)
    if cfg.method == "full":
        sd = backend.engine._zero3_consolidated_16bit_state_dict() if zero3 else None  # collective
        if env.is_main:
            with writing_dir(out) as tmp:
                model.save_pretrained(tmp, state_dict=sd, safe_serialization=True)
                tokenizer.save_pretrained(tmp)
        return out
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


def _save_checkpoint(s: Session, step: int) -> None:
    backend, env, root = s.backend, s.env, s.run.checkpoints
    meta = {
        "step": step,
        "world_size": env.world_size,
        "fingerprint": s.fingerprint,
        "data_fingerprint": s.data_fp,
        "method": s.cfg.method,
        "tokens": s.tokens_before + s.tokens,
        "train_time_s": round(s.seconds_before + time.perf_counter() - s.t_start, 3),
    }
    path = root / ckpt.step_dir_name(step)
    if env.is_main:
        if path in s.damaged:  # complete but damaged: out of the way, deleted once this step is complete
            s.damaged[s.damaged.index(path)] = ckpt.set_aside(path)
        elif path.exists():  # a torn write of this same step from a killed attempt
            shutil.rmtree(path)
        path.mkdir(parents=True)
    backend.barrier()
    backend.save(path)
    ckpt.save_rng(path, env.rank)
    backend.barrier()  # every rank has written its shards and RNG state
    if env.is_main:
        ckpt.mark_complete(path, meta)
        ckpt.remove(s.damaged)  # before prune, which keeps the newest complete ones, damaged or not
        ckpt.prune(root, s.cfg.train.keep_last)
        log.info("checkpoint %s complete", path)
    s.damaged.clear()
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
    rd = RunDir(args.run_dir)
    try:
        train(rd.config(), args.run_dir, args.train_data)
    except Exception as e:
        # Every rank records its own failure; the supervisor reads them to decide whether a retry can help.
        err = {"type": type(e).__name__, "message": str(e), "retryable": is_retryable(e), "rank": env.rank}
        rd.write_json(rd.error_file(env.rank), err)  # a rank killed mid-write leaves no torn file
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
