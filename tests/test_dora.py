"""DoRA (Liu et al. 2024, arXiv:2402.09353) on Llama and GPT-2, LoRA and QLoRA, against PEFT itself."""

import json

import pytest
import torch
from peft import LoraConfig as PeftLoraConfig
from peft import PeftModel, get_peft_model

from core.adapter import adapter_params, load_adapter, save_adapter
from core.config import LoraConfig, QuantConfig
from core.lora import inject_lora, lora_modules, merge_adapters, merge_and_unload, unmerge_adapters
from core.quant import quantize_model
from tests.conftest import tiny_llama
from tests.test_conv1d import tiny_gpt2

FAMILIES = {
    "llama": (tiny_llama, ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"], 256),
    "gpt2": (tiny_gpt2, ["c_attn", "c_proj", "c_fc"], 128),
}


def _ids(vocab):
    return torch.randint(0, vocab, (2, 16), generator=torch.Generator().manual_seed(1))


@torch.no_grad()
def _logits(model, vocab):
    return model(input_ids=_ids(vocab)).logits


def _perturb(model, seed=2):
    """B and m away from their init: a zero B or m = ||W|| makes merge checks pass trivially."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, m in lora_modules(model):
            m.lora_B.weight.copy_(torch.randn(m.lora_B.weight.shape, generator=g) * 0.1)
            m.lora_magnitude_vector.mul_(1 + 0.2 * torch.rand(m.lora_magnitude_vector.shape, generator=g))


@pytest.fixture(params=sorted(FAMILIES))
def family(request):
    return FAMILIES[request.param]


def test_magnitude_init_and_outputs_unchanged(family):
    build, targets, vocab = family
    model = build()
    ref = _logits(model, vocab)
    inject_cfg = LoraConfig(r=4, target_modules=targets, use_dora=True)

    inject_lora(model, inject_cfg)
    for _, m in lora_modules(model):
        w = m.base_weight_dense(torch.float32)  # (out, in)
        assert torch.allclose(m.lora_magnitude_vector, w.norm(dim=1))
        assert m.lora_magnitude_vector.shape == (m.out_features,) and m.lora_magnitude_vector.requires_grad
    assert torch.allclose(_logits(model, vocab), ref, atol=1e-5)


def test_four_way_merge_equality(family):

    build, targets, vocab = family
    model = build()
    base = _logits(model, vocab)
    inject_lora(model, LoraConfig(r=4, target_modules=targets, use_dora=True))
    _perturb(model)
    weights = {n: m.base_layer.weight.detach().clone() for n, m in lora_modules(model)}
    adapted = _logits(model, vocab)
    assert not torch.allclose(adapted, base, atol=1e-3)
    merge_adapters(model)
    merged = _logits(model, vocab)
    unmerge_adapters(model)
    for n, m in lora_modules(model):
        assert torch.allclose(m.base_layer.weight, weights[n], atol=1e-5)
    unmerged = _logits(model, vocab)
    merge_and_unload(model)
    unloaded = _logits(model, vocab)
    for t in (merged, unmerged, unloaded):
        assert torch.allclose(t, adapted, atol=1e-4)


def test_grads_only_on_adapter_params(family):

    build, targets, vocab = family
    model = build()
    inject_lora(model, LoraConfig(r=4, target_modules=targets, use_dora=True))
    _perturb(model)
    model.train()
    model(input_ids=_ids(vocab), labels=_ids(vocab)).loss.backward()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {k[len("base_model.model.") :] for k in adapter_params(model)}
    assert any(n.endswith("lora_magnitude_vector") for n in trainable)
    for n, p in model.named_parameters():
        assert (p.grad is not None and p.grad.abs().sum() > 0) if n in trainable else p.grad is None


def test_peft_loads_our_dora_adapter(family, tmp_path):

    build, targets, vocab = family
    model = build()
    cfg = LoraConfig(r=4, target_modules=targets, use_dora=True)
    inject_lora(model, cfg)
    _perturb(model)
    ours = _logits(model, vocab)
    save_adapter(model, tmp_path / "a", cfg, base_model="tiny")
    assert json.loads((tmp_path / "a" / "adapter_config.json").read_text())["use_dora"] is True
    peft_model = PeftModel.from_pretrained(build(), str(tmp_path / "a")).eval()
    assert torch.allclose(_logits(peft_model, vocab), ours, atol=1e-5)


def test_we_load_peft_dora_adapter(family, tmp_path):
    build, targets, vocab = family
    peft_model = get_peft_model(
        build(),
        PeftLoraConfig(
            r=4, lora_alpha=8, target_modules=targets, use_dora=True, fan_in_fan_out=build is tiny_gpt2
        ),
    )
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for n, p in peft_model.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
            if "lora_magnitude_vector" in n:
                p.mul_(1 + 0.2 * torch.rand(p.shape, generator=g))
    peft_model.eval()
    theirs = _logits(peft_model, vocab)
    peft_model.save_pretrained(str(tmp_path / "p"))
    model = build()
    cfg = load_adapter(model, tmp_path / "p")
    assert cfg.use_dora
    assert torch.allclose(_logits(model, vocab), theirs, atol=1e-5)


def test_qlora_dora_trains_and_merges_into_full_precision(family, tmp_path):

    build, targets, vocab = family
    model = build()
    quantize_model(model, QuantConfig())
    cfg = LoraConfig(r=4, target_modules=targets, use_dora=True)
    inject_lora(model, cfg)
    for _, m in lora_modules(model):  # the norm is the dequantized weight's
        assert torch.allclose(
            m.lora_magnitude_vector, m.base_layer.dequantized_weight(torch.float32).norm(dim=1)
        )
    _perturb(model)
    model.train()
    model(input_ids=_ids(vocab), labels=_ids(vocab)).loss.backward()
    for p in model.parameters():
        assert (p.grad is not None) if p.requires_grad else p.grad is None
    model.eval()
    q_logits = _logits(model, vocab)
    save_adapter(model, tmp_path / "a", cfg, base_model="tiny")
    full = build()  # the full-precision base, as core/merge.py reloads it
    load_adapter(full, tmp_path / "a")
    adapted = _logits(full, vocab)
    merge_and_unload(full)
    assert torch.allclose(_logits(full, vocab), adapted, atol=1e-4)
    # NF4 error only (~9% relative per weight, see test_quant.py): the logits stay close
    assert (adapted - q_logits).abs().max() < 0.25 * adapted.abs().max()


def test_gradients_equal_pefts(family, tmp_path):
    """The regrouped forward and the norm from r-sized products give PEFT's loss and gradients on every
    adapter parameter (lora_A, lora_B, the magnitude), with or without biases (GPT-2 has them). Eval mode:
    GPT-2's own dropout would draw differently in the two models; autograd runs all the same."""
    family_build, targets, vocab = family

    def build():  # GPT-2 initialises its biases to zero, which would hide a wrong bias term
        m = family_build()
        g = torch.Generator().manual_seed(3)
        with torch.no_grad():
            for n, p in m.named_parameters():
                if n.endswith(".bias"):
                    p.copy_(torch.randn(p.shape, generator=g) * 0.1)
        return m

    model = build()
    cfg = LoraConfig(r=4, target_modules=targets, use_dora=True)
    inject_lora(model, cfg)
    _perturb(model)
    save_adapter(model, tmp_path / "a", cfg, base_model="tiny")
    theirs = PeftModel.from_pretrained(build(), str(tmp_path / "a"), is_trainable=True)
    ids = _ids(vocab)

    def loss_and_grads(m, prefix):
        m.eval()
        loss = m(input_ids=ids, labels=ids).loss
        loss.backward()
        names = {n: p.grad for n, p in m.named_parameters() if p.requires_grad}
        return loss.item(), {
            n.removeprefix(prefix).replace(".default", "").replace("_vector.weight", "_vector"): g
            for n, g in names.items()
        }

    l_ours, g_ours = loss_and_grads(model, "")
    l_theirs, g_theirs = loss_and_grads(theirs, "base_model.model.")
    assert abs(l_ours - l_theirs) < 1e-5
    assert sorted(g_ours) == sorted(g_theirs) and len(g_ours) == 3 * len(list(lora_modules(model)))
    for n, g in g_ours.items():
        torch.testing.assert_close(g, g_theirs[n], atol=1e-6, rtol=1e-4, msg=n)
