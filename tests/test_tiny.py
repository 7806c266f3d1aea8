"""Tests for core/tiny.py (offline tiny Llama) and examples/make_demo_data.py (bundled demo data)."""

from __future__ import annotations

import filecmp
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from core import tiny
from tests.conftest import REPO

DEMO = REPO / "examples" / "demo"
# Small and quick: a handful of pretraining steps is enough to lower the held-out loss from its init value.
FAST = dict(
    pretrain_steps=12,
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=2,
    intermediate_size=128,
    seq_len=64,
    batch_size=8,
)


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny.make_tiny_model(tmp_path_factory.mktemp("tiny") / "model", **FAST)


def test_reloads_with_plain_auto_classes(built: Path) -> None:
    model = AutoModelForCausalLM.from_pretrained(built)
    tok = AutoTokenizer.from_pretrained(built)
    cfg = model.config
    assert cfg.model_type == "llama" and not cfg.tie_word_embeddings
    assert model.dtype == torch.float32
    for name in ("hidden_size", "intermediate_size", "vocab_size"):
        assert getattr(cfg, name) % 32 == 0, (name, getattr(cfg, name))
    for mod in model.modules():
        if isinstance(mod, torch.nn.Linear):
            assert mod.out_features % 32 == 0 and mod.in_features % 32 == 0, mod
    assert len(tok) <= cfg.vocab_size
    ids = tok("The red fox runs.")["input_ids"]
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits  # (1, T, V)
    assert logits.shape == (1, len(ids), cfg.vocab_size)


def test_tokenizer_round_trip_and_special_tokens(built: Path) -> None:
    tok = AutoTokenizer.from_pretrained(built)
    text = "### Instruction:\nName the kind of each word.\n\n### Input:\nred fox box\n\n### Response:\n"
    ids = tok(text)["input_ids"]
    assert ids[0] == tok.bos_token_id
    assert tok.decode(ids, skip_special_tokens=True) == text
    # Unseen characters still round-trip: byte-level BPE has no unknowns.
    assert tok.decode(tok("Zürich ☃ 42", add_special_tokens=False)["input_ids"]) == "Zürich ☃ 42"
    assert tok.eos_token == "</s>" and tok.pad_token == "<pad>" and tok.bos_token == "<s>"
    assert len({tok.eos_token_id, tok.pad_token_id, tok.bos_token_id}) == 3
    model_cfg = json.loads((built / "config.json").read_text())
    assert model_cfg["eos_token_id"] == tok.eos_token_id and model_cfg["pad_token_id"] == tok.pad_token_id


def test_pretraining_lowers_heldout_loss(built: Path) -> None:
    info = json.loads((built / tiny.RECIPE_FILE).read_text())
    assert info["recipe"]["pretrain_steps"] == FAST["pretrain_steps"]
    # Init loss is ~ln(vocab) ≈ 6.2; a dozen steps on the template corpus must cut it by well over 1 nat.
    assert info["eval_loss_after"] < info["eval_loss_before"] - 1.0, info


def test_saved_weights_match_recorded_loss_direction(built: Path) -> None:
    # Independent of the recorded numbers: the saved model predicts the corpus better than a fresh init.
    tok = AutoTokenizer.from_pretrained(built)
    model = AutoModelForCausalLM.from_pretrained(built).eval()
    torch.manual_seed(0)
    fresh = type(model)(model.config).eval()
    text = (DEMO / "corpus.txt").read_text()[-3000:]
    ids = torch.tensor([tok(text)["input_ids"][:64]])
    with torch.no_grad():
        assert model(ids, labels=ids).loss < fresh(ids, labels=ids).loss - 1.0


def test_second_call_does_not_rebuild(built: Path) -> None:
    before = {p.name: p.stat().st_mtime_ns for p in built.iterdir()}
    assert tiny.make_tiny_model(built, **FAST) == built
    assert {p.name: p.stat().st_mtime_ns for p in built.iterdir()} == before


def test_refuses_foreign_nonempty_dir_and_bad_sizes(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not a finished tiny-model build"):
        tiny.make_tiny_model(tmp_path, **FAST)
    assert (tmp_path / "notes.txt").read_text() == "mine"
    with pytest.raises(ValueError, match="multiples of 32"):
        tiny.make_tiny_model(tmp_path / "x", **{**FAST, "hidden_size": 48})


def test_resolve_model_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DELTATUNE_CACHE", str(tmp_path))
    assert tiny.resolve_model_path("some-org/some-model") == "some-org/some-model"
    assert tiny.resolve_model_path("s3://bucket/model") == "s3://bucket/model"
    path = tiny.builtin_model_path()
    assert path.parent == tmp_path / "models" and path.name.startswith("tiny-llama-")
    with pytest.raises(ValueError, match="unknown built-in model"):
        tiny.builtin_model_path("huge-llama")
    # Avoid a full default build here: a complete directory at the cache path must be used as is.
    built = tiny.make_tiny_model(path, **FAST)
    assert tiny.resolve_model_path("builtin:tiny-llama") == str(built)


def test_demo_data_script_is_deterministic(tmp_path: Path) -> None:
    script = REPO / "examples" / "make_demo_data.py"
    for out in (tmp_path / "a", tmp_path / "b"):
        subprocess.run([sys.executable, str(script), "--out", str(out)], check=True)
    for name in ("train.jsonl", "corpus.txt"):
        assert filecmp.cmp(tmp_path / "a" / name, tmp_path / "b" / name, shallow=False), name
        assert filecmp.cmp(tmp_path / "a" / name, DEMO / name, shallow=False), (
            f"{name} is stale: re-run the script"
        )
    rows = [json.loads(line) for line in (DEMO / "train.jsonl").read_text().splitlines()]
    assert 400 <= len(rows) <= 600
    assert all(set(r) == {"instruction", "input", "output"} for r in rows)
    assert len({r["input"] for r in rows}) == len(rows)
    assert (DEMO / "corpus.txt").stat().st_size < 600_000


def test_an_existing_build_of_another_recipe_is_neither_reused_nor_overwritten(tmp_path):
    out = tiny.make_tiny_model(tmp_path / "m", **FAST)
    stamp = (out / "model.safetensors").stat().st_mtime_ns
    assert tiny.make_tiny_model(tmp_path / "m", **FAST) == out  # the same recipe: reused
    with pytest.raises(FileExistsError, match="another recipe"):
        tiny.make_tiny_model(tmp_path / "m", **{**FAST, "pretrain_steps": FAST["pretrain_steps"] + 1})
    assert (out / "model.safetensors").stat().st_mtime_ns == stamp
