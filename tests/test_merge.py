"""The merge stage (core/merge/): streaming == in-memory bit for bit on bases saved in several shards, the
HF index, QLoRA's dequantized base and the auto choice, and gap limits that leave merged/ untouched."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from core.adapter import save_adapter
from core.config import LoraConfig, MergeConfig, QuantConfig, load_config
from core.lora import inject_lora, lora_modules
from core.merge import MergeGapError, choose, merge, merge_weights
from core.merge.sharded import INDEX, MergeSourceError, dequantized_view, skeleton, source_files
from tests.conftest import REPO, tiny_llama
from tests.test_conv1d import tiny_gpt2

SHARD = "60KB"  # the tiny models are ~400 KB in fp32: 7-10 shards each way
LLAMA_ALL = r".*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"


def _perturb(model, lcfg: LoraConfig, seed: int = 2) -> None:
    """B, m and modules_to_save away from their init: a zero B makes "merged == unmerged" pass trivially."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, m in lora_modules(model):
            m.lora_B.weight.copy_(torch.randn(m.lora_B.weight.shape, generator=g) * 0.1)
            if m.lora_magnitude_vector is not None:
                m.lora_magnitude_vector.mul_(1 + 0.2 * torch.rand(m.lora_magnitude_vector.shape, generator=g))
        for name in lcfg.modules_to_save:
            for p in model.get_submodule(name).parameters():
                p.add_(torch.randn(p.shape, generator=g) * 0.1)


def make_adapter(build, lcfg: LoraConfig, base_dir: Path, out: Path) -> Path:
    model = build()
    inject_lora(model, lcfg)
    _perturb(model, lcfg)
    return save_adapter(model, out, lcfg, base_model=str(base_dir))


def weights(d: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(d.glob("*.safetensors")):
        out |= load_file(str(f))
    return out


def config(base: Path, *overrides: str):
    return load_config(overrides=[f"model.name_or_path={base}", f"merge.max_shard_size={SHARD}", *overrides])


VARIANTS = {
    # name: (build, LoraConfig, merge.dtype)
    "llama-rslora-patterns": (
        tiny_llama,
        LoraConfig(
            r=4,
            target_modules=LLAMA_ALL,
            use_rslora=True,
            rank_pattern={"q_proj": 8},
            alpha_pattern={"v_proj": 3},
        ),
        "float32",
    ),
    "llama-bf16": (tiny_llama, LoraConfig(r=4, target_modules=LLAMA_ALL), "bfloat16"),
    "llama-dora": (tiny_llama, LoraConfig(r=4, target_modules=LLAMA_ALL, use_dora=True), "float32"),
    "gpt2-conv1d": (tiny_gpt2, LoraConfig(r=4, target_modules=r".*\.(c_attn|c_proj|c_fc)"), "float32"),
    "gpt2-tied-head-adapted": (tiny_gpt2, LoraConfig(r=4, target_modules=r"(.*\.c_attn|lm_head)"), "float32"),
    "llama-tied-head-adapted": (
        lambda: tiny_llama(tie_word_embeddings=True),
        LoraConfig(r=4, target_modules=r"(.*\.q_proj|lm_head)"),
        "float32",
    ),
    "llama-tied-modules-to-save": (
        lambda: tiny_llama(tie_word_embeddings=True),
        LoraConfig(r=4, target_modules=r".*\.v_proj", modules_to_save=["lm_head"]),
        "float32",
    ),
    "llama-modules-to-save": (
        tiny_llama,
        LoraConfig(r=4, target_modules=r".*\.v_proj", modules_to_save=["lm_head", "model.embed_tokens"]),
        "float32",
    ),
}


@pytest.fixture(params=sorted(VARIANTS))
def variant(request, tmp_path):
    build, lcfg, dtype = VARIANTS[request.param]
    base = tmp_path / "base"
    build().save_pretrained(base, max_shard_size=SHARD)
    adapter = make_adapter(build, lcfg, base, tmp_path / "adapter")
    return request.param, base, adapter, dtype


def test_streaming_equals_in_memory_bit_for_bit(variant, tmp_path):
    name, base, adapter, dtype = variant
    assert len(set(source_files(base).values())) >= 3, "the base must come in several shards"
    out = {}
    for mode in ("streaming", "in_memory"):
        info = merge_weights(
            config(base, f"merge.mode={mode}", f"merge.dtype={dtype}"), adapter, tmp_path / mode
        )
        assert info["peak_rss_mb"] > 0 and info["merge_seconds"] >= 0
        out[mode] = weights(tmp_path / mode)
    streamed, in_memory = out["streaming"], out["in_memory"]
    assert len({p for p in (tmp_path / "streaming").glob("model-*.safetensors")}) >= 3
    assert sorted(streamed) == sorted(in_memory)
    for k in in_memory:
        assert (
            streamed[k].dtype
            == in_memory[k].dtype
            == (getattr(torch, dtype) if streamed[k].is_floating_point() else streamed[k].dtype)
        ), k
        assert torch.equal(streamed[k], in_memory[k]), f"{name}: {k} differs"
    base_sd = weights(base)
    adapted = [
        k
        for k in in_memory
        if k in base_sd and not torch.equal(in_memory[k], base_sd[k].to(in_memory[k].dtype))
    ]
    assert adapted, "the merge changed nothing: the test would pass with any adapter"
    a, b = (json.loads((tmp_path / m / "config.json").read_text()) for m in ("streaming", "in_memory"))
    assert a == b
    if "head-adapted" in name:  # untied as core.lora._untie_adapted_weights does: both keys, tie off
        assert a["tie_word_embeddings"] is False and "lm_head.weight" in streamed


def test_index_is_save_pretrained_format_and_loads_in_transformers(tmp_path):
    from transformers import AutoModelForCausalLM

    base = tmp_path / "base"
    tiny_llama().save_pretrained(base, max_shard_size=SHARD)
    lcfg = LoraConfig(r=4, target_modules=LLAMA_ALL)
    adapter = make_adapter(tiny_llama, lcfg, base, tmp_path / "adapter")
    info = merge_weights(config(base), adapter, tmp_path / "out")
    index = json.loads((tmp_path / "out" / INDEX).read_text())
    files = sorted(p.name for p in (tmp_path / "out").glob("model-*.safetensors"))
    n = len(files)
    assert n == info["shards"] >= 3 and files == [
        f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)
    ]
    sd = weights(tmp_path / "out")
    for key, file in index["weight_map"].items():
        assert key in load_file(str(tmp_path / "out" / file)), key
    assert set(index["weight_map"]) == set(sd) and list(index["weight_map"]) == sorted(sd)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in sd.values())
    assert index["metadata"]["total_parameters"] == sum(t.numel() for t in sd.values())
    for f in files:  # within the limit, or one tensor larger than it alone (save_pretrained's rule)
        shard = load_file(str(tmp_path / "out" / f))
        size = sum(t.numel() * t.element_size() for t in shard.values())
        assert size <= MergeConfig.size_bytes(SHARD) or len(shard) == 1, (f, size, len(shard))

    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "out", use_safetensors=True).eval()
    reference = tiny_llama()
    inject_lora(reference, lcfg)
    _perturb(reference, lcfg)
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(
            merged(input_ids=ids).logits, reference(input_ids=ids).logits, atol=1e-5, rtol=0
        )
    for key, t in merged.state_dict().items():
        if key in sd:
            assert torch.equal(t, sd[key]), key


def test_bin_only_base_is_an_error_that_says_to_convert(tmp_path):
    tiny_llama().save_pretrained(tmp_path / "m")
    (tmp_path / "m" / "model.safetensors").unlink()
    (tmp_path / "m" / "pytorch_model.bin").write_bytes(b"pickle")
    with pytest.raises(MergeSourceError, match="safetensors only: convert"):
        source_files(tmp_path / "m")


def test_merge_config_fields():
    m = MergeConfig()
    assert (m.mode, m.base, m.max_shard_size, m.max_loss_gap) == ("streaming", "auto", "2GB", 1e-2)
    assert m.max_shard_bytes == 2 * 10**9 and MergeConfig.size_bytes("1GiB") == 2**30
    assert MergeConfig.size_bytes("1.5MB") == 1_500_000 and MergeConfig.size_bytes("4096") == 4096
    with pytest.raises(ValueError, match="max_shard_size"):
        MergeConfig(max_shard_size="two gigs")
    assert MergeConfig(max_loss_gap=None).max_loss_gap is None


# ----------------------------------------------------------------------------------------------------
# QLoRA: the dequantized base
# ----------------------------------------------------------------------------------------------------

QUANT = QuantConfig(quant_type="nf4", blocksize=64, double_quant=True)


@pytest.mark.parametrize("build", [tiny_llama, tiny_gpt2], ids=["llama", "gpt2"])
def test_dequantized_base_equals_the_weights_training_quantized(build, tmp_path):
    from core.quant import dequantize_linear4bit, quantize_model

    build().save_pretrained(tmp_path / "base")
    trained = build()
    report = quantize_model(trained, QUANT)
    view = dequantized_view(skeleton(tmp_path / "base"), QUANT, torch.float32, torch.float32)
    assert sorted(view.quantized) == sorted(f"{n}.weight" for n in report.quantized)
    sd = weights(tmp_path / "base")
    for name in report.quantized:
        key = f"{name}.weight"
        got = view(key, sd[key])
        want = dequantize_linear4bit(trained.get_submodule(name))  # (out, in)
        if view.quantized[key]:  # Conv1D: stored (in, out)
            want = want.t()
        assert torch.equal(got, want), name
        assert not torch.equal(got, sd[key]), "NF4 round trip changed nothing"
    for key in sd.keys() - view.quantized.keys():  # the head, embeddings, norms: their original weights
        assert torch.equal(view(key, sd[key]), sd[key]), key


def test_dequantized_streaming_equals_in_memory(tmp_path):
    base = tmp_path / "base"
    tiny_llama().save_pretrained(base, max_shard_size=SHARD)
    lcfg = LoraConfig(r=4, target_modules=LLAMA_ALL, use_dora=True)
    adapter = make_adapter(tiny_llama, lcfg, base, tmp_path / "adapter")
    out = {}
    for mode in ("streaming", "in_memory"):
        cfg = config(base, "method=qlora", f"merge.mode={mode}", "quant.skip_modules=[down_proj]")
        merge_weights(cfg, adapter, tmp_path / mode, "dequantized")
        out[mode] = weights(tmp_path / mode)
    assert sorted(out["streaming"]) == sorted(out["in_memory"])
    for k, v in out["in_memory"].items():
        assert torch.equal(out["streaming"][k], v), k
    orig = weights(base)
    down = "model.layers.0.mlp.down_proj.weight"  # skipped: merged into its original weight, as lora does
    plain = config(base)
    merge_weights(plain, adapter, tmp_path / "original")
    assert torch.equal(out["streaming"][down], weights(tmp_path / "original")[down])
    assert not torch.equal(
        out["streaming"]["model.layers.0.mlp.up_proj.weight"],
        weights(tmp_path / "original")["model.layers.0.mlp.up_proj.weight"],
    )
    assert torch.equal(out["streaming"]["model.embed_tokens.weight"], orig["model.embed_tokens.weight"])


# ----------------------------------------------------------------------------------------------------
# The stage: gap checks, QLoRA auto, limits that keep merged/ untouched
# ----------------------------------------------------------------------------------------------------


@pytest.fixture
def probe_rows(tmp_path):
    import datasets

    g = torch.Generator().manual_seed(3)
    rows = []
    for i in range(6):
        ids = torch.randint(3, 500, (10 + i,), generator=g).tolist()
        rows.append({"input_ids": ids, "labels": [-100] * 4 + ids[4:]})
    path = tmp_path / "eval"
    datasets.Dataset.from_list(rows).save_to_disk(str(path))
    return path


@pytest.fixture
def stage(small_model_dir, tmp_path, probe_rows):
    """(cfg factory, adapter dir, eval split) for merge() on the session's small tiny-llama."""
    from transformers import AutoModelForCausalLM

    lcfg = LoraConfig(r=4, target_modules=LLAMA_ALL)

    def build():
        return AutoModelForCausalLM.from_pretrained(small_model_dir, use_safetensors=True).eval()

    adapter = make_adapter(build, lcfg, small_model_dir, tmp_path / "adapter")

    def cfg(*overrides):
        return load_config(
            overrides=[
                f"model.name_or_path={small_model_dir}",
                f"output_dir={tmp_path / 'runs'}",
                "name=m",
                "merge.max_shard_size=100KB",
                *overrides,
            ]
        )

    return cfg, adapter, probe_rows


def test_stage_streams_checks_the_gap_and_reports(stage):
    make, adapter, rows = stage
    cfg = make()
    report = merge(cfg, cfg.run_dir, adapter, rows)
    assert report["mode"] == "streaming" and report["shards"] >= 3
    assert report["max_logit_gap"] < 1e-4 and abs(report["loss_gap"]) < 1e-5 and report["gap_rows"] == 6
    assert report["peak_rss_mb"] > 0 and report["peak_rss_method"] in ("vmhwm", "sampled")
    assert "base" not in report and "vs_4bit_trained" not in report  # lora: nothing of QLoRA's
    on_disk = json.loads((cfg.run_dir / "merge_report.json").read_text())
    assert on_disk == json.loads(json.dumps(report))
    merged = cfg.run_dir / "merged"
    assert (merged / INDEX).is_file() and (merged / "tokenizer.json").is_file()
    assert (merged / "generation_config.json").is_file() == (
        Path(cfg.model.name_or_path) / "generation_config.json"
    ).is_file()


def test_qlora_auto_measures_both_bases_and_keeps_the_closer(stage):
    make, adapter, rows = stage
    cfg = make("method=qlora")
    report = merge(cfg, cfg.run_dir, adapter, rows)
    cands = report["candidates"]
    assert sorted(cands) == ["dequantized", "original"] and report["base_requested"] == "auto"
    for c in cands.values():
        assert {"max_logit_gap", "loss_gap", "loss_4bit_trained"} <= set(c["vs_4bit_trained"])
        assert c["gap"]["max_logit_gap"] < 1e-4  # each merge reproduces the adapter on its own base
    key = {
        b: (abs(c["vs_4bit_trained"]["loss_gap"]), c["vs_4bit_trained"]["max_logit_gap"])
        for b, c in cands.items()
    }
    assert report["base"] == min(key, key=key.get)
    assert report["vs_4bit_trained"] == cands[report["base"]]["vs_4bit_trained"]
    # fp32 compute: the dequantized merge is the 4-bit model itself, the original one carries the NF4 error
    assert cands["dequantized"]["vs_4bit_trained"]["max_logit_gap"] < 1e-4
    assert cands["original"]["vs_4bit_trained"]["max_logit_gap"] > 1e-3
    # merged/ holds the chosen candidate only, whole
    merged = cfg.run_dir / "merged"
    assert not list(merged.glob(".candidate-*"))
    alone = make("method=qlora", f"merge.base={report['base']}")
    merge_weights(alone, adapter, cfg.run_dir.parent / "alone", report["base"])
    got, want = weights(merged), weights(cfg.run_dir.parent / "alone")
    assert sorted(got) == sorted(want) and all(torch.equal(got[k], want[k]) for k in want)


def test_choose_reads_loss_delta_first_then_logit_gap():
    def r(loss, logit):
        return {"vs_4bit_trained": {"loss_gap": loss, "max_logit_gap": logit}}

    assert choose({"original": r(-0.01, 0.5), "dequantized": r(0.02, 1e-6)}) == "original"
    assert choose({"original": r(0.01, 0.5), "dequantized": r(-0.01, 0.1)}) == "dequantized"


def test_a_gap_above_the_limit_fails_and_keeps_the_previous_merged_model(stage):
    make, adapter, rows = stage
    good = make()
    merge(good, good.run_dir, adapter, rows)
    merged = good.run_dir / "merged"
    before = {p.name: p.read_bytes() for p in merged.iterdir()}
    report_before = (good.run_dir / "merge_report.json").read_bytes()
    # bf16 weights cannot reproduce the adapter (fp32 factors on a bf16 base) to 1e-6
    bad = make("merge.dtype=bfloat16", "merge.max_logit_gap=1e-6")
    with pytest.raises(MergeGapError, match="merge.max_logit_gap=1e-06"):
        merge(bad, bad.run_dir, adapter, rows)
    assert {p.name: p.read_bytes() for p in merged.iterdir()} == before
    assert (good.run_dir / "merge_report.json").read_bytes() == report_before
    assert [p.name for p in good.run_dir.iterdir() if p.name.startswith(".merged")] == []
    # the loss limit alone fails it too, and a first merge that fails leaves no merged/ at all
    fresh = make("name=fresh", "merge.dtype=bfloat16", "merge.max_logit_gap=100", "merge.max_loss_gap=1e-9")
    with pytest.raises(MergeGapError, match="merge.max_loss_gap=1e-09"):
        merge(fresh, fresh.run_dir, adapter, rows)
    assert not (fresh.run_dir / "merged").exists() and not (fresh.run_dir / "merge_report.json").exists()


# ----------------------------------------------------------------------------------------------------
# Peak RSS: streaming below in-memory, each in a fresh process
# ----------------------------------------------------------------------------------------------------

_RSS_CHILD = """
import json, sys
sys.path.insert(0, {repo!r})
from core.config import load_config
from core.merge import merge_weights
from core.merge.sharded import skeleton
skeleton({base!r})  # imports and lazy modules of both modes, before the merge's RSS is counted
cfg = load_config(overrides=["model.name_or_path=" + {base!r}, "merge.mode={mode}", "merge.max_shard_size=8MB"])
print(json.dumps(merge_weights(cfg, {adapter!r}, {out!r})))
"""


@pytest.mark.slow
def test_streaming_peak_rss_is_below_in_memory(tmp_path):
    """A ~59 MB fp32 Llama in 8 MB shards, each merge in its own process (RSS counted from the merge's
    start, after both modes' imports). Measured here: streaming adds ~0.15x what in_memory adds (18 vs 121 MB); the
    bar, 0.6, leaves room for allocator noise."""
    import os

    def build():
        return tiny_llama(
            hidden_size=512,
            intermediate_size=1024,
            num_hidden_layers=4,
            num_attention_heads=8,
            num_key_value_heads=8,
            vocab_size=4096,
        )

    base = tmp_path / "base"
    build().save_pretrained(base, max_shard_size="8MB")
    adapter = make_adapter(build, LoraConfig(r=8, target_modules=LLAMA_ALL), base, tmp_path / "adapter")
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}  # RSS that follows frees (docs/environment.md)
    delta = {}
    for mode in ("streaming", "in_memory"):
        code = _RSS_CHILD.format(
            repo=str(REPO), base=str(base), mode=mode, adapter=str(adapter), out=str(tmp_path / mode)
        )
        out = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True
        )
        delta[mode] = json.loads(out.stdout.strip().splitlines()[-1])["peak_rss_delta_mb"]
    assert delta["in_memory"] > 40, delta  # the whole model passed through memory
    assert delta["streaming"] < 0.6 * delta["in_memory"], delta
