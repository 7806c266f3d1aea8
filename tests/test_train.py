"""The train stage in one process: learning, metrics, lr schedule, data order, checkpoints, exact resume."""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from core import checkpoint as ckpt
from core.launch import PreflightError, preflight
from core.run import METRICS, SUMMARY, RunDir, data_fingerprint, training_fingerprint
from core.schedule import lr_factor
from core.train import DistEnv, micro_batches, param_groups, train

REPO = Path(__file__).resolve().parents[1]

_WORDS = ["red", "blue", "cat", "dog", "lake", "star", "book", "frog", "door", "tree", "pink", "bird"]


@pytest.fixture
def tiny_jsonl(tmp_path: Path) -> Path:
    """16 alpaca rows (word reversal), independent of the demo data: 2 steps per epoch at batch 8."""
    path = tmp_path / "tiny.jsonl"
    rows = []
    for i in range(16):
        words = [_WORDS[(i * 5 + k * 7) % len(_WORDS)] for k in range(3)]
        rows.append(
            {"instruction": "Reverse the words.", "input": " ".join(words), "output": " ".join(words[::-1])}
        )
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _prepare(cfg) -> Path:
    from core.data import prepare_dataset
    from core.modeling import load_tokenizer

    RunDir.create(cfg)
    return prepare_dataset(cfg.data, load_tokenizer(cfg.model), cfg.run_dir / "data").train_dir


def _metrics(run_dir: Path) -> list[dict]:
    return [json.loads(ln) for ln in (run_dir / METRICS).read_text().splitlines()]


def _mean_loss(cfg, model, train_dir: Path) -> float:
    """Mean loss of ``model`` over every row of the split, one fixed batch: no data-order noise."""
    from core.data import collate, load_split
    from core.modeling import load_tokenizer

    rows = list(load_split(train_dir))
    batch = collate(rows, load_tokenizer(cfg.model).pad_token_id)
    model.eval()
    with torch.no_grad():
        return float(model(**batch).loss)


# ----------------------------------------------------------------------------------------------------
# One LoRA process end to end
# ----------------------------------------------------------------------------------------------------


def test_lora_learns_logs_every_step_and_saves_a_loadable_adapter(run_config, tiny_jsonl):
    from core.adapter import load_adapter
    from core.modeling import load_model

    cfg = run_config(f"data.path={tiny_jsonl}", "data.eval_fraction=0", "train.lr=3e-3", "train.max_steps=12")
    train_dir = _prepare(cfg)
    result = train(cfg, cfg.run_dir, train_dir)

    m = _metrics(cfg.run_dir)
    assert [r["step"] for r in m] == list(range(1, 13))
    for r in m:
        assert {"loss", "lr", "grad_norm", "tokens_per_s", "peak_mem_mb"} <= r.keys()
        assert (
            math.isfinite(r["loss"]) and r["grad_norm"] > 0 and r["tokens_per_s"] > 0 and r["peak_mem_mb"] > 0
        )
    # the lr logged for a step is the one that step's update used
    for r in m:
        assert r["lr"] == pytest.approx(3e-3 * lr_factor(r["step"] - 1, 12, cfg), rel=1e-9)
    losses = [r["loss"] for r in m]
    # measured here: first-3 mean - last-3 mean = 0.085-0.10 (16 rows seen 6 times); about half as margin
    assert sum(losses[:3]) / 3 - sum(losses[-3:]) / 3 > 0.04, losses

    s = result.summary
    assert json.loads((cfg.run_dir / SUMMARY).read_text()) == s
    assert s["method"] == "lora" and s["steps"] == 12 and s["resumed_from_step"] is None
    assert s["final_loss"] == pytest.approx(losses[-1], abs=1e-6)
    assert s["tokens"] == sum(r["tokens"] for r in m) > 0
    assert 0 < s["trainable_params"] < s["total_params"]
    assert s["trainable_share"] == pytest.approx(s["trainable_params"] / s["total_params"])
    assert s["world_size"] == 1 and s["zero_stage"] is None and s["precision"] == "fp32"
    assert s["fingerprint"] == training_fingerprint(cfg)
    assert Path(s["output_dir"]) == result.output_dir == cfg.run_dir / "adapter"

    base = load_model(cfg.model)
    base_loss = _mean_loss(cfg, base, train_dir)
    tuned = load_model(cfg.model)
    load_adapter(tuned, result.output_dir)
    saved = load_file(str(next(result.output_dir.glob("*.safetensors"))))
    b_names = [n for n, _ in tuned.named_parameters() if "lora_B" in n]
    assert b_names and all(tuned.get_parameter(n).abs().sum() > 0 for n in b_names)
    assert sum("lora_B" in k for k in saved) == len(b_names)
    tuned_loss = _mean_loss(cfg, tuned, train_dir)
    # measured: base 4.575 -> tuned 4.474 (0.10-0.125 lower) on these 16 rows; half as margin
    assert tuned_loss < base_loss - 0.05, (base_loss, tuned_loss)


def test_finished_run_returns_at_once(run_config):
    cfg = run_config("train.max_steps=4")
    train_dir = _prepare(cfg)
    first = train(cfg, cfg.run_dir, train_dir)
    metrics = (cfg.run_dir / METRICS).read_text()
    summary = (cfg.run_dir / SUMMARY).read_text()
    adapter_mtime = (cfg.run_dir / "adapter").stat().st_mtime_ns
    again = train(cfg, cfg.run_dir, train_dir)
    assert again.summary == first.summary and again.output_dir == first.output_dir
    assert (cfg.run_dir / METRICS).read_text() == metrics  # nothing appended
    assert (cfg.run_dir / SUMMARY).read_text() == summary
    assert (cfg.run_dir / "adapter").stat().st_mtime_ns == adapter_mtime


def test_non_finite_loss_stops_with_a_clear_error(run_config):
    cfg = run_config("train.lr=1e30", "train.max_steps=4")  # lr=1e6 only saturates; 1e30 overflows
    train_dir = _prepare(cfg)
    with pytest.raises(FloatingPointError, match=r"loss is nan at step 2; lower train.lr"):
        train(cfg, cfg.run_dir, train_dir)
    assert not (cfg.run_dir / SUMMARY).exists()


# ----------------------------------------------------------------------------------------------------
# Learning-rate schedule and optimizer groups
# ----------------------------------------------------------------------------------------------------


def test_lr_factor_warmup_then_decay_by_hand(run_config):
    cos = run_config("train.warmup_steps=2", "train.min_lr_ratio=0.1", "train.lr_scheduler=cosine")
    lin = run_config("train.warmup_steps=2", "train.min_lr_ratio=0.1", "train.lr_scheduler=linear")
    const = run_config("train.warmup_steps=2", "train.lr_scheduler=constant")
    # warmup: (step+1)/(warmup+1); then progress p = (step-2)/8 over the remaining 8 steps
    for c in (cos, lin, const):
        assert lr_factor(0, 10, c) == pytest.approx(1 / 3)
        assert lr_factor(1, 10, c) == pytest.approx(2 / 3)
        assert lr_factor(2, 10, c) == pytest.approx(1.0)
    # cosine: 0.1 + 0.9 * 0.5 * (1 + cos(pi p))
    assert lr_factor(4, 10, cos) == pytest.approx(0.1 + 0.9 * 0.853553, abs=1e-6)  # p = 1/4
    assert lr_factor(6, 10, cos) == pytest.approx(0.55)  # p = 1/2
    assert lr_factor(9, 10, cos) == pytest.approx(0.1 + 0.9 * 0.038060, abs=1e-6)  # p = 7/8
    assert lr_factor(10, 10, cos) == pytest.approx(0.1)
    assert lr_factor(50, 10, cos) == pytest.approx(0.1)  # never below min_lr_ratio
    # linear: 0.1 + 0.9 * (1 - p)
    assert lr_factor(4, 10, lin) == pytest.approx(0.775)
    assert lr_factor(10, 10, lin) == pytest.approx(0.1)
    assert lr_factor(7, 10, const) == 1.0
    # warmup from warmup_ratio: int(0.25 * 10) = 2 steps
    ratio = run_config("train.warmup_ratio=0.25", "train.lr_scheduler=constant")
    assert [lr_factor(s, 10, ratio) for s in (0, 1, 2)] == pytest.approx([1 / 3, 2 / 3, 1.0])


def test_lora_plus_groups_and_no_weight_decay_on_norms(run_config):
    from core.lora import inject_lora
    from core.modeling import load_model
    from core.train import PlainBackend

    cfg = run_config("lora.lr_ratio_b=16", "train.lr=1e-3", "train.weight_decay=0.1")
    model = load_model(cfg.model)
    inject_lora(model, cfg.lora)
    names = {id(p): n for n, p in model.named_parameters()}
    groups = param_groups(model, cfg)
    by_lr = {g["lr"]: {names[id(p)] for p in g["params"]} for g in groups}
    assert sorted(by_lr) == pytest.approx([1e-3, 1.6e-2])
    b_lr = max(by_lr)
    assert by_lr[b_lr] and all("lora_B" in n for n in by_lr[b_lr])
    assert by_lr[min(by_lr)] and all("lora_A" in n for n in by_lr[min(by_lr)])
    n_trainable = sum(p.requires_grad for p in model.parameters())
    assert sum(len(g["params"]) for g in groups) == n_trainable  # frozen base weights stay out
    # the scheduler scales every group by the same factor: the ratio holds at every step
    backend = PlainBackend(model, cfg, 10, torch.device("cpu"), "fp32")
    for _ in range(3):
        lrs = sorted(g["lr"] for g in backend.opt.param_groups)
        assert lrs[-1] == pytest.approx(16 * lrs[0])
        backend.sched.step()
    # without LoRA+, A and B share one group
    plain = run_config("train.lr=1e-3")
    assert {g["lr"] for g in param_groups(model, plain)} == {1e-3}

    # every parameter trainable (as in method full): norms and biases get no weight decay
    full = load_model(cfg.model)
    full_names = {id(p): n for n, p in full.named_parameters()}
    decay_of = {full_names[id(p)]: g["weight_decay"] for g in param_groups(full, cfg) for p in g["params"]}
    norms = [n for n in decay_of if "norm" in n]
    assert norms and all(decay_of[n] == 0.0 for n in norms)
    assert decay_of["model.layers.0.self_attn.q_proj.weight"] == 0.1
    assert len(decay_of) == sum(1 for _ in full.parameters())


# ----------------------------------------------------------------------------------------------------
# Data order
# ----------------------------------------------------------------------------------------------------


def test_micro_batches_cover_the_global_batch_exactly_once(run_config):
    cfg = run_config("train.num_processes=2", "train.grad_accum=2", "train.batch_size=8", "train.seed=7")
    single = run_config("train.batch_size=8", "train.seed=7")
    num_rows = 37  # 4 full batches per epoch, the partial fifth dropped
    ranks = [DistEnv(rank=r, world_size=2, local_rank=r) for r in range(2)]
    for epoch in range(2):
        seen_in_epoch: set[int] = set()
        for step in range(epoch * 4, epoch * 4 + 4):
            parts = [mb for env in ranks for mb in micro_batches(step, num_rows, cfg, env)]
            assert len(parts) == 4 and all(len(mb) == 2 for mb in parts)  # 2 ranks x 2 accum x 2 rows
            union = [i for mb in parts for i in mb]
            assert len(union) == len(set(union)) == 8  # each row of the global batch exactly once
            # the same global batch as one process without accumulation reads
            (whole,) = micro_batches(step, num_rows, single, DistEnv())
            assert sorted(union) == sorted(whole)
            assert not seen_in_epoch & set(union)  # no row twice within an epoch
            seen_in_epoch |= set(union)
            # a pure function of (seed, step): recomputing gives the same lists in the same order
            assert parts == [mb for env in ranks for mb in micro_batches(step, num_rows, cfg, env)]
        assert len(seen_in_epoch) == 32
    other_seed = run_config("train.num_processes=2", "train.grad_accum=2", "train.seed=8")
    assert list(micro_batches(0, num_rows, cfg, ranks[0])) != list(
        micro_batches(0, num_rows, other_seed, ranks[0])
    )
    # the next epoch is a different permutation
    assert list(micro_batches(0, num_rows, single, DistEnv())) != list(
        micro_batches(4, num_rows, single, DistEnv())
    )


# ----------------------------------------------------------------------------------------------------
# Checkpoints
# ----------------------------------------------------------------------------------------------------


def _junk_dir(path: Path) -> None:
    path.mkdir(parents=True)
    (path / "trainable.safetensors").write_bytes(b"\x00torn write")


def test_checkpoints_complete_only_pruned_after_newer_and_torn_dirs_cleaned(run_config, monkeypatch):
    cfg = run_config(
        "train.max_steps=12", "train.save_every=3", "train.keep_last=2", "train.keep_checkpoints=true"
    )
    train_dir = _prepare(cfg)
    root = cfg.run_dir / "checkpoints"
    # left by a killed attempt: torn dirs (no COMPLETE), and a marker that is not JSON
    _junk_dir(root / ckpt.step_dir_name(3))  # the same step the run will save: replaced
    _junk_dir(root / ckpt.step_dir_name(5))
    _junk_dir(root / ckpt.step_dir_name(99))
    _junk_dir(root / ckpt.step_dir_name(100))
    (root / ckpt.step_dir_name(100) / ckpt.COMPLETE).write_text("{not json")
    assert ckpt.list_complete(root) == []
    assert ckpt.latest_complete(root, training_fingerprint(cfg)) is None

    events: list[tuple] = []
    real_mark, real_prune = ckpt.mark_complete, ckpt.prune

    def mark(path, meta):
        # the step's files are all written before the marker
        assert {"trainable.safetensors", "optim.pt", "rng_rank0.pt"} <= {p.name for p in path.iterdir()}
        real_mark(path, meta)
        events.append(("complete", meta["step"]))

    def prune(root_, keep_last):
        before = {p.name for p in root_.iterdir()}
        complete_before = [c.step for c in ckpt.list_complete(root_)]
        real_prune(root_, keep_last)
        after = {p.name for p in root_.iterdir()}
        events.append(("prune", complete_before, sorted(before - after)))

    monkeypatch.setattr(ckpt, "mark_complete", mark)
    monkeypatch.setattr(ckpt, "prune", prune)
    train(cfg, cfg.run_dir, train_dir)

    assert events == [
        ("complete", 3),
        ("prune", [3], ["step-000005", "step-000099", "step-000100"]),  # torn dirs cleaned
        ("complete", 6),
        ("prune", [3, 6], []),
        ("complete", 9),
        ("prune", [3, 6, 9], ["step-000003"]),  # removed only once 6 and 9 are complete
    ]  # no checkpoint at the last step: the final adapter is the output
    assert sorted(p.name for p in root.iterdir()) == ["step-000006", "step-000009"]
    done = ckpt.list_complete(root)
    assert [c.step for c in done] == [6, 9]
    fp = training_fingerprint(cfg)
    assert all(c.meta["fingerprint"] == fp and c.meta["method"] == "lora" for c in done)
    assert ckpt.latest_complete(root, fp).step == 9
    # a torn dir newer than every complete one is not taken for the latest
    _junk_dir(root / ckpt.step_dir_name(12))
    assert ckpt.latest_complete(root, fp).step == 9


def test_resume_with_another_config_is_refused(run_config):
    cfg = run_config(
        "train.max_steps=4", "train.save_every=2", "train.lr=1e-3", "train.keep_checkpoints=true"
    )
    train_dir = _prepare(cfg)
    train(cfg, cfg.run_dir, train_dir)
    assert [c.step for c in ckpt.list_complete(cfg.run_dir / "checkpoints")] == [2]
    (cfg.run_dir / SUMMARY).unlink()  # as if killed after checkpoint 2: an unfinished run

    changed = run_config("train.max_steps=4", "train.save_every=2", "train.lr=2e-3")
    with pytest.raises(ckpt.CheckpointMismatchError, match="different training configuration") as err:
        train(changed, changed.run_dir, train_dir)
    assert "step-000002" in str(err.value) and "new run name" in str(err.value)
    with pytest.raises(PreflightError, match="different training configuration"):
        preflight(changed, changed.run_dir)
    # cadence and scheduling settings do not change the trajectory: resuming with them is allowed
    cadence = run_config(
        "train.max_steps=4", "train.save_every=3", "train.keep_last=5", "train.log_every=2", "train.lr=1e-3"
    )
    assert training_fingerprint(cadence) == training_fingerprint(cfg)
    preflight(cadence, cadence.run_dir)


# ----------------------------------------------------------------------------------------------------
# Resume exactness: kill -9 after a checkpoint, resume, compare with an uninterrupted run
# ----------------------------------------------------------------------------------------------------

# Runs `python -m core.train` but stops before optimizer step 8 (0-based 7), announcing it via a file,
# so the parent can SIGKILL it with checkpoint 6 complete and metrics already written past it.
_PAUSING_CHILD = """
import sys, time
from pathlib import Path
import core.train as t

marker = Path(sys.argv[1])
real = t.micro_batches

def micro_batches(step, *args):
    if step == 7:
        marker.write_text("paused")
        time.sleep(600)
    return real(step, *args)

t.micro_batches = micro_batches
sys.exit(t.main(sys.argv[2:]))
"""


def test_kill_and_resume_reproduces_the_uninterrupted_run_exactly(run_config, tmp_path):
    common = ("train.max_steps=10", "train.save_every=3", "lora.dropout=0.1", "train.lr=3e-3")
    cfg_a = run_config("name=uninterrupted", *common)
    cfg_b = run_config("name=killed", *common)
    assert training_fingerprint(cfg_a) == training_fingerprint(cfg_b)
    data_a, data_b = _prepare(cfg_a), _prepare(cfg_b)

    summary_a = train(cfg_a, cfg_a.run_dir, data_a).summary
    losses_a = [(r["step"], r["loss"], r["grad_norm"]) for r in _metrics(cfg_a.run_dir)]
    assert [s for s, _, _ in losses_a] == list(range(1, 11))

    # B: a subprocess with this process's thread count (fp32 reductions depend on it), killed as a group
    threads = str(torch.get_num_threads())
    env = {**os.environ, "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads, "PYTHONPATH": str(REPO)}
    marker = tmp_path / "paused"
    argv = [sys.executable, "-c", _PAUSING_CHILD, str(marker)]
    argv += ["--run-dir", str(cfg_b.run_dir), "--train-data", str(data_b)]
    log = (tmp_path / "child.log").open("w")
    proc = subprocess.Popen(
        argv, env=env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )
    try:
        deadline = time.monotonic() + 180
        while not marker.exists():
            assert proc.poll() is None, (tmp_path / "child.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "child never reached step 8"
            time.sleep(0.05)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        log.close()
    assert proc.returncode == -signal.SIGKILL
    root = cfg_b.run_dir / "checkpoints"
    assert [c.step for c in ckpt.list_complete(root)] == [3, 6]
    assert [r["step"] for r in _metrics(cfg_b.run_dir)] == list(range(1, 8))  # step 7 is past the checkpoint
    assert not (cfg_b.run_dir / SUMMARY).exists() and not (cfg_b.run_dir / "adapter").exists()

    result = train(cfg_b, cfg_b.run_dir, data_b)  # resumes in-process
    assert result.summary["resumed_from_step"] == 6
    losses_b = [(r["step"], r["loss"], r["grad_norm"]) for r in _metrics(cfg_b.run_dir)]
    assert [s for s, _, _ in losses_b] == list(range(1, 11))  # one line per step, step 7 not doubled
    assert losses_b == losses_a  # exact: fp32 CPU, model/optimizer/scheduler/RNG/data position restored
    assert result.summary["final_loss"] == summary_a["final_loss"]  # unrounded
    # The summary counts the whole run: steps 1-6 from the checkpoint, 7-10 from this attempt.
    assert (
        result.summary["tokens"] == summary_a["tokens"] == sum(r["tokens"] for r in _metrics(cfg_b.run_dir))
    )
    assert result.summary["wall_time_s"] > result.summary["attempt_wall_time_s"] > 0

    wa = load_file(str(next((cfg_a.run_dir / "adapter").glob("*.safetensors"))))
    wb = load_file(str(next((cfg_b.run_dir / "adapter").glob("*.safetensors"))))
    assert wa.keys() == wb.keys() and wa
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_gradient_checkpointing_trains_lora_to_the_same_losses(run_config):
    # Recomputing activations must not change the maths; with frozen embeddings, LoRA only gets
    # gradients through checkpointed blocks if the inputs carry grad (enable_input_require_grads).
    losses = {}
    for gc in (False, True):
        cfg = run_config(
            f"name=gc-{gc}", "train.max_steps=4", f"train.gradient_checkpointing={str(gc).lower()}"
        )
        train(cfg, cfg.run_dir, _prepare(cfg))
        losses[gc] = [r["loss"] for r in _metrics(cfg.run_dir)]
        b = [
            t
            for k, t in load_file(cfg.run_dir / "adapter" / "adapter_model.safetensors").items()
            if "lora_B" in k
        ]
        assert all(t.abs().sum() > 0 for t in b), "some lora_B never received a gradient"
    assert losses[True] == pytest.approx(losses[False], abs=1e-5)


def test_changed_data_under_the_same_path_retrains_and_refuses_old_checkpoints(run_config, tmp_path):
    rows = [
        {"instruction": "Say a colour.", "input": "", "output": c}
        for c in ["red", "blue", "green", "pink"] * 4
    ]
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = run_config(
        "name=data-change",
        f"data.path={data}",
        "train.max_steps=4",
        "train.save_every=2",
        "train.keep_checkpoints=true",
    )
    first = train(cfg, cfg.run_dir, _prepare(cfg)).summary
    summary = (cfg.run_dir / SUMMARY).read_text()
    (cfg.run_dir / SUMMARY).unlink()  # as if killed after checkpoint 2: an unfinished run

    data.write_text("".join(json.dumps({**r, "output": r["output"].upper()}) + "\n" for r in rows))
    split = _prepare(cfg)
    assert data_fingerprint(split) != first["data_fingerprint"]
    # Checkpoint step 2 is from the old data: resuming from it would continue on other rows.
    with pytest.raises(ckpt.CheckpointMismatchError, match="different data"):
        train(cfg, cfg.run_dir, split)
    with pytest.raises(PreflightError, match="different data"):
        preflight(cfg, cfg.run_dir, split)
    # Had the first run finished, its checkpoints hold nothing back: preflight drops them, and the
    # finished run is not taken for this one: it trains again.
    (cfg.run_dir / SUMMARY).write_text(summary)
    preflight(cfg, cfg.run_dir, split)
    assert not (cfg.run_dir / "checkpoints").exists()
    second = train(cfg, cfg.run_dir, split).summary
    assert second["data_fingerprint"] != first["data_fingerprint"] and second["resumed_from_step"] is None


def test_fresh_start_drops_metrics_of_a_killed_attempt_including_a_torn_line(run_config):
    cfg = run_config("name=torn-metrics", "train.max_steps=3")
    data = _prepare(cfg)
    # An attempt killed before its first checkpoint left two steps and half a line behind.
    (cfg.run_dir / METRICS).write_text('{"step": 1, "loss": 9.0}\n{"step": 2, "loss": 8.0}\n{"step": 3, "lo')
    train(cfg, cfg.run_dir, data)
    assert [r["step"] for r in _metrics(cfg.run_dir)] == [1, 2, 3]
    assert all(r["loss"] < 8.0 for r in _metrics(cfg.run_dir))


def test_modules_to_save_train_and_ship_with_the_adapter(run_config):
    from core.adapter import load_adapter
    from core.modeling import load_model

    cfg = run_config("name=mts", "train.max_steps=3", "lora.modules_to_save=[lm_head]")
    train(cfg, cfg.run_dir, _prepare(cfg))
    sd = load_file(cfg.run_dir / "adapter" / "adapter_model.safetensors")
    base = load_model(cfg.model)
    trained_head = sd["base_model.model.lm_head.weight"]
    assert trained_head.shape == base.lm_head.weight.shape
    assert not torch.equal(trained_head, base.lm_head.weight)  # it trained, fully
    load_adapter(base, cfg.run_dir / "adapter")
    assert torch.equal(base.lm_head.weight.detach(), trained_head)


def test_fp16_loss_scale_is_part_of_the_checkpoint(run_config, tmp_path):
    """fp16 (GPUs without bf16) skips overflowing steps by the loss scale: resuming with a fresh scale
    would skip other steps than the uninterrupted run. The scaler state travels in optim.pt."""
    from core.lora import inject_lora
    from core.modeling import load_model
    from core.train import PlainBackend

    cfg = run_config()
    cpu = torch.device("cpu")

    def backend() -> PlainBackend:
        model = load_model(cfg.model)
        inject_lora(model, cfg.lora)
        return PlainBackend(model, cfg, 10, cpu, "fp16")

    a = backend()
    ids = torch.randint(0, 500, (2, 12), generator=torch.Generator().manual_seed(0))
    a.forward_backward({"input_ids": ids, "labels": ids}, step_tokens=22)
    a.optimizer_step()  # a real fp16 step (CPU autocast): the scaler's growth tracker moves
    a.scaler.update(new_scale=1024.0)  # as after some overflowing steps
    a.save(tmp_path)
    b = backend()
    assert b.scaler.get_scale() == 65536.0
    b.load(tmp_path)
    assert b.scaler.state_dict() == a.scaler.state_dict() and b.scaler.get_scale() == 1024.0

    # An overflowing step is skipped and, as in DeepSpeed's fp16 engine, does not advance the schedule.
    a.scaler.update(new_scale=3e38)  # scaled loss and gradients overflow to inf
    before = (a.sched.last_epoch, [p.detach().clone() for p in a.model.parameters() if p.requires_grad])
    a.forward_backward({"input_ids": ids, "labels": ids}, step_tokens=22)
    a.optimizer_step()
    assert a.scaler.get_scale() < 3e38 and a.sched.last_epoch == before[0]
    after = [p for p in a.model.parameters() if p.requires_grad]
    assert all(torch.equal(x, y) for x, y in zip(before[1], after, strict=True))
    a.scaler.update(new_scale=1024.0)
    a.forward_backward({"input_ids": ids, "labels": ids}, step_tokens=22)
    a.optimizer_step()  # a normal step again
    assert a.sched.last_epoch == before[0] + 1


def test_a_finished_run_leaves_no_checkpoints_so_a_changed_config_trains_fresh(run_config):
    """The nightly retrain on new data, or an on-demand run with another lr, under the same run name."""
    cfg = run_config("name=rerun", "train.max_steps=4", "train.save_every=2")
    train_dir = _prepare(cfg)
    train(cfg, cfg.run_dir, train_dir)
    assert not (cfg.run_dir / "checkpoints").exists()  # the finished outputs supersede them

    changed = run_config("name=rerun", "train.max_steps=4", "train.save_every=2", "train.lr=5e-4")
    preflight(changed, changed.run_dir, train_dir)
    again = train(changed, changed.run_dir, train_dir).summary
    assert again["resumed_from_step"] is None and again["fingerprint"] == training_fingerprint(changed)


# ----------------------------------------------------------------------------------------------------
# Damaged checkpoints: a file truncated or changed after its COMPLETE marker
# ----------------------------------------------------------------------------------------------------


def test_marker_lists_every_file_and_verify_names_what_is_wrong(tmp_path, monkeypatch):
    path = tmp_path / ckpt.step_dir_name(4)
    (path / "sub").mkdir(parents=True)
    (path / "optim.pt").write_bytes(b"o" * 1000)
    (path / "sub" / "shard.bin").write_bytes(b"s" * 300)
    monkeypatch.setattr(ckpt, "HASH_MAX_BYTES", 500)  # shard.bin is hashed, optim.pt only sized
    ckpt.mark_complete(path, {"step": 4})
    (c,) = ckpt.list_complete(tmp_path)
    assert c.meta["step"] == 4
    files = c.meta["files"]
    assert files.keys() == {"optim.pt", "sub/shard.bin"}  # the marker itself is not listed
    assert files["optim.pt"] == {"size": 1000}
    assert files["sub/shard.bin"]["size"] == 300 and len(files["sub/shard.bin"]["sha256"]) == 64
    assert ckpt.verify(c) is None

    (path / "sub" / "shard.bin").write_bytes(b"x" * 300)  # same size, other bytes: the hash tells
    assert "sub/shard.bin has other content than was written" in ckpt.verify(c)
    (path / "sub" / "shard.bin").write_bytes(b"s" * 300)
    (path / "optim.pt").write_bytes(b"o" * 999)
    assert ckpt.verify(c) == "optim.pt has 999 bytes, expected 1000"
    (path / "optim.pt").unlink()
    assert ckpt.verify(c) == "optim.pt is missing"
    (path / "optim.pt").write_bytes(b"o" * 1000)
    assert ckpt.verify(c) is None
    ckpt.mark_unreadable(c, RuntimeError("PytorchStreamReader failed"))
    assert "could not load it (RuntimeError: PytorchStreamReader failed)" in ckpt.verify(c)
    # a marker from before markers listed files: nothing to compare, taken as intact
    old = ckpt.Checkpoint(4, path, {"step": 4})
    (path / ckpt.UNREADABLE).unlink()
    assert ckpt.verify(old) is None


def _run_until_unfinished(run_config, tmp_path, name, *common):
    """A run whose checkpoints are kept, then made unfinished (summary and output removed), as a kill
    after its last checkpoint leaves it."""
    cfg = run_config(f"name={name}", *common, "train.keep_checkpoints=true")
    data = _prepare(cfg)
    train(cfg, cfg.run_dir, data)
    (cfg.run_dir / SUMMARY).unlink()
    shutil.rmtree(cfg.run_dir / "adapter")
    return cfg, data


def _truncate(path: Path) -> tuple[int, int]:
    size = path.stat().st_size
    with path.open("r+b") as f:
        f.truncate(size // 2)
    return size // 2, size


@pytest.mark.parametrize("damage", ["truncated", "overwritten", "old-marker-unloadable"])
def test_damaged_newest_checkpoint_resumes_from_the_one_before_exactly(run_config, tmp_path, caplog, damage):
    """The newest complete checkpoint has a damaged file: the run resumes from the previous one and
    reproduces the uninterrupted loss sequence; the damaged one goes once a new step 9 is complete."""
    common = ("train.max_steps=10", "train.save_every=3", "lora.dropout=0.1", "train.lr=3e-3")
    ref = run_config("name=reference", *common)
    train(ref, ref.run_dir, _prepare(ref))
    want = [(r["step"], r["loss"], r["grad_norm"]) for r in _metrics(ref.run_dir)]

    cfg, data = _run_until_unfinished(run_config, tmp_path, "damaged", *common)
    root = cfg.run_dir / "checkpoints"
    assert [c.step for c in ckpt.list_complete(root)] == [6, 9]
    newest = root / ckpt.step_dir_name(9)
    if damage == "truncated":
        got, expected = _truncate(newest / "optim.pt")
        says = f"optim.pt has {got} bytes, expected {expected}"
    elif damage == "overwritten":  # same size: only the sha256 in the marker tells
        raw = bytearray((newest / "trainable.safetensors").read_bytes())
        raw[-1] ^= 0xFF
        (newest / "trainable.safetensors").write_bytes(raw)
        says = "trainable.safetensors has other content than was written"
    else:  # a marker that lists no files (an older layout) cannot tell: the failed load does
        marker = newest / ckpt.COMPLETE
        meta = json.loads(marker.read_text())
        del meta["files"]
        marker.write_text(json.dumps(meta))
        _truncate(newest / "optim.pt")
        says = "could not be loaded on rank 0"

    with caplog.at_level("WARNING", logger="core"):
        result = train(cfg, cfg.run_dir, data)
    warning = "\n".join(r.getMessage() for r in caplog.records if r.levelname == "WARNING")
    assert str(newest) in warning and says in warning and "step-000006" in warning, warning
    assert result.summary["resumed_from_step"] == 6
    got = [(r["step"], r["loss"], r["grad_norm"]) for r in _metrics(cfg.run_dir)]
    assert got == want  # exact, from step 6 on as before it
    # Step 9 was written again; the damaged copy, set aside meanwhile, is gone now that it is complete.
    assert sorted(p.name for p in root.iterdir()) == ["step-000006", "step-000009"]
    assert all(ckpt.verify(c) is None for c in ckpt.list_complete(root))


def test_no_intact_checkpoint_left_starts_fresh_and_keeps_the_damaged_one_until_a_new_one_is_complete(
    run_config, tmp_path, caplog, monkeypatch
):
    common = ("train.max_steps=8", "train.save_every=3", "train.keep_last=1")
    ref = run_config("name=reference", *common)
    train(ref, ref.run_dir, _prepare(ref))
    want = [(r["step"], r["loss"]) for r in _metrics(ref.run_dir)]

    cfg, data = _run_until_unfinished(run_config, tmp_path, "all-damaged", *common)
    root = cfg.run_dir / "checkpoints"
    assert [c.step for c in ckpt.list_complete(root)] == [6]
    _truncate(root / ckpt.step_dir_name(6) / "trainable.safetensors")

    seen: list[tuple[int, list[str]]] = []
    real_mark = ckpt.mark_complete

    def mark(path, meta):
        seen.append((meta["step"], sorted(p.name for p in root.iterdir())))
        real_mark(path, meta)

    monkeypatch.setattr(ckpt, "mark_complete", mark)
    with caplog.at_level("WARNING", logger="core"):
        result = train(cfg, cfg.run_dir, data)
    warning = "\n".join(r.getMessage() for r in caplog.records if r.levelname == "WARNING")
    assert "step-000006 is damaged" in warning and "starts again from step 0" in warning, warning
    assert result.summary["resumed_from_step"] is None
    assert [(r["step"], r["loss"]) for r in _metrics(cfg.run_dir)] == want
    # The damaged step 6 stayed until step 3 was complete and was deleted then: prune, which keeps the
    # newest complete one (keep_last=1), would otherwise have kept it and deleted step 3.
    assert seen == [(3, ["step-000003", "step-000006"]), (6, ["step-000003", "step-000006"])]
    assert [p.name for p in root.iterdir()] == ["step-000006"]
    assert ckpt.verify(ckpt.list_complete(root)[0]) is None
