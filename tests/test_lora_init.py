"""PiSSA and OLoRA: outputs unchanged at init, the same factors as PEFT's, merges exact, and the exported
rank-2r plain LoRA reproduces the trained model on the original base weights (in PEFT too)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from core.lora import LoRALinear
from core.lora_init import as_plain_lora, initialize

INITS = ["pissa", "pissa_niter_4", "olora"]


def _layer(seed: int = 0, r: int = 4, bias: bool = True) -> LoRALinear:
    torch.manual_seed(seed)
    return LoRALinear(nn.Linear(48, 32, bias=bias), r=r, alpha=2 * r)


@pytest.mark.parametrize("how", INITS)
def test_outputs_unchanged_at_init_and_factors_nonzero(how):
    layer = _layer()
    x = torch.randn(5, 48)
    w, b = layer.base_layer.weight.detach().clone(), layer.base_layer.bias.detach().clone()
    initialize(layer, how)
    assert layer.lora_B.weight.abs().sum() > 0 and layer.lora_A.weight.abs().sum() > 0
    assert not torch.equal(layer.base_layer.weight, w)  # the residual, W - s·B·A
    torch.testing.assert_close(layer(x), x @ w.t() + b, atol=1e-5, rtol=1e-5)


def test_pissa_takes_the_principal_singular_directions():
    layer = _layer()
    w = layer.base_layer.weight.detach().clone()
    initialize(layer, "pissa")
    u, s, vh = torch.linalg.svd(w, full_matrices=False)
    top = (u[:, :4] * s[:4]) @ vh[:4]
    torch.testing.assert_close(layer.delta_weight(), top, atol=1e-5, rtol=1e-5)  # s·B·A = U_r S_r V_rᵀ
    # the residual holds the rest of the spectrum: its largest singular value is W's (r+1)-th
    assert torch.linalg.svdvals(layer.base_layer.weight.detach())[0].item() == pytest.approx(
        s[4].item(), rel=1e-4
    )


@pytest.mark.parametrize("how", ["pissa", "olora"])
def test_factors_equal_pefts(how):
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(48, 32))
    ours = LoRALinear(nn.Linear(48, 32), r=4, alpha=8)
    ours.base_layer.load_state_dict(net[0].state_dict())
    initialize(ours, how)
    pm = peft.get_peft_model(
        net, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["0"], init_lora_weights=how)
    )
    theirs = pm.base_model.model[0]
    torch.testing.assert_close(ours.lora_A.weight, theirs.lora_A["default"].weight)
    torch.testing.assert_close(ours.lora_B.weight, theirs.lora_B["default"].weight)
    torch.testing.assert_close(ours.base_layer.weight, theirs.base_layer.weight)


@pytest.mark.parametrize("how", INITS)
def test_merge_is_exact_and_the_plain_export_applies_to_the_original_weight(how):
    layer = _layer()
    original = layer.base_layer.weight.detach().clone()
    initialize(layer, how)
    with torch.no_grad():  # "training": move both factors
        layer.lora_A.weight.add_(0.05 * torch.randn_like(layer.lora_A.weight))
        layer.lora_B.weight.add_(0.05 * torch.randn_like(layer.lora_B.weight))
    x = torch.randn(7, 48)
    y = layer(x)
    layer.merge()
    torch.testing.assert_close(layer.base_layer(x), y, atol=1e-5, rtol=1e-5)
    layer.unmerge()
    torch.testing.assert_close(layer(x), y, atol=1e-5, rtol=1e-5)

    sd = {"m.lora_A.weight": layer.lora_A.weight.detach(), "m.lora_B.weight": layer.lora_B.weight.detach()}
    conf = {"r": 4, "lora_alpha": 8.0, "use_rslora": False, "rank_pattern": {}, "alpha_pattern": {}}
    plain, pconf = as_plain_lora(sd, conf, {"m": layer}, prefix="")
    assert plain["m.lora_A.weight"].shape == (8, 48) and plain["m.lora_B.weight"].shape == (32, 8)
    assert (pconf["r"], pconf["lora_alpha"], pconf["init_lora_weights"]) == (8, 16.0, True)
    fresh = LoRALinear(nn.Linear(48, 32), r=8, alpha=16)
    with torch.no_grad():
        fresh.base_layer.weight.copy_(original)
        fresh.base_layer.bias.copy_(layer.base_layer.bias)
        fresh.lora_A.weight.copy_(plain["m.lora_A.weight"])
        fresh.lora_B.weight.copy_(plain["m.lora_B.weight"])
    torch.testing.assert_close(fresh(x), y, atol=1e-5, rtol=1e-5)


def test_rslora_export_keeps_the_scale():
    layer = LoRALinear(nn.Linear(48, 32), r=4, alpha=8, use_rslora=True)
    initialize(layer, "olora")
    sd = {"m.lora_A.weight": layer.lora_A.weight.detach(), "m.lora_B.weight": layer.lora_B.weight.detach()}
    _, pconf = as_plain_lora(sd, {"r": 4, "lora_alpha": 8.0, "use_rslora": True}, {"m": layer}, prefix="")
    assert pconf["lora_alpha"] / pconf["r"] ** 0.5 == pytest.approx(layer.scaling)


def test_quantized_base_is_refused_with_the_config_remedy():
    layer = _layer()
    layer.base_layer.weight = nn.Parameter(torch.zeros(32, 48, dtype=torch.uint8), requires_grad=False)
    with pytest.raises(TypeError, match="lora.init_lora_weights: kaiming"):
        initialize(layer, "pissa")


@pytest.mark.parametrize("family", ["llama", "gpt2"])  # gpt2: Conv1D, weights stored (in, out)
@pytest.mark.parametrize("how", INITS)
def test_a_trained_pissa_olora_model_publishes_an_adapter_for_the_original_base(how, family, tmp_path):
    peft = pytest.importorskip("peft")
    from core.adapter import load_adapter, read_adapter_config, save_adapter
    from core.config import LoraConfig
    from core.lora import inject_lora, merge_and_unload
    from tests.conftest import tiny_llama
    from tests.test_conv1d import tiny_gpt2

    build = {"llama": tiny_llama, "gpt2": tiny_gpt2}[family]
    ids = torch.randint(0, 128, (2, 10), generator=torch.Generator().manual_seed(0))
    model = build()
    with torch.no_grad():
        before = model(ids).logits
    cfg = LoraConfig(r=4, init_lora_weights=how)
    inject_lora(model, cfg)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, before, atol=1e-4, rtol=1e-4)
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert all(
        n.endswith(("lora_A.weight", "lora_B.weight")) for n, p in model.named_parameters() if p.requires_grad
    )
    opt = torch.optim.AdamW(trainable, lr=1e-2)
    model.train()
    for _ in range(3):
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    with torch.no_grad():
        tuned = model(ids).logits
    out = save_adapter(model, tmp_path / "adapter", cfg, base_model="tiny")
    conf = read_adapter_config(out)
    assert (conf["r"], conf["lora_alpha"], conf["init_lora_weights"]) == (8, 16.0, True)

    assert conf["fan_in_fan_out"] == (family == "gpt2")
    ours = build()  # the original base weights, as the merge stage and evaluation load them
    load_adapter(ours, out)
    pm = peft.PeftModel.from_pretrained(build(), str(out)).eval()
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, tuned, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(pm(ids).logits, tuned, atol=1e-4, rtol=1e-4)
        merged = merge_and_unload(ours)
        torch.testing.assert_close(merged(ids).logits, tuned, atol=1e-4, rtol=1e-4)


def test_pissa_with_qlora_is_a_config_error():
    from core.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="init_lora_weights"):
        load_config(overrides=["method=qlora", "lora.init_lora_weights=pissa"])
    with pytest.raises(ConfigError, match="init_lora_weights"):
        load_config(overrides=["lora.init_lora_weights=svd"])
