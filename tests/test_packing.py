"""Packing (core/data/packing.py, core/data/batches.py): first-fit decreasing, and no token attending across rows.

    .venv/bin/pytest -q tests/test_packing.py

A row's logits and loss are the same packed (with other rows around it and padding after it) and alone,
on five model families; a plain causal mask or position ids that do not restart would break that, and the
tests show by how much. A training step over the same rows packed and unpacked gives the same loss.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from core.data import collate
from core.data.batches import trained_tokens
from core.data.errors import DataError
from core.data.packing import first_fit_decreasing, pack_split
from core.modeling import load_tokenizer
from core.run import METRICS, RunDir
from core.train import train
from tests.conftest import tiny_llama
from tests.families import family_model

PAD = 0
ATOL = 1e-5  # fp32: packed and alone differ only by the order of float sums (seen: <= 5e-7)


def _naive_ffd(lengths: list[int], cap: int) -> list[list[int]]:
    """First-fit decreasing as the textbook states it, O(n * bins): the reference for the fast one."""
    bins: list[list[int]] = []
    free: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        for b, room in enumerate(free):
            if room >= lengths[i]:
                bins[b].append(i)
                free[b] -= lengths[i]
                break
        else:
            bins.append([i])
            free.append(cap - lengths[i])
    return bins


def _rows(lengths: list[int], seed: int = 0, vocab: int = 256) -> list[dict]:
    """Random rows whose first two tokens are prompt (-100), the rest trained."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for n in lengths:
        ids = torch.randint(3, vocab, (n,), generator=g).tolist()
        rows.append(
            {"input_ids": ids, "labels": [-100] * min(2, n) + ids[2:], "prompt": "p", "prompt_len": 2}
        )
    return rows


def _segments(rows: list[dict], max_seq_len: int) -> list[list[tuple[int, int]]]:
    """Per packed row, the (start, end) of each row in it, from the rows' lengths and the bins alone
    (never from the packed position ids, which are what is under test)."""
    bins = first_fit_decreasing([len(r["input_ids"]) for r in rows], max_seq_len)
    out = []
    for b in bins:
        ends = np.cumsum([0] + [len(rows[i]["input_ids"]) for i in b]).tolist()
        out.append(list(zip(ends[:-1], ends[1:], strict=True)))
    return out


# ----------------------------------------------------------------------------------------------------
# First-fit decreasing
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(5))
def test_ffd_packs_every_row_once_within_capacity_as_the_textbook_algorithm(seed: int):
    rnd = random.Random(seed)
    cap = rnd.choice([16, 64, 512])
    lengths = [min(cap, max(1, int(rnd.lognormvariate(2.5, 1.0)))) for _ in range(300)]
    bins = first_fit_decreasing(lengths, cap)
    assert sorted(i for b in bins for i in b) == list(range(len(lengths)))  # every row exactly once
    assert all(sum(lengths[i] for i in b) <= cap for b in bins)  # no bin over max_seq_len
    assert bins == _naive_ffd(lengths, cap)  # the same bins, in the same order
    assert bins == first_fit_decreasing(list(lengths), cap)  # deterministic
    # First fit leaves at most one bin at most half full (any two such bins would have been merged).
    assert sum(sum(lengths[i] for i in b) <= cap / 2 for b in bins) <= 1


def test_ffd_refuses_a_row_longer_than_the_sequence():
    with pytest.raises(ValueError, match=r"row 1 has 9 tokens, more than max_seq_len=8"):
        first_fit_decreasing([3, 9, 2], 8)
    assert first_fit_decreasing([], 8) == []


def test_pack_split_layout_tokens_and_stats():
    lengths = [7, 5, 12, 3, 9, 4, 6, 16, 1, 2]
    rows = _rows(lengths)
    ds = datasets.Dataset.from_list(rows)
    packed, stats = pack_split(ds, 16)
    assert packed.column_names == ["input_ids", "labels", "position_ids"]  # no prompt/reference
    assert stats["rows"] == 10 and stats["sequences"] == len(packed) == 5
    assert stats["tokens"] == sum(lengths) and stats["fill_ratio"] == round(sum(lengths) / (5 * 16), 6)
    seen = []
    for p, segments in zip(packed, _segments(rows, 16), strict=True):
        assert len(p["input_ids"]) == len(p["labels"]) == len(p["position_ids"]) == segments[-1][1] <= 16
        for s, e in segments:
            assert p["position_ids"][s:e] == list(range(e - s))  # restart at 0 for each row
            assert p["labels"][s] == -100  # nothing predicts a row's first token from the row before
            seen.append((p["input_ids"][s:e], p["labels"][s + 1 : e]))
    # Every row exactly once, its tokens and its trained labels unchanged.
    assert sorted(map(str, seen)) == sorted(str((r["input_ids"], r["labels"][1:])) for r in rows)
    trained = sum(sum(t != -100 for t in p["labels"][1:]) for p in packed)
    assert trained == sum(sum(t != -100 for t in r["labels"][1:]) for r in rows)
    again, _ = pack_split(datasets.Dataset.from_list(rows), 16)
    assert again[:] == packed[:]  # deterministic: the step -> rows mapping survives a rebuild
    with pytest.raises(DataError, match="more than max_seq_len=8"):
        pack_split(ds, 8)


def test_pack_split_of_a_shuffled_view_over_many_record_batches(monkeypatch):
    # A split of many Arrow record batches (as a memory-mapped one is), seen through shuffle + select,
    # packed a few bins at a time: the packed rows are exactly the view's rows, as first-fit lays them out.
    from core.data import packing

    monkeypatch.setattr(packing, "_READ_BATCH", 3)
    rnd = random.Random(1)
    rows = _rows([rnd.randint(1, 24) for _ in range(200)], seed=1)
    parts = [datasets.Dataset.from_list(rows[i : i + 17]) for i in range(0, 200, 17)]
    view = datasets.concatenate_datasets(parts).shuffle(seed=1).select(range(150))
    assert len(view.data.table.to_batches()) > 1 and view._indices is not None
    packed, stats = pack_split(view, 32)
    want = list(view)
    assert stats["rows"] == 150 and stats["tokens"] == sum(len(r["input_ids"]) for r in want)
    for p, segments in zip(packed, _segments(want, 32), strict=True):
        got = [p["input_ids"][s:e] for s, e in segments]
        assert p["position_ids"] == [i for s, e in segments for i in range(e - s)]
        assert all(len(g) == e - s for g, (s, e) in zip(got, segments, strict=True))
    bins = first_fit_decreasing([len(r["input_ids"]) for r in want], 32)
    assert [p["input_ids"] for p in packed] == [[t for i in b for t in want[i]["input_ids"]] for b in bins]


def test_trained_tokens_count_the_same_packed_and_alone():
    # The train loop's per-row token count (the step's normaliser), read from Arrow: labels[1:] != -100.
    rnd = random.Random(2)
    rows = [{"input_ids": [1] * n, "labels": [rnd.choice([-100, 5]) for _ in range(n)]} for n in range(1, 40)]
    ds = datasets.Dataset.from_list(rows)
    want = [sum(t != -100 for t in r["labels"][1:]) for r in rows]
    assert trained_tokens(ds, batch_size=7).tolist() == want
    packed, _ = pack_split(ds, 64)
    assert int(trained_tokens(packed).sum()) == sum(want)


# ----------------------------------------------------------------------------------------------------
# Packed == alone: logits and loss, per family
# ----------------------------------------------------------------------------------------------------


def _model(family: str, attn: str):
    if family == "llama":
        model = tiny_llama(attn_implementation=attn)
    else:
        model = family_model(family)
        model.config._attn_implementation = attn
    model.config.use_cache = False  # transformers reads packed rows from position ids without a cache only
    return model


def _token_losses(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Summed next-token cross-entropy of one row: logits (T, V), labels (T,) -> ()."""
    return F.cross_entropy(logits[:-1], labels[1:], ignore_index=-100, reduction="sum")


def _packed_vs_alone(
    model, packed: datasets.Dataset, segments: list, batch: dict
) -> tuple[float, float, float]:
    """Worst |logit| gap and (packed, alone) summed losses of every row, packed rows laid out (B, T)."""
    with torch.no_grad():
        logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits  # (B, T, V)
        worst, loss_packed, loss_alone = 0.0, 0.0, 0.0
        for b, p in enumerate(packed):
            for s, e in segments[b]:
                ids = torch.tensor([p["input_ids"][s:e]])  # (1, n)
                alone = model(input_ids=ids).logits[0]  # (n, V)
                worst = max(worst, float((logits[b, s:e] - alone).abs().max()))
                labels = batch["labels"][b, s:e]
                loss_packed += float(_token_losses(logits[b, s:e], labels))
                loss_alone += float(_token_losses(alone, labels))
    return worst, loss_packed, loss_alone


CASES = [("llama", "sdpa"), ("llama", "eager"), ("qwen2", "sdpa"), ("mistral", "sdpa"), ("gpt2", "sdpa")]
CASES += [("gemma", "sdpa"), ("phi3", "eager")]


@pytest.mark.parametrize("family,attn", CASES)
def test_a_row_gives_the_same_logits_and_loss_packed_and_alone(family: str, attn: str):
    model = _model(family, attn)
    rows = _rows([7, 5, 12, 3, 9, 4, 6, 2, 10])
    packed, stats = pack_split(datasets.Dataset.from_list(rows), 16)
    assert any(len(p["input_ids"]) < 16 for p in packed) and stats["sequences"] < len(rows)  # padding too
    segments = _segments(rows, 16)
    batch = collate(list(packed), PAD)  # (B, T): input_ids, labels, position_ids, no attention_mask
    assert set(batch) == {"input_ids", "labels", "position_ids"}
    worst, loss_packed, loss_alone = _packed_vs_alone(model, packed, segments, batch)
    assert worst < ATOL, f"{family}/{attn}: packed logits differ from alone by {worst}"
    assert loss_packed == pytest.approx(loss_alone, rel=1e-6)

    # The model's own loss over the padded packed batch: padding counts as no token.
    trained = sum(sum(t != -100 for t in r["labels"][1:]) for r in rows)
    with torch.no_grad():
        loss = model(**batch, num_items_in_batch=trained).loss
    assert float(loss) == pytest.approx(loss_alone / trained, rel=1e-6)

    # The flattened layout (one (1, sum T) row, no padding: what flash-attention-2 gets) agrees as well.
    flat = collate(list(packed), PAD, flatten=True)
    with torch.no_grad():
        assert float(model(**flat, num_items_in_batch=trained).loss) == pytest.approx(float(loss), rel=1e-6)

    # What the test guards against: a plain causal mask over the concatenation (an attention_mask of
    # ones turns off transformers' packed-row detection) ...
    plain = {**batch, "attention_mask": (batch["position_ids"] >= 0).long()}
    gap_plain, _, _ = _packed_vs_alone(model, packed, segments, plain)
    # ... or position ids that run on across rows (no boundary to find, and shifted positions).
    running = {
        **batch,
        "position_ids": torch.arange(batch["input_ids"].shape[1]).expand_as(batch["input_ids"]),
    }
    gap_running, _, _ = _packed_vs_alone(model, packed, segments, running)
    print(
        f"{family}/{attn}: packed {worst:.2e}, plain causal mask {gap_plain:.3f}, running positions {gap_running:.3f}"
    )
    assert gap_plain > 1000 * ATOL and gap_running > 1000 * ATOL


# ----------------------------------------------------------------------------------------------------
# A training step: the same rows packed and unpacked give the same loss (per-token normalisation)
# ----------------------------------------------------------------------------------------------------


def _tokenised_split(tokenizer, path: Path, n: int = 12) -> datasets.Dataset:
    """``n`` prompt/answer rows of different lengths, tokenised as the prepare stage stores them
    (input_ids, labels with the prompt at -100), saved to ``path``; built here so that the test does
    not depend on the prepare stage's options."""
    words = ["red", "blue", "cat", "dog", "lake", "star", "book", "frog", "door", "tree", "pink", "bird"]
    rows = []
    for i in range(n):
        ws = [words[(i * 5 + j * 7) % len(words)] for j in range(1 + (i * 7) % 9)]  # 1..9 words
        prompt = tokenizer(f"Reverse: {' '.join(ws)}\n", add_special_tokens=False)["input_ids"]
        answer = tokenizer(" ".join(ws[::-1]), add_special_tokens=False)["input_ids"] + [
            tokenizer.eos_token_id
        ]
        rows.append({"input_ids": prompt + answer, "labels": [-100] * len(prompt) + answer})
    ds = datasets.Dataset.from_list(rows)
    ds.save_to_disk(str(path))
    return ds


def _metrics(run_dir: Path) -> list[dict]:
    return [json.loads(ln) for ln in (run_dir / METRICS).read_text().splitlines()]


def test_a_training_step_over_the_same_rows_packed_and_unpacked_gives_the_same_loss(run_config, tmp_path):
    common = ("train.max_steps=1", "data.max_seq_len=64")
    plain_cfg = run_config("name=plain", *common, "train.batch_size=12", "train.grad_accum=3")
    rows = _tokenised_split(load_tokenizer(plain_cfg.model), tmp_path / "plain")
    packed, stats = pack_split(rows, plain_cfg.data.max_seq_len)
    assert stats["sequences"] < 12 and any(len(p["input_ids"]) < 64 for p in packed)
    packed.save_to_disk(str(tmp_path / "packed"))

    # One optimizer step over every row: 3 micro-batches of 4 rows, or every packed row in one micro-batch.
    packed_cfg = run_config("name=packed", *common, f"train.batch_size={len(packed)}", "train.grad_accum=1")
    for cfg in (plain_cfg, packed_cfg):
        RunDir.create(cfg)
    a = train(plain_cfg, plain_cfg.run_dir, tmp_path / "plain").summary
    b = train(packed_cfg, packed_cfg.run_dir, tmp_path / "packed").summary
    (ma,), (mb,) = _metrics(plain_cfg.run_dir), _metrics(packed_cfg.run_dir)
    print(f"unpacked {a['final_loss']!r} {ma['grad_norm']}, packed {b['final_loss']!r} {mb['grad_norm']}")
    assert b["final_loss"] == pytest.approx(a["final_loss"], rel=1e-6)  # the step's token mean, both
    assert mb["grad_norm"] == pytest.approx(ma["grad_norm"], rel=1e-5)  # the same gradient
    assert mb["tokens"] == ma["tokens"] == stats["tokens"]  # real tokens, padding none
    wa = np.concatenate([v.ravel() for v in _adapter(plain_cfg.run_dir).values()])
    wb = np.concatenate([v.ravel() for v in _adapter(packed_cfg.run_dir).values()])
    assert np.abs(wa).max() > 0 and np.allclose(wa, wb, atol=1e-6)


def _adapter(run_dir: Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    return dict(sorted(load_file(str(next((run_dir / "adapter").glob("*.safetensors")))).items()))
