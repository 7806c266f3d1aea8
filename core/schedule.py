"""Data order and learning-rate schedule: pure functions of (config, step), so that resuming needs only
the step counter, and the supervisor can size a progress bar without loading the training stack.

    total = total_steps(cfg, num_rows)         # optimizer steps of the whole run
    rows = step_rows(step, num_rows, cfg)      # the global batch of optimizer step ``step`` (0-based)
    factor = lr_factor(step, total, cfg)       # multiplies each parameter group's lr
"""

from __future__ import annotations

import math

import torch

from core.config import RunConfig


def steps_per_epoch(num_rows: int, batch_size: int) -> int:
    return num_rows // batch_size


def total_steps(cfg: RunConfig, num_rows: int) -> int:
    """``train.max_steps``, else ``train.epochs`` full batches per epoch (a partial last batch is dropped).

    Raises:
        ValueError: fewer rows than one batch and no ``train.max_steps``.
    """
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
    order = torch.randperm(num_rows, generator=g)  # (num_rows,)
    if bsz > num_rows:  # max_steps with a tiny dataset: wrap around within the epoch
        return order.repeat(math.ceil(bsz / num_rows))[:bsz]
    return order[pos * bsz : (pos + 1) * bsz]  # (B,)


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
