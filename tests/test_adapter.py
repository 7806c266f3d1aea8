"""Adapter files: PEFT format both ways, refusal of broken adapters, atomic replacement, shape checks."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

import core.adapter as adapter_mod
from core.adapter import (
    CONFIG_NAME,
    WEIGHTS_NAME,
    AdapterError,
    adapter_state_dict,
    load_adapter,
    save_adapter,
)
from core.config import LoraConfig
from core.lora import inject_lora, lora_modules, merge_adapters, unmerge_adapters
from tests.conftest import tiny_llama

BASE = "tiny-llama-test"


@pytest.fixture
def ids() -> torch.Tensor:
    return torch.randint(0, 256, (2, 9), generator=torch.Generator().manual_seed(1))  # (B, T)


def logits(m, ids) -> torch.Tensor:
    with torch.no_grad():
        return m(input_ids=ids).logits


def perturb(tensors, seed: int = 2, std: float = 0.1) -> None:
    """Fill lora_B (and any other given tensor) with noise: a zero B proves nothing about loading."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for w in tensors:
            w.copy_(torch.randn(w.shape, generator=g) * std)


def adapted_model(cfg: LoraConfig, seed: int = 2):
    m = tiny_llama()
    inject_lora(m, cfg)
    perturb([mod.lora_B.weight for _, mod in lora_modules(m)], seed=seed)
    return m


def listing(path):
    return sorted(p.name for p in path.iterdir())


# --- our own round trip ---------------------------------------------------------------------------


def test_save_load_round_trip(tmp_path, ids):
    cfg = LoraConfig(r=4, target_modules=["q_proj", "v_proj", "down_proj"])
    src = adapted_model(cfg)
    base_logits = logits(tiny_llama(), ids)
    src_logits = logits(src, ids)
    assert (src_logits - base_logits).abs().max() > 0.05

    out = save_adapter(src, tmp_path / "adapter", cfg, base_model=BASE)
    assert listing(out) == [CONFIG_NAME, WEIGHTS_NAME]
    assert listing(tmp_path) == ["adapter"]  # no temp dir left beside it

    dst = tiny_llama()
    loaded_cfg = load_adapter(dst, out)
    assert loaded_cfg.r == 4
    assert loaded_cfg.lora_alpha == 8.0
    want, got = adapter_state_dict(src), adapter_state_dict(dst)
    assert sorted(want) == sorted(got)
    assert len(want) == 2 * 2 * 3
    for k in want:
        assert torch.equal(want[k], got[k]), k
    assert torch.equal(logits(dst, ids), src_logits)


def test_round_trip_rank_pattern_with_default_alpha(tmp_path, ids):
    # alpha unset means 2·r per module, also for modules whose r comes from rank_pattern
    cfg = LoraConfig(r=8, target_modules=["q_proj", "v_proj"], rank_pattern={"q_proj": 2})
    src = adapted_model(cfg)
    q = src.model.layers[0].self_attn.q_proj
    assert (q.r, q.scaling) == (2, 2.0)
    out = save_adapter(src, tmp_path / "a", cfg, base_model=BASE)
    dst = tiny_llama()
    load_adapter(dst, out)
    dq, dv = dst.model.layers[0].self_attn.q_proj, dst.model.layers[0].self_attn.v_proj
    assert (dq.r, dq.scaling) == (2, 2.0)
    assert (dv.r, dv.scaling) == (8, 2.0)
    assert torch.equal(logits(dst, ids), logits(src, ids))


def test_file_keys_and_config_are_pefts(tmp_path):
    cfg = LoraConfig(r=4, alpha=12, target_modules=["q_proj", "v_proj"])
    out = save_adapter(adapted_model(cfg), tmp_path / "a", cfg, base_model=BASE)
    sd = load_file(str(out / WEIGHTS_NAME))
    paths = [f"model.layers.{i}.self_attn.{p}" for i in range(2) for p in ("q_proj", "v_proj")]
    assert set(sd) == {f"base_model.model.{p}.lora_{ab}.weight" for p in paths for ab in "AB"}
    assert sd["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"].shape == (4, 64)  # r × in
    assert sd["base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"].shape == (32, 4)  # out × r

    conf = json.loads((out / CONFIG_NAME).read_text())
    assert conf["peft_type"] == "LORA"
    assert conf["task_type"] == "CAUSAL_LM"
    assert conf["r"] == 4
    assert conf["lora_alpha"] == 12
    assert sorted(conf["target_modules"]) == sorted(paths)
    assert conf["base_model_name_or_path"] == BASE
    assert conf["use_rslora"] is False


def test_modules_to_save_round_trip(tmp_path, ids):
    cfg = LoraConfig(r=4, target_modules=["q_proj"], modules_to_save=["lm_head"])
    src = adapted_model(cfg)
    perturb([src.lm_head.weight], seed=9, std=0.05)
    out = save_adapter(src, tmp_path / "a", cfg, base_model=BASE)
    assert "base_model.model.lm_head.weight" in load_file(str(out / WEIGHTS_NAME))
    dst = tiny_llama()
    load_adapter(dst, out)
    assert torch.equal(dst.lm_head.weight, src.lm_head.weight)
    assert torch.equal(logits(dst, ids), logits(src, ids))


def test_tied_embeddings_both_in_modules_to_save_save_and_load(tmp_path, ids):
    """Llama-3.2/Qwen2.5/Gemma tie lm_head to embed_tokens: one storage under two keys, which
    safetensors refuses unless each is written as its own tensor."""
    cfg = LoraConfig(r=4, target_modules=["q_proj"], modules_to_save=["embed_tokens", "lm_head"])
    src = tiny_llama(tie_word_embeddings=True)
    inject_lora(src, cfg)
    assert src.lm_head.weight.data_ptr() == src.model.embed_tokens.weight.data_ptr()
    perturb([m.lora_B.weight for _, m in lora_modules(src)] + [src.lm_head.weight], seed=4)
    out = save_adapter(src, tmp_path / "a", cfg, base_model=BASE)
    sd = load_file(str(out / WEIGHTS_NAME))
    assert torch.equal(
        sd["base_model.model.lm_head.weight"], sd["base_model.model.model.embed_tokens.weight"]
    )
    dst = tiny_llama(tie_word_embeddings=True)
    load_adapter(dst, out)
    assert torch.equal(logits(dst, ids), logits(src, ids))


# --- interoperability with PEFT -------------------------------------------------------------------


def test_peft_loads_our_adapter(tmp_path, ids):
    peft = pytest.importorskip("peft")
    cfg = LoraConfig(r=8, target_modules="all-linear")
    ours = adapted_model(cfg)
    out = save_adapter(ours, tmp_path / "a", cfg, base_model=BASE)
    pm = peft.PeftModel.from_pretrained(tiny_llama(), str(out)).eval()
    want = logits(ours, ids)
    assert (want - logits(tiny_llama(), ids)).abs().max() > 0.05
    torch.testing.assert_close(logits(pm, ids), want, atol=1e-5, rtol=0)


def test_peft_loads_our_rslora_rank_pattern_adapter(tmp_path, ids):
    peft = pytest.importorskip("peft")
    # alpha left at its default (2r): per-module ranks must still give PEFT the same scales
    cfg = LoraConfig(
        r=8,
        target_modules=["q_proj", "k_proj", "v_proj", "up_proj"],
        use_rslora=True,
        rank_pattern={"q_proj": 4, "up_proj": 2},
        modules_to_save=["lm_head"],
    )
    ours = adapted_model(cfg)
    perturb([ours.lm_head.weight], seed=9, std=0.05)
    out = save_adapter(ours, tmp_path / "a", cfg, base_model=BASE)
    pm = peft.PeftModel.from_pretrained(tiny_llama(), str(out)).eval()
    q = pm.base_model.model.model.layers[0].self_attn.q_proj
    assert q.r["default"] == 4
    torch.testing.assert_close(logits(pm, ids), logits(ours, ids), atol=1e-5, rtol=0)


def test_we_load_peft_adapter(tmp_path, ids):
    peft = pytest.importorskip("peft")
    base = tiny_llama()
    pcfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    pm = peft.get_peft_model(base, pcfg).eval()
    perturb([p for n, p in pm.named_parameters() if "lora_B" in n])
    want = logits(pm, ids)
    assert (want - logits(tiny_llama(), ids)).abs().max() > 0.05
    pm.save_pretrained(str(tmp_path / "peft"))

    ours = tiny_llama()
    cfg = load_adapter(ours, tmp_path / "peft")
    assert cfg.r == 4
    assert cfg.lora_alpha == 8.0
    assert len(list(lora_modules(ours))) == 4
    torch.testing.assert_close(logits(ours, ids), want, atol=1e-5, rtol=0)


def test_we_load_peft_rslora_rank_pattern_adapter(tmp_path, ids):
    peft = pytest.importorskip("peft")
    pcfg = peft.LoraConfig(
        r=8,
        lora_alpha=16,
        target_modules=["q_proj", "v_proj", "gate_proj"],
        use_rslora=True,
        rank_pattern={"v_proj": 2},
        alpha_pattern={"gate_proj": 4},
    )
    pm = peft.get_peft_model(tiny_llama(), pcfg).eval()
    perturb([p for n, p in pm.named_parameters() if "lora_B" in n])
    want = logits(pm, ids)
    pm.save_pretrained(str(tmp_path / "peft"))

    ours = tiny_llama()
    load_adapter(ours, tmp_path / "peft")
    v = ours.model.layers[1].self_attn.v_proj
    assert v.r == 2
    assert v.scaling == pytest.approx(16 / 2**0.5)
    assert ours.model.layers[0].mlp.gate_proj.scaling == pytest.approx(4 / 8**0.5)
    torch.testing.assert_close(logits(ours, ids), want, atol=1e-5, rtol=0)


# --- refusals on save -----------------------------------------------------------------------------


def test_save_refuses_untrained_adapter(tmp_path):
    cfg = LoraConfig(r=4, target_modules=["q_proj"])
    m = tiny_llama()
    inject_lora(m, cfg)
    with pytest.raises(AdapterError, match="all zero"):
        save_adapter(m, tmp_path / "a", cfg, base_model=BASE)
    assert listing(tmp_path) == []
    out = save_adapter(m, tmp_path / "a", cfg, base_model=BASE, require_trained=False)
    assert listing(out) == [CONFIG_NAME, WEIGHTS_NAME]


def test_save_refuses_nan(tmp_path):
    cfg = LoraConfig(r=4, target_modules=["q_proj"])
    m = adapted_model(cfg)
    with torch.no_grad():
        m.model.layers[1].self_attn.q_proj.lora_A.weight[2, 3] = float("nan")
    with pytest.raises(AdapterError, match=r"inf/nan.*layers\.1\.self_attn\.q_proj\.lora_A"):
        save_adapter(m, tmp_path / "a", cfg, base_model=BASE)
    assert listing(tmp_path) == []


def test_save_refuses_empty_tensor_zero3_style(tmp_path):
    # The "40-byte adapter" after ZeRO-3: parameters gathered as shape-[0] shards.
    cfg = LoraConfig(r=4, target_modules=["q_proj", "v_proj"])
    m = adapted_model(cfg)
    sd = adapter_state_dict(m)
    key = "base_model.model.model.layers.0.self_attn.v_proj.lora_A.weight"
    sd[key] = torch.empty(0)
    with pytest.raises(AdapterError, match=r"empty \(shape \[0\]\).*v_proj\.lora_A"):
        save_adapter(m, tmp_path / "a", cfg, base_model=BASE, state_dict=sd)
    assert listing(tmp_path) == []

    empty_all = {k: torch.empty(0) for k in adapter_state_dict(m)}
    with pytest.raises(AdapterError, match="empty"):
        save_adapter(m, tmp_path / "a", cfg, base_model=BASE, state_dict=empty_all)
    assert listing(tmp_path) == []


def test_save_refuses_missing_key(tmp_path):
    cfg = LoraConfig(r=4, target_modules=["q_proj", "v_proj"])
    m = adapted_model(cfg)
    sd = adapter_state_dict(m)
    key = "base_model.model.model.layers.1.self_attn.q_proj.lora_B.weight"
    del sd[key]
    with pytest.raises(
        AdapterError, match=r"missing 1 expected tensors.*layers\.1\.self_attn\.q_proj\.lora_B"
    ):
        save_adapter(m, tmp_path / "a", cfg, base_model=BASE, state_dict=sd)
    with pytest.raises(AdapterError, match="no tensors"):
        save_adapter(m, tmp_path / "a", cfg, base_model=BASE, state_dict={})
    assert listing(tmp_path) == []


def test_existing_adapter_replaced_only_when_new_one_is_complete(tmp_path, monkeypatch):
    cfg = LoraConfig(r=4, target_modules=["q_proj"])
    out = tmp_path / "adapter"
    save_adapter(adapted_model(cfg, seed=2), out, cfg, base_model=BASE)
    v1 = (out / WEIGHTS_NAME).read_bytes()

    # a refused adapter leaves the old one untouched
    bad = adapted_model(cfg, seed=3)
    with torch.no_grad():
        bad.model.layers[0].self_attn.q_proj.lora_B.weight[0, 0] = float("inf")
    with pytest.raises(AdapterError):
        save_adapter(bad, out, cfg, base_model=BASE)
    assert (out / WEIGHTS_NAME).read_bytes() == v1

    # a write that dies half way leaves the old one untouched, and no temp dir behind
    real_save = adapter_mod.save_file

    def dying_save(tensors, filename, metadata=None):
        real_save(tensors, filename, metadata=metadata)
        raise OSError("disk full")

    monkeypatch.setattr(adapter_mod, "save_file", dying_save)
    with pytest.raises(OSError, match="disk full"):
        save_adapter(adapted_model(cfg, seed=4), out, cfg, base_model=BASE)
    monkeypatch.undo()
    assert (out / WEIGHTS_NAME).read_bytes() == v1
    assert listing(tmp_path) == ["adapter"]

    # a good save replaces it
    new = adapted_model(cfg, seed=5)
    save_adapter(new, out, cfg, base_model=BASE)
    assert (out / WEIGHTS_NAME).read_bytes() != v1
    assert listing(tmp_path) == ["adapter"]
    got = load_file(str(out / WEIGHTS_NAME))
    for k, v in adapter_state_dict(new).items():
        assert torch.equal(got[k], v)


# --- refusals on load -----------------------------------------------------------------------------


def test_load_refuses_other_hidden_size(tmp_path):
    cfg = LoraConfig(r=4, target_modules=["q_proj", "v_proj"])
    out = save_adapter(adapted_model(cfg), tmp_path / "a", cfg, base_model=BASE)
    other = tiny_llama(hidden_size=96, intermediate_size=192)
    with pytest.raises(AdapterError, match=r"adapter has shape \(4, 64\), model \(4, 96\)"):
        load_adapter(other, out)


def test_load_refuses_other_layer_count(tmp_path):
    cfg = LoraConfig(r=4, target_modules=["q_proj"])
    out = save_adapter(adapted_model(cfg), tmp_path / "a", cfg, base_model=BASE)
    with pytest.raises(AdapterError, match=r"does not fit this model.*layers\.1\.self_attn\.q_proj"):
        load_adapter(tiny_llama(num_hidden_layers=1), out)


def test_load_refuses_missing_files_and_other_types(tmp_path):
    with pytest.raises(AdapterError, match="not an adapter directory"):
        load_adapter(tiny_llama(), tmp_path)
    (tmp_path / CONFIG_NAME).write_text(json.dumps({"peft_type": "PREFIX_TUNING"}))
    with pytest.raises(AdapterError, match="only LORA"):
        load_adapter(tiny_llama(), tmp_path)
    (tmp_path / CONFIG_NAME).write_text(
        json.dumps({"peft_type": "LORA", "r": 4, "target_modules": ["q_proj"]})
    )
    with pytest.raises(AdapterError, match="safetensors"):
        load_adapter(tiny_llama(), tmp_path)


def test_loading_into_existing_adapters_of_another_kind_or_merged_is_refused(tmp_path):
    cfg = LoraConfig(r=4, target_modules=["q_proj"])
    out = save_adapter(adapted_model(cfg), tmp_path / "a", cfg, base_model=BASE)
    other = tiny_llama()
    inject_lora(other, LoraConfig(r=4, alpha=16, target_modules=["q_proj"]))  # alpha 16, file has 2r = 8
    with pytest.raises(AdapterError, match=r"alpha=16, .* alpha=8,"):
        load_adapter(other, out)
    same = adapted_model(cfg)
    merge_adapters(same)
    with pytest.raises(AdapterError, match="merged; unmerge_adapters"):
        load_adapter(same, out)
    unmerge_adapters(same)
    load_adapter(same, out)  # same kind, unmerged: loads


def test_fields_a_peft_file_leaves_out_take_peft_defaults(tmp_path, ids):
    peft = pytest.importorskip("peft")
    cfg = LoraConfig(r=8, target_modules=["q_proj", "v_proj"])  # at r=4, 8/r and 2r/r would agree
    out = save_adapter(adapted_model(cfg), tmp_path / "a", cfg, base_model=BASE)
    conf = json.loads((out / CONFIG_NAME).read_text())
    del conf["lora_alpha"]  # PeftModel then scales by its default 8 / r = 1, not our 2r / r = 2
    (out / CONFIG_NAME).write_text(json.dumps(conf))
    ours = tiny_llama()
    load_adapter(ours, out)
    theirs = peft.PeftModel.from_pretrained(tiny_llama(), str(out)).eval()
    torch.testing.assert_close(logits(ours, ids), logits(theirs, ids), atol=1e-5, rtol=0)
    assert all(m.scaling == 1.0 for _, m in lora_modules(ours))
