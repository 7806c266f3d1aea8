"""LoRA and QLoRA on GPT-2's Conv1D (weight (in, out), PEFT's fan_in_fan_out), against PEFT itself."""

import copy
import json

import pytest
import torch
from peft import LoraConfig as PeftLoraConfig
from peft import PeftModel, get_peft_model
from transformers import GPT2Config, GPT2LMHeadModel
from transformers.pytorch_utils import Conv1D

from core.adapter import adapter_params, load_adapter, save_adapter
from core.config import LoraConfig, QuantConfig
from core.lora import (
    LoRALinear,
    inject_lora,
    lora_modules,
    merge_adapters,
    merge_and_unload,
    unmerge_adapters,
)
from core.quant import QLinear4bit, quantization_problems, quantize_model

TARGETS = ["c_attn", "c_proj", "c_fc"]


def tiny_gpt2(seed: int = 0) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    cfg = GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=128, n_positions=64)
    return GPT2LMHeadModel(cfg).eval()  # lm_head tied to wte


def _ids():
    return torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(1))


@torch.no_grad()
def _logits(model):
    return model(input_ids=_ids()).logits


def _perturb_b(model, seed=2):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, m in lora_modules(model):
            m.lora_B.weight.copy_(torch.randn(m.lora_B.weight.shape, generator=g) * 0.1)


def test_wraps_conv1d_and_outputs_unchanged_at_init():
    model = tiny_gpt2()
    ref = _logits(model)
    inject_lora(model, LoraConfig(r=4, target_modules=TARGETS))
    layer = model.transformer.h[0].attn.c_attn
    assert isinstance(layer, LoRALinear) and isinstance(layer.base_layer, Conv1D) and layer.fan_in_fan_out
    assert (layer.in_features, layer.out_features) == (64, 192)
    assert layer.lora_A.weight.shape == (4, 64) and layer.lora_B.weight.shape == (192, 4)
    assert torch.equal(_logits(model), ref)


def test_merge_unmerge_and_unload_exact():
    model = tiny_gpt2()
    base = _logits(model)
    w0 = model.transformer.h[0].mlp.c_fc.weight.detach().clone()
    inject_lora(model, LoraConfig(r=4, target_modules=TARGETS))
    _perturb_b(model)
    adapted = _logits(model)
    assert not torch.allclose(adapted, base, atol=1e-3)
    merge_adapters(model)
    merged = _logits(model)
    unmerge_adapters(model)
    assert torch.allclose(model.transformer.h[0].mlp.c_fc.base_layer.weight, w0, atol=1e-6)
    assert torch.allclose(_logits(model), adapted, atol=1e-5)
    merge_and_unload(model)
    assert type(model.transformer.h[0].mlp.c_fc) is Conv1D
    unloaded = _logits(model)
    assert torch.allclose(merged, adapted, atol=1e-5) and torch.allclose(unloaded, adapted, atol=1e-5)


def test_unmerge_restores_base_logits():
    model = tiny_gpt2()
    base = _logits(model)
    inject_lora(model, LoraConfig(r=4, target_modules=TARGETS))
    _perturb_b(model)
    merge_adapters(model)
    unmerge_adapters(model)
    for _, m in lora_modules(model):
        m.disabled = True
    assert torch.allclose(_logits(model), base, atol=1e-5)


def test_grads_only_on_adapters():
    model = tiny_gpt2()
    inject_lora(model, LoraConfig(r=4, target_modules=TARGETS))
    _perturb_b(model)
    model.train()
    model(input_ids=_ids(), labels=_ids()).loss.backward()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    assert all(
        p.grad is not None and p.grad.abs().sum() > 0 for n, p in model.named_parameters() if n in trainable
    )
    assert all(p.grad is None for n, p in model.named_parameters() if n not in trainable)


def test_fused_conv1d_backward_matches_unfused():
    torch.manual_seed(0)
    conv = Conv1D(48, 32)  # nf=48, nx=32
    layer = LoRALinear(copy.deepcopy(conv).requires_grad_(False), 4, 8.0)
    torch.nn.init.normal_(layer.lora_B.weight)
    x = torch.randn(3, 5, 32, requires_grad=True)
    y = layer(x)
    ref = conv(x) + layer.scaling * (x @ layer.lora_A.weight.t()) @ layer.lora_B.weight.t()
    assert torch.allclose(y, ref, atol=1e-5)
    g = torch.randn_like(y)
    gx, ga, gb = torch.autograd.grad(y, (x, layer.lora_A.weight, layer.lora_B.weight), g)
    rx, ra, rb = torch.autograd.grad(ref, (x, layer.lora_A.weight, layer.lora_B.weight), g)
    for a, b in ((gx, rx), (ga, ra), (gb, rb)):
        assert torch.allclose(a, b, atol=1e-4)


def test_peft_loads_our_adapter(tmp_path):
    model = tiny_gpt2()
    cfg = LoraConfig(r=4, target_modules=TARGETS)
    inject_lora(model, cfg)
    _perturb_b(model)
    ours = _logits(model)
    save_adapter(model, tmp_path / "a", cfg, base_model="tiny-gpt2")
    conf = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert conf["fan_in_fan_out"] is True
    peft_model = PeftModel.from_pretrained(tiny_gpt2(), str(tmp_path / "a")).eval()
    assert torch.allclose(_logits(peft_model), ours, atol=1e-5)


def test_we_load_peft_gpt2_adapter(tmp_path):
    peft_model = get_peft_model(
        tiny_gpt2(), PeftLoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, fan_in_fan_out=True)
    )
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for n, p in peft_model.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    peft_model.eval()
    theirs = _logits(peft_model)
    peft_model.save_pretrained(str(tmp_path / "p"))
    model = tiny_gpt2()
    cfg = load_adapter(model, tmp_path / "p")
    assert cfg.r == 4
    assert torch.allclose(_logits(model), theirs, atol=1e-5)


# --- QLoRA on Conv1D --------------------------------------------------------------------------------


def test_quantize_conv1d_transposed():
    model = tiny_gpt2()
    w = model.transformer.h[0].mlp.c_fc.weight.detach().clone()  # (in, out) = (64, 256)
    report = quantize_model(model, QuantConfig())
    q = model.transformer.h[0].mlp.c_fc
    assert isinstance(q, QLinear4bit) and q.from_conv1d and (q.in_features, q.out_features) == (64, 256)
    dq = q.dequantized_weight(torch.float32)  # (out, in)
    err = (dq - w.t()).norm() / w.norm()
    assert err < 0.12  # NF4 at blocksize 64: ~9% relative (measured), see test_quant.py
    assert "lm_head" in report.skipped


def test_qlora_gpt2_forward_backward_and_merge_into_full_precision(tmp_path):
    model = tiny_gpt2()
    quantize_model(model, QuantConfig())
    cfg = LoraConfig(r=4, target_modules=TARGETS)
    inject_lora(model, cfg)
    _perturb_b(model)
    model.train()
    model(input_ids=_ids(), labels=_ids()).loss.backward()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == set(n[len("base_model.model.") :] for n in adapter_params(model))
    assert all(p.grad is not None for n, p in model.named_parameters() if n in trainable)
    assert all(p.grad is None for n, p in model.named_parameters() if n not in trainable)
    model.eval()
    q_logits = _logits(model)
    save_adapter(model, tmp_path / "a", cfg, base_model="tiny-gpt2")
    assert json.loads((tmp_path / "a" / "adapter_config.json").read_text())["fan_in_fan_out"] is True
    full = tiny_gpt2()  # the full-precision Conv1D base, as core/merge.py reloads it
    load_adapter(full, tmp_path / "a")
    adapted = _logits(full)
    merge_and_unload(full)
    assert type(full.transformer.h[0].attn.c_attn) is Conv1D
    assert torch.allclose(_logits(full), adapted, atol=1e-5)
    # NF4 error only: the 4-bit adapter forward and the full-precision one differ by little
    assert (adapted - q_logits).abs().max() < 0.25 * adapted.abs().max()


def test_skip_modules_reach_quantize_model():
    model = tiny_gpt2()
    report = quantize_model(model, QuantConfig(skip_modules=["c_fc", "h.1.attn.c_proj"]))
    assert isinstance(model.transformer.h[0].mlp.c_fc, Conv1D)
    assert isinstance(model.transformer.h[1].attn.c_proj, Conv1D)
    assert isinstance(model.transformer.h[0].attn.c_proj, QLinear4bit)
    assert "transformer.h.0.mlp.c_fc" in report.skipped


def test_blocksize_32_on_cpu():
    model = tiny_gpt2()
    w = model.transformer.h[0].attn.c_attn.weight.detach().clone()
    quantize_model(model, QuantConfig(blocksize=32))
    dq = model.transformer.h[0].attn.c_attn.dequantized_weight(torch.float32)
    assert (dq - w.t()).norm() / w.norm() < 0.12  # NF4: ~8.7% at blocksize 32 (measured)


def test_quantization_problems_on_meta_device():
    with torch.device("meta"):
        model = GPT2LMHeadModel(GPT2Config(n_embd=96, n_layer=1, n_head=4, vocab_size=128, n_positions=64))
    assert quantization_problems(model, QuantConfig(blocksize=32), "cpu") == []
    assert quantization_problems(model, QuantConfig(blocksize=128), "cuda") == []
    probs = quantization_problems(model, QuantConfig(blocksize=128), "cpu")
    assert len(probs) == 1
    msg = probs[0]
    # in_features 96 (c_attn, c_fc, attn c_proj) and 384 (mlp c_proj): 32 divides both, 64 does not
    assert (
        "quant.blocksize: 32" in msg and "quant.skip_modules" in msg and "transformer.h.0.attn.c_attn" in msg
    )
    assert "method lora" in msg
    assert (
        quantization_problems(
            model, QuantConfig(blocksize=128, skip_modules=["c_attn", "c_fc", "attn.c_proj"]), "cpu"
        )
        == []
    )
    with pytest.raises(ValueError, match="quant.blocksize: 32"):
        quantize_model(tiny_gpt2_like_96(), QuantConfig(blocksize=128))


def tiny_gpt2_like_96():
    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(n_embd=96, n_layer=1, n_head=4, vocab_size=128, n_positions=64))
