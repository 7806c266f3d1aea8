"""Every family adapts its attention and MLP by default, trains, merges and loads in PEFT; preflight
catches targets, ranks and 4-bit shapes on the meta device before any stage runs (README, "Model families")."""

from __future__ import annotations

import logging

import pytest
import torch

from core.adapter import save_adapter
from core.config import LoraConfig, QuantConfig
from core.lora import inject_lora, lora_modules, merge_and_unload
from core.preflight import PreflightError, check_model
from core.targets import TargetError, select_targets
from tests.families import ALL, TRAINED, family_model

# Written out per family from its transformers modeling file, not from core.targets' table: every
# attention projection and every MLP projection, times the 2 layers of the tiny models.
EXPECTED = {
    "llama": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "qwen2": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "mistral": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "gemma": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "olmo": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "phi3": ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"],
    "gpt2": ["attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"],
    "falcon": ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"],
    "gpt_neox": ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"],
    "phi": ["q_proj", "k_proj", "v_proj", "dense", "fc1", "fc2"],
    "starcoder2": ["q_proj", "k_proj", "v_proj", "o_proj", "mlp.c_fc", "mlp.c_proj"],
    "mixtral": ["q_proj", "k_proj", "v_proj", "o_proj"],  # experts are 3-D parameters, not linear layers
}
LAYERS = 2


def _kinds(names: list[str], expected: list[str]) -> dict[str, int]:
    return {e: sum(n.endswith("." + e) for n in names) for e in expected}


@pytest.mark.parametrize("family", ALL)
def test_default_targets_are_every_attention_and_mlp_projection(family):
    model = family_model(family, meta=True)
    sel = select_targets(model)  # the default, "attention-mlp"
    assert _kinds(sel.names, EXPECTED[family]) == dict.fromkeys(EXPECTED[family], LAYERS)
    assert len(sel.names) == LAYERS * len(EXPECTED[family])  # and nothing else: no head, no router
    assert repr(model.config.model_type) in sel.rule


# The attention projections alone (target_modules: attention), from the same modeling files.
EXPECTED_ATTENTION = {
    "llama": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "qwen2": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "mistral": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "gemma": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "olmo": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "phi3": ["qkv_proj", "o_proj"],
    "gpt2": ["attn.c_attn", "attn.c_proj"],
    "falcon": ["query_key_value", "self_attention.dense"],
    "gpt_neox": ["query_key_value", "attention.dense"],
    "phi": ["q_proj", "k_proj", "v_proj", "dense"],
    "starcoder2": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "mixtral": ["q_proj", "k_proj", "v_proj", "o_proj"],
}


@pytest.mark.parametrize("family", ALL)
def test_attention_targets_are_the_attention_projections_only(family):
    sel = select_targets(family_model(family, meta=True), "attention")
    expected = EXPECTED_ATTENTION[family]
    assert _kinds(sel.names, expected) == dict.fromkeys(expected, LAYERS)
    assert len(sel.names) == LAYERS * len(expected)


def test_attention_targets_on_an_unknown_family_ask_for_names():
    model = family_model("llama", meta=True)
    model.config.model_type = "my_own_arch"
    with pytest.raises(TargetError, match="list the attention ones in lora.target_modules"):
        select_targets(model, "attention")


def _batch(model, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, model.config.vocab_size, (2, 12), generator=g)


def _train(model, ids: torch.Tensor, steps: int = 4) -> tuple[list[float], set[str]]:
    """A few AdamW steps; returns the losses and the names of the parameters that got a gradient."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-2)
    model.train()
    losses, got_grad = [], set()
    for _ in range(steps):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        got_grad |= {n for n, p in model.named_parameters() if p.grad is not None}
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    model.eval()
    return losses, got_grad


@pytest.mark.parametrize("family", TRAINED)
def test_lora_trains_merges_and_peft_loads_the_adapter(family, tmp_path):
    peft = pytest.importorskip("peft")
    model = family_model(family)
    ids = _batch(model)
    with torch.no_grad():
        before = model(ids).logits
    cfg = LoraConfig(r=4)
    report = inject_lora(model, cfg)
    assert _kinds(report.targets, EXPECTED[family]) == dict.fromkeys(EXPECTED[family], LAYERS)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, before)  # B = 0: a fresh adapter changes nothing
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_" in n for n in trainable)
    losses, got_grad = _train(model, ids)
    assert losses[-1] < losses[0] and got_grad == trainable
    with torch.no_grad():
        tuned = model(ids).logits
    assert not torch.allclose(tuned, before)
    out = save_adapter(model, tmp_path / "adapter", cfg, base_model=family)

    pm = peft.PeftModel.from_pretrained(family_model(family), str(out)).eval()
    with torch.no_grad():
        torch.testing.assert_close(pm(ids).logits, tuned, atol=1e-5, rtol=1e-5)

    merged = merge_and_unload(model)
    assert not any(True for _ in lora_modules(merged))
    with torch.no_grad():
        gap = (merged(ids).logits - tuned).abs().max().item()
    assert gap < 1e-4, f"{family}: merge gap {gap}"


@pytest.mark.parametrize("family", TRAINED)
def test_qlora_trains_adapters_on_a_4bit_base(family):
    pytest.importorskip("bitsandbytes")
    from core.quant import is_4bit_linear, quantize_model

    model = family_model(family)
    quantize_model(model, QuantConfig())
    report = inject_lora(model, LoraConfig(r=4))
    assert all(is_4bit_linear(m.base_layer) for _, m in lora_modules(model))
    assert len(report.targets) == LAYERS * len(EXPECTED[family])
    losses, got_grad = _train(model, _batch(model), steps=3)
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0]
    assert got_grad and all(".lora_" in n for n in got_grad)


@pytest.mark.parametrize("family", TRAINED)
def test_preflight_on_the_meta_model_matches_the_real_injection(family, run_config):
    cfg = run_config("method=qlora")
    report = check_model(cfg, family_model(family, meta=True))
    real = inject_lora(family_model(family), cfg.lora)
    assert report["adapters"]["count"] == len(real.targets)
    assert report["adapters"]["kinds"] == select_targets(family_model(family, meta=True)).kinds


@pytest.mark.parametrize("family", TRAINED)
@pytest.mark.parametrize(
    "extra",
    [
        [],
        ["lora.use_dora=true"],
        ["lora.rank_pattern={'.*o_proj|.*c_proj': 2}", "lora.target_modules=all-linear"],
    ],
    ids=["lora", "dora", "rank-pattern"],
)
def test_the_trainable_formula_counts_what_injection_trains(family, extra, run_config):
    """r·(d + k) per adapted matrix (+ d for DoRA), from the meta model, equals the parameters that
    actually require grad after injection: the sweep's table checks every variant against it."""
    from core.lora import count_parameters

    cfg = run_config("method=lora", "lora.r=4", *extra)
    report = check_model(cfg, family_model(family, meta=True))
    model = family_model(family)
    inject_lora(model, cfg.lora)
    assert report["trainable_formula"] == count_parameters(model)[0] > 0
    full = check_model(run_config("method=full"), family_model(family, meta=True))
    assert full["trainable_formula"] == count_parameters(family_model(family))[1]


def test_partial_match_warns_with_candidates_and_strict_refuses(caplog):
    # The old seven Llama names on Phi-3: only o_proj and down_proj exist there.
    names = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    model = family_model("phi3", meta=True)
    with caplog.at_level(logging.WARNING, logger="core.targets"):
        sel = select_targets(model, names)
    assert sorted(sel.unmatched) == ["gate_proj", "k_proj", "q_proj", "up_proj", "v_proj"]
    assert sel.kinds == {"o_proj": 2, "down_proj": 2}
    warning = " ".join(r.getMessage() for r in caplog.records)
    assert "'gate_proj'" in warning and "qkv_proj" in warning and "gate_up_proj" in warning
    with pytest.raises(TargetError, match="strict_targets") as exc:
        select_targets(model, names, strict=True)
    assert "qkv_proj" in str(exc.value)


def test_target_errors_suggest_only_other_config_values(run_config):
    model = family_model("gpt2", meta=True)
    cfg = run_config("lora.target_modules=[q_proj,v_proj]")
    with pytest.raises(PreflightError) as exc:
        check_model(cfg, model)
    msg = str(exc.value)
    assert "c_attn" in msg and "c_fc" in msg  # what this model has
    assert "'lm_head'" not in msg  # the head is no suggestion: it is not an attention or MLP layer
    cfg = run_config("lora.target_modules=all-linear", "lora.exclude_modules=[c_attn,c_proj,c_fc]")
    with pytest.raises(PreflightError, match="exclude_modules"):
        check_model(cfg, model)


def test_preflight_refuses_ranks_patterns_and_4bit_shapes(run_config):
    model = family_model("llama", meta=True)
    with pytest.raises(PreflightError) as exc:
        check_model(run_config("lora.r=96", "lora.rank_pattern={qproj: 4}"), model)
    msg = str(exc.value)
    assert "lora.r" in msg and "'qproj'" in msg  # both problems, in one message
    # in_features 64 and 128: blocksize 128 does not divide the attention inputs on CPU
    with pytest.raises(PreflightError, match="quant.skip_modules|quant.blocksize"):
        check_model(run_config("method=qlora", "quant.blocksize=128"), model, device_type="cpu")


def test_a_config_that_does_not_fit_fails_before_prepare_runs(prefect_harness, run_config, tmp_path):
    from prefect import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    from core.config import to_yaml
    from flows.finetune import finetune

    cfg = run_config("name=preflight", "lora.target_modules=[c_attn]", "lora.strict_targets=true")
    path = tmp_path / "run.yaml"
    path.write_text(to_yaml(cfg))
    state = finetune(config=str(path), return_state=True)
    assert state.is_failed()
    with pytest.raises(PreflightError, match="c_attn"):
        state.result()
    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[state.state_details.flow_run_id]))
        )
    assert runs == []  # prepare never ran, nor anything after it
    assert not (tmp_path / "cache").exists()  # no data was tokenized


def test_the_summary_and_manifest_record_the_modules_adapted(prefect_harness, run_config, tmp_path):
    import json
    from pathlib import Path

    from tests.test_flow import run_flow

    cfg = run_config("name=adapted", "train.max_steps=2", "lora.target_modules=[q_proj,v_proj,nope]")
    result = run_flow(cfg, tmp_path)
    record = result["train"]["adapters"]
    assert record["kinds"] == {"q_proj": 2, "v_proj": 2}
    assert record["modules"] == [
        f"model.layers.{i}.self_attn.{p}" for i in (0, 1) for p in ("q_proj", "v_proj")
    ]
    assert json.loads((cfg.run_dir / "train_summary.json").read_text())["adapters"] == record
    manifest = json.loads(Path(result["publish"]["uri"], "manifest.json").read_text())
    assert manifest["metadata"]["adapters"] == record


def test_the_readme_table_names_every_family_in_the_target_table():
    from pathlib import Path

    from core.targets import FAMILY_TARGETS

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    table = readme.split("<!-- families-table -->", 1)[1].split("\n\n", 1)[0]
    families = {f.strip() for row in table.strip().splitlines()[2:] for f in row.split("|")[1].split(",")}
    assert set(FAMILY_TARGETS) <= families, sorted(set(FAMILY_TARGETS) - families)
