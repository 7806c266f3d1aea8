"""Multi-process training for real: 2 CPU ranks over gloo through torchrun and DeepSpeed (no mocks).

    .venv/bin/pytest tests/test_distributed.py -m slow

Full fine-tuning under ZeRO-2 and ZeRO-3, LoRA under ZeRO-3, QLoRA under ZeRO-2, single-process vs
2-rank equivalence,
exact kill-and-resume past a torn and a damaged checkpoint, packed rows (data.packing) resumed exactly,
and no rank process left behind.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from core import checkpoint as ckpt
from core.config import RunConfig
from core.data import prepare_dataset
from core.launch import build_command, run_training
from core.modeling import load_tokenizer
from core.run import RunDir
from tests.conftest import REPO
from tests.processes import assert_no_orphans, rank_processes

pytestmark = pytest.mark.slow

IDS = torch.tensor([[1, 5, 9, 13, 17, 21, 25, 29], [2, 40, 80, 120, 160, 200, 240, 280]])  # (B, T)


@pytest.fixture(scope="module")
def shared_data(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The module prepares the demo split once: every run trains on the very same rows."""
    return {"root": tmp_path_factory.mktemp("shared-data")}


@pytest.fixture
def make_run(run_config, shared_data: dict):
    """Build a config (2 ranks, 8 steps unless overridden) and write it; return it and the train split."""

    def make(*overrides: str) -> tuple[RunConfig, Path]:
        cfg = run_config("train.num_processes=2", "train.max_steps=8", *overrides)
        RunDir.create(cfg)
        if "train_dir" not in shared_data:
            root = shared_data["root"]
            data = prepare_dataset(cfg.data, load_tokenizer(cfg.model), root, cache_dir=root / "cache")
            shared_data["train_dir"] = data.train_dir
        return cfg, shared_data["train_dir"]

    return make


def train(cfg: RunConfig, train_dir: Path) -> dict:
    lines: list[str] = []
    try:
        summary = run_training(cfg, cfg.run_dir, train_dir, on_line=lines.append)
    except Exception:
        print("\n".join(lines[-60:]))
        raise
    assert_no_orphans(cfg.run_dir)
    return summary


def losses(run_dir: Path) -> list[float]:
    recs = [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines() if ln.strip()]
    assert [r["step"] for r in recs] == list(range(1, len(recs) + 1)), "metrics steps not 1..N once each"
    return [r["loss"] for r in recs]


def assert_learns(run_dir: Path, margin: float) -> None:
    """Mean loss of the last 2 steps is below that of the first 2 by ``margin`` (different batches)."""
    ls = losses(run_dir)
    first, last = sum(ls[:2]) / 2, sum(ls[-2:]) / 2
    assert last < first - margin, f"loss did not decrease by {margin}: {ls}"


def rows_loss(model, train_dir: Path, pad_id: int, n: int = 32) -> float:
    """Mean loss of ``model`` on the first ``n`` training rows: the same rows for base and tuned."""
    from core.data import collate, load_split

    split = load_split(train_dir)
    batch = collate([split[i] for i in range(n)], pad_id)
    with torch.no_grad():
        return float(model(**batch).loss)


def check_full_model(cfg: RunConfig, out: Path, train_dir: Path) -> None:
    """model/ loads with plain transformers, every tensor complete, trained (differs from base), finite."""
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(cfg.model.name_or_path, use_safetensors=True)
    tuned = AutoModelForCausalLM.from_pretrained(out, use_safetensors=True)
    assert (out / "model.safetensors").is_file()
    bsd, tsd = base.state_dict(), tuned.state_dict()
    assert bsd.keys() == tsd.keys()
    for k, v in tsd.items():
        assert v.shape == bsd[k].shape and v.numel() > 0, f"{k}: {tuple(v.shape)} != {tuple(bsd[k].shape)}"
        assert v.dtype == torch.float32 and torch.isfinite(v).all(), k
    # Every attention/MLP projection trained: no shard was silently dropped or left at the base value.
    projections = [k for k in tsd if k.endswith("proj.weight")]
    assert projections
    unchanged = [k for k in projections if torch.equal(tsd[k], bsd[k])]
    assert not unchanged, f"weights identical to the base: {unchanged}"
    with torch.no_grad():
        logits = tuned(input_ids=IDS).logits  # (B, T, V)
    assert torch.isfinite(logits).all()
    assert not torch.allclose(logits, base(input_ids=IDS).logits)
    pad = load_tokenizer(cfg.model).pad_token_id
    before, after = rows_loss(base, train_dir, pad), rows_loss(tuned, train_dir, pad)
    print(f"rows loss base {before:.4f} tuned {after:.4f}")
    assert after < before - 0.2, (before, after)


# ----------------------------------------------------------------------------------------------------
# 1-2. Full fine-tuning, ZeRO-2 and ZeRO-3
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("stage", [2, 3])
def test_full_finetune_two_ranks(make_run, stage: int):
    cfg, train_dir = make_run("method=full", f"train.zero_stage={stage}", "train.lr=3e-3")
    summary = train(cfg, train_dir)
    assert summary["world_size"] == 2 and summary["zero_stage"] == stage and summary["steps"] == 8
    assert len(losses(cfg.run_dir)) == 8
    print(losses(cfg.run_dir))
    assert_learns(cfg.run_dir, margin=0.25)
    check_full_model(cfg, Path(summary["output_dir"]), train_dir)  # ZeRO-3: the gathered, complete save


@pytest.mark.parametrize("name", ["zero1.json", "zero3-offload.json"])
def test_shipped_deepspeed_configs_train(make_run, name: str):
    # zero2/zero3 run above through train.zero_stage; these two only exist as files users point at.
    path = REPO / "deploy" / "deepspeed" / name
    cfg, train_dir = make_run("method=full", f"train.deepspeed_config={path}", "train.lr=3e-3")
    summary = train(cfg, train_dir)
    assert summary["zero_stage"] == json.loads(path.read_text())["zero_optimization"]["stage"]
    check_full_model(cfg, Path(summary["output_dir"]), train_dir)


# ----------------------------------------------------------------------------------------------------
# 3. LoRA and its variants under ZeRO: a complete adapter that both loaders accept
# ----------------------------------------------------------------------------------------------------


# The adapter variants too. PiSSA factors come from each rank's own SVD of the full weights before
# ZeRO-3 partitions them (the seed makes the fast SVD agree), and publish as a rank-2r plain LoRA.
# DoRA runs under ZeRO-2: its column norm needs whole base weights, so the config refuses ZeRO-3.
@pytest.mark.parametrize(
    ("stage", "variant"),
    [(3, []), (3, ["lora.init_lora_weights=pissa_niter_2"]), (2, ["lora.use_dora=true"])],
    ids=["lora-zero3", "pissa-zero3", "dora-zero2"],
)
def test_adapter_variants_under_zero_are_complete(make_run, stage, variant):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from core.adapter import WEIGHTS_NAME, check_adapter_tensors, load_adapter
    from core.lora import lora_modules

    cfg, train_dir = make_run("method=lora", f"train.zero_stage={stage}", "train.lr=3e-3", *variant)
    summary = train(cfg, train_dir)
    assert summary["zero_stage"] == stage and summary["world_size"] == 2
    print(losses(cfg.run_dir))
    assert_learns(cfg.run_dir, margin=0.1)

    out = Path(summary["output_dir"])
    sd = load_file(str(out / WEIGHTS_NAME))

    def fresh_base():
        return AutoModelForCausalLM.from_pretrained(cfg.model.name_or_path, use_safetensors=True).eval()

    ours = fresh_base()
    load_adapter(ours, out)
    names = [n for n, _ in lora_modules(ours)]
    expected = [f"base_model.model.{n}.lora_{ab}.weight" for n in names for ab in "AB"]
    if cfg.lora.use_dora:
        expected += [f"base_model.model.{n}.lora_magnitude_vector" for n in names]
    assert len(names) == 2 * 7 and sorted(sd) == sorted(expected)  # 2 layers x 7 projections
    check_adapter_tensors(sd, expected, require_trained=True)
    for n, m in lora_modules(ours):
        a, b = sd[f"base_model.model.{n}.lora_A.weight"], sd[f"base_model.model.{n}.lora_B.weight"]
        assert a.shape == (m.r, m.in_features) and b.shape == (m.out_features, m.r), n
        if cfg.lora.use_dora:
            assert sd[f"base_model.model.{n}.lora_magnitude_vector"].shape == (m.out_features,), n
    with torch.no_grad():
        ours_logits = ours(input_ids=IDS).logits  # (B, T, V)
        base_logits = fresh_base()(input_ids=IDS).logits
    assert torch.isfinite(ours_logits).all()
    assert not torch.allclose(ours_logits, base_logits)

    peft = pytest.importorskip("peft")
    theirs = peft.PeftModel.from_pretrained(fresh_base(), str(out)).eval()
    with torch.no_grad():
        theirs_logits = theirs(input_ids=IDS).logits
    torch.testing.assert_close(theirs_logits, ours_logits, rtol=1e-5, atol=1e-5)


def test_qlora_two_ranks_zero2_follow_the_single_process_run(make_run):
    """QLoRA across ranks: each rank quantizes its own copy of the base (NF4, double quantization),
    DeepSpeed partitions only the adapter's optimizer state; the trajectory must be the one process's."""
    from safetensors.torch import load_file

    from core.adapter import WEIGHTS_NAME, check_adapter_tensors

    common = ("method=qlora", "train.lr=1e-2", "train.max_steps=6")
    one, train_dir = make_run(*common, "name=q-one", "train.num_processes=1", "train.grad_accum=2")
    two, _ = make_run(*common, "name=q-two", "train.zero_stage=2")
    s1, s2 = train(one, train_dir), train(two, train_dir)
    assert (s1["world_size"], s1["zero_stage"], s2["world_size"], s2["zero_stage"]) == (1, None, 2, 2)
    a, b = losses(one.run_dir), losses(two.run_dir)
    print(f"one process {a}\ntwo ranks   {b}")
    assert a[-1] < a[0] - 0.1, a
    assert max(abs(x - y) for x, y in zip(a, b, strict=True)) <= 1e-5, (a, b)
    wa, wb = (load_file(str(Path(s["output_dir"]) / WEIGHTS_NAME)) for s in (s1, s2))
    assert wa.keys() == wb.keys()
    check_adapter_tensors(wb, sorted(wb), require_trained=True)
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-4, atol=1e-6)


# ----------------------------------------------------------------------------------------------------
# 4. One process (plain loop) and two ranks (DeepSpeed, ZeRO-0) follow the same trajectory
# ----------------------------------------------------------------------------------------------------


def test_two_ranks_match_one_process(make_run):
    from safetensors.torch import load_file

    from core.adapter import WEIGHTS_NAME

    common = ("method=lora", "train.lr=1e-2", "train.max_steps=6")
    # grad_accum=2 gives the single process the ranks' micro-batches (rows [0:4] and [4:8] of each
    # step's batch): the loss is a per-micro-batch token mean, so only the same split is comparable.
    one, train_dir = make_run(*common, "name=one", "train.num_processes=1", "train.grad_accum=2")
    two, _ = make_run(*common, "name=two", "train.zero_stage=0")
    s1, s2 = train(one, train_dir), train(two, train_dir)
    assert (s1["world_size"], s1["zero_stage"]) == (1, None)  # PlainBackend, no DeepSpeed
    assert (s2["world_size"], s2["zero_stage"]) == (2, 0)
    assert s1["tokens"] == s2["tokens"]  # the ranks together read exactly the rows one process read
    a, b = losses(one.run_dir), losses(two.run_dir)
    gap = max(abs(x - y) for x, y in zip(a, b, strict=True))
    print(f"one process {a}\ntwo ranks   {b}\nmax |gap| {gap:.2e}")
    assert a[0] == pytest.approx(b[0], abs=1e-6)  # step 1: the base model on the same micro-batches
    # Measured: bitwise equal (gap 0, adapters identical). Only summation order and thread count may
    # differ (all-reduce average vs accumulation of halves), i.e. float32 rounding; 1e-5 allows that
    # while a wrong split or averaging is caught: one micro-batch of 8 (token mean over the whole
    # batch) instead of the ranks' two of 4 already moves the losses by 1.6e-3 at step 1.
    assert gap <= 1e-5, (a, b)
    wa, wb = (
        load_file(str(Path(s1["output_dir"]) / WEIGHTS_NAME)),
        load_file(str(Path(s2["output_dir"]) / WEIGHTS_NAME)),
    )
    assert wa.keys() == wb.keys()
    worst = max(float((wa[k] - wb[k]).abs().max()) for k in wa)
    print(f"max |adapter gap| {worst:.2e}")
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], rtol=0, atol=1e-5)  # measured 0, as above


# ----------------------------------------------------------------------------------------------------
# 5-7. SIGKILL after a checkpoint, a torn newer checkpoint, exact resume, no orphans
# ----------------------------------------------------------------------------------------------------


def launch_detached(cfg: RunConfig, train_dir: Path, log_path: Path) -> subprocess.Popen:
    """The launcher core.launch runs, started in its own process group so the test can kill it whole."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    root = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    with log_path.open("w") as log:
        return subprocess.Popen(
            build_command(cfg, cfg.run_dir, train_dir),
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
            start_new_session=True,
        )


def check_checkpoint_contents(path: Path, world_size: int) -> None:
    """Every rank's RNG state and optimizer shard, DeepSpeed's model states, our COMPLETE marker."""
    meta = json.loads((path / ckpt.COMPLETE).read_text())
    assert meta["world_size"] == world_size and meta["step"] == int(path.name.split("-")[1])
    files = {p.name for p in path.rglob("*") if p.is_file()}
    for rank in range(world_size):
        assert f"rng_rank{rank}.pt" in files, files
        state = torch.load(path / f"rng_rank{rank}.pt", weights_only=True)
        assert {"python", "numpy", "torch"} <= state.keys()
        assert f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt" in files, files  # ZeRO-2: one shard per rank
    assert "mp_rank_00_model_states.pt" in files, files


def test_kill_resume_exact_skips_torn_checkpoint_no_orphans(make_run, tmp_path: Path):
    # Dropout makes the loss depend on every rank's RNG stream, so exactness proves it is restored.
    over = (
        "method=lora",
        "lora.dropout=0.1",
        "train.zero_stage=2",
        "train.max_steps=9",
        "train.save_every=3",
        "train.lr=1e-2",
    )
    a, train_dir = make_run(*over, "name=a")
    train(a, train_dir)  # uninterrupted reference
    ref = losses(a.run_dir)
    assert len(ref) == 9

    b, _ = make_run(*over, "name=b")
    done = b.run_dir / "checkpoints" / ckpt.step_dir_name(6) / ckpt.COMPLETE
    proc = launch_detached(b, train_dir, tmp_path / "b.log")
    try:
        deadline = time.monotonic() + 300
        while not done.is_file() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert done.is_file(), (tmp_path / "b.log").read_text()[-3000:]
        assert rank_processes(b.run_dir), "the ranks should still be running"
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the launcher's group; its ranks die by PR_SET_PDEATHSIG
        proc.wait()
    assert_no_orphans(b.run_dir)
    assert not (b.run_dir / "train_summary.json").exists(), "killed too late: the run had finished"
    killed_at = len(losses(b.run_dir))
    assert 6 <= killed_at < 9

    ckpts = b.run_dir / "checkpoints"
    for step in (3, 6):
        check_checkpoint_contents(ckpts / ckpt.step_dir_name(step), world_size=2)
    # A torn newer checkpoint, as a kill in the middle of a save leaves it: some shards, no COMPLETE.
    torn = ckpts / ckpt.step_dir_name(7)
    shutil.rmtree(torn, ignore_errors=True)
    shutil.copytree(ckpts / ckpt.step_dir_name(6), torn)
    (torn / ckpt.COMPLETE).unlink()
    for f in torn.rglob("zero_pp_rank_1_*"):
        f.unlink()
    assert ckpt.latest_complete(ckpts).step == 6
    # And a newer complete one whose rank-1 shard was cut short after its marker: every rank must
    # pass it by alike (they agree on the step before the loop) and resume from step 6.
    damaged = ckpts / ckpt.step_dir_name(8)
    shutil.copytree(ckpts / ckpt.step_dir_name(6), damaged)
    (shard,) = damaged.glob("zero_pp_rank_1_*")
    size = shard.stat().st_size
    with shard.open("r+b") as f:
        f.truncate(size - 100)
    assert ckpt.latest_complete(ckpts).step == 8

    lines: list[str] = []
    summary = run_training(b, b.run_dir, train_dir, on_line=lines.append)
    assert_no_orphans(b.run_dir)
    warned = [ln for ln in lines if f"checkpoint {damaged} is damaged" in ln]
    assert len(warned) == 1, lines[-60:]  # rank 0 reports it
    assert f"{shard.name} has {size - 100} bytes, expected {size}" in warned[0]
    assert "resuming from step-000006 instead" in warned[0]
    assert summary["resumed_from_step"] == 6
    resumed = losses(b.run_dir)
    print(f"uninterrupted {ref}\nresumed       {resumed}")
    assert resumed == ref  # exact: model, optimizer, scheduler, RNG and data position restored

    from safetensors.torch import load_file

    from core.adapter import WEIGHTS_NAME

    wa = load_file(str(a.run_dir / "adapter" / WEIGHTS_NAME))
    wb = load_file(str(b.run_dir / "adapter" / WEIGHTS_NAME))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def test_launcher_killed_during_startup_leaves_no_rank(make_run, tmp_path: Path):
    """Ranks still importing torch when the launcher dies must die too (they used to be orphaned).

    Killed once both ranks have begun loading libtorch: past the death signal, which is armed before
    torch is imported, and well within the seconds of imports that follow. Waiting on that event
    rather than on a fixed delay keeps the test honest on a loaded machine.
    """
    cfg, train_dir = make_run("method=lora", "name=early")
    proc = launch_detached(cfg, train_dir, tmp_path / "early.log")

    def importing_torch() -> list[int]:
        found = []
        for pid in rank_processes(cfg.run_dir):
            try:
                if pid != proc.pid and "libtorch" in Path(f"/proc/{pid}/maps").read_text():
                    found.append(pid)
            except OSError:  # exited meanwhile
                pass
        return found

    try:
        deadline = time.monotonic() + 120
        while len(importing_torch()) < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert len(importing_torch()) == 2, (tmp_path / "early.log").read_text()[-3000:]
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert_no_orphans(cfg.run_dir)
    assert not (cfg.run_dir / "metrics.jsonl").exists()  # killed before training began


# ----------------------------------------------------------------------------------------------------
# Two nodes on one host: torchrun's static rendezvous, one rank per node, one shared run directory
# ----------------------------------------------------------------------------------------------------


def test_two_nodes_train_as_one_job_on_a_shared_run_dir(make_run):
    """Each node's supervisor launches its own torchrun (node_rank 0 and 1, one rank each) against the
    same master address, as two machines of a cluster would; the job must follow the 2-rank run."""
    import threading

    from core.train import _free_port

    port = _free_port()
    common = (
        "method=lora",
        "train.lr=1e-2",
        "train.max_steps=6",
        "train.num_processes=1",
        "train.num_nodes=2",
        "train.master_addr=127.0.0.1",
        f"train.master_port={port}",
        "train.zero_stage=2",
        "train.save_every=3",
        "train.keep_checkpoints=true",
    )
    nodes = [make_run(*common, "name=nodes", f"train.node_rank={n}")[0] for n in (0, 1)]
    one_host, train_dir = make_run(*common[:3], "train.zero_stage=2", "name=one-host")
    results: dict[int, dict | BaseException] = {}

    def node(n: int) -> None:
        try:
            results[n] = run_training(nodes[n], nodes[n].run_dir, train_dir, on_line=lambda s: None)
        except BaseException as e:  # reported below
            results[n] = e

    threads = [threading.Thread(target=node, args=(n,)) for n in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=600)
    assert all(isinstance(r, dict) for r in results.values()) and len(results) == 2, results
    assert results[0]["world_size"] == 2
    assert [c.step for c in ckpt.list_complete(nodes[0].run_dir / "checkpoints")] == [3]
    check_checkpoint_contents(nodes[0].run_dir / "checkpoints" / ckpt.step_dir_name(3), world_size=2)
    train(one_host, train_dir)
    assert losses(nodes[0].run_dir) == losses(one_host.run_dir)  # the same 2 ranks, whatever the hosts


def _agree_worker(rank: int, port: int, starts: list[int], out: str) -> None:
    import torch.distributed as dist

    from core.train import _same_on_every_rank

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        _same_on_every_rank(starts[rank], torch.device("cpu"), Path("/shared/run"))
        result = "ok"
    except ValueError as e:
        result = str(e)
    finally:
        dist.destroy_process_group()
    Path(out, f"rank{rank}").write_text(result)


@pytest.mark.parametrize(
    "starts", [[6, 6], [6, 0], [-1, 6]], ids=["agree", "checkpoint-on-one-node", "finished-on-one"]
)
def test_ranks_that_see_different_run_dirs_fail_together_instead_of_hanging(starts, tmp_path: Path):
    import torch.multiprocessing as mp

    from core.train import _free_port

    mp.start_processes(
        _agree_worker, args=(_free_port(), starts, str(tmp_path)), nprocs=2, start_method="spawn"
    )
    got = [(tmp_path / f"rank{r}").read_text() for r in range(2)]
    if starts[0] == starts[1]:
        assert got == ["ok", "ok"]
    else:
        assert got[0] == got[1] and "every node must see the same run directory" in got[0], got


_RANK1_OOM = """
import os
if os.environ.get("RANK") == "1":
    import torch
    import core.data as _data

    _real, _calls = _data.collate, [0]

    def collate(*args, **kwargs):
        _calls[0] += 1
        if _calls[0] == 2:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (simulated)")
        return _real(*args, **kwargs)

    _data.collate = collate
"""


def test_a_final_failure_on_another_rank_is_not_retried(make_run, tmp_path: Path, monkeypatch):
    """Rank 1 runs out of memory; rank 0 only sees its peer vanish (a retryable-looking error).
    Every rank records its failure, and the supervisor reports rank 1's, which a retry cannot fix."""
    from core.launch import TrainingFailed

    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(_RANK1_OOM)
    monkeypatch.setenv("PYTHONPATH", str(site))
    cfg, train_dir = make_run("method=lora", "name=oom")
    with pytest.raises(TrainingFailed) as err:
        run_training(cfg, cfg.run_dir, train_dir, on_line=lambda s: None)
    assert err.value.retryable is False
    assert "OutOfMemoryError" in str(err.value) and "simulated" in str(err.value)
    assert json.loads((cfg.run_dir / "train_error.rank1.json").read_text())["rank"] == 1
    assert_no_orphans(cfg.run_dir)


# ----------------------------------------------------------------------------------------------------
# Packed rows (data.packing) under DeepSpeed, 2 ranks, and resume
# ----------------------------------------------------------------------------------------------------


def packed_demo_split(cfg: RunConfig, dest: Path, n: int = 160) -> tuple[Path, list[int]]:
    """The first ``n`` demo rows tokenised as prompt (-100) + answer + EOS, packed by pack_split into
    ``cfg.data.max_seq_len``; built here, not by the prepare stage, so that only packing is under test.
    Returns the saved split and the length of each packed row."""
    import datasets

    from core.data.packing import pack_split

    tok = load_tokenizer(cfg.model)
    rows = []
    for line in (REPO / "examples/demo/train.jsonl").read_text().splitlines()[:n]:
        r = json.loads(line)
        prompt = tok(f"{r['instruction']}\n{r['input']}\n", add_special_tokens=False)["input_ids"]
        answer = tok(r["output"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        rows.append({"input_ids": prompt + answer, "labels": [-100] * len(prompt) + answer})
    packed, stats = pack_split(datasets.Dataset.from_list(rows), cfg.data.max_seq_len)
    assert stats["rows"] == n and stats["sequences"] <= n // 2, stats  # two or more rows per packed row
    packed.save_to_disk(str(dest))
    return dest, [len(ids) for ids in packed["input_ids"]]


def test_packed_rows_train_on_two_ranks_and_resume_exactly(run_config, tmp_path: Path):
    # Dropout makes every step depend on each rank's RNG stream; the packed split is the data order.
    cfg = run_config(
        "train.num_processes=2",
        "method=lora",
        "lora.dropout=0.1",
        "train.zero_stage=2",
        "train.batch_size=8",
        "train.max_steps=6",
        "train.save_every=2",
        "train.keep_checkpoints=true",
        "train.keep_last=3",
        "train.lr=1e-2",
    )
    RunDir.create(cfg)
    train_dir, lengths = packed_demo_split(cfg, tmp_path / "packed")
    first = train(cfg, train_dir)
    ref = [json.loads(ln) for ln in (cfg.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in ref] == list(range(1, 7))
    # Each step's tokens are those of its packed rows (core.schedule.step_rows over the packed split),
    # counted without padding, over both ranks.
    from core.schedule import step_rows

    for r in ref:
        assert r["tokens"] == sum(lengths[i] for i in step_rows(r["step"] - 1, len(lengths), cfg).tolist())
    assert first["tokens"] == sum(r["tokens"] for r in ref)

    # Back to step 2: the summary and the checkpoint of step 4 go, as a kill after step 2's save leaves it.
    ckpts = cfg.run_dir / "checkpoints"
    assert [c.step for c in ckpt.list_complete(ckpts)] == [2, 4]
    (cfg.run_dir / "train_summary.json").unlink()
    shutil.rmtree(ckpts / ckpt.step_dir_name(4))
    again = train(cfg, train_dir)
    assert again["resumed_from_step"] == 2
    resumed = [json.loads(ln) for ln in (cfg.run_dir / "metrics.jsonl").read_text().splitlines()]
    print(f"uninterrupted {[r['loss'] for r in ref]}\nresumed       {[r['loss'] for r in resumed]}")
    key = ("step", "loss", "grad_norm", "tokens")
    assert [[r[k] for k in key] for r in resumed] == [[r[k] for k in key] for r in ref]
    assert again["final_loss"] == first["final_loss"] and again["tokens"] == first["tokens"]
