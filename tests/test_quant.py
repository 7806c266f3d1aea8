"""core.quant: NF4 quantization with bitsandbytes on CPU (not mocked) and exact QLoRA adapter gradients.

.venv/bin/python -m pytest tests/test_quant.py -q
"""

from __future__ import annotations

import copy
import sys

import pytest
import torch
from torch import nn
from transformers import LlamaForCausalLM

from core.config import LoraConfig, QuantConfig
from core.lora import LoRALinear, inject_lora, lora_modules
from core.quant import dequantize_linear4bit, is_4bit_linear, quantize_model
from tests.conftest import tiny_llama

LINEARS_PER_LAYER = 7  # q k v o gate up down


@pytest.fixture(scope="module")
def base() -> LlamaForCausalLM:
    return tiny_llama(seed=0)  # every size a multiple of 32, as bitsandbytes' CPU kernels want


@pytest.fixture(scope="module")
def batch(base) -> torch.Tensor:
    return torch.randint(0, base.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(1))


def _quantized(base: nn.Module, **kw) -> tuple[nn.Module, object]:
    model = copy.deepcopy(base)
    return model, quantize_model(model, QuantConfig(**kw))


def _dequantized_copy(model: nn.Module) -> nn.Module:
    """The same model with every 4-bit base replaced by an fp32 nn.Linear holding its dequantized weight."""
    ref = copy.deepcopy(model)
    for name, m in list(ref.named_modules()):
        if is_4bit_linear(m):
            lin = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None)
            lin.weight.data.copy_(dequantize_linear4bit(m))
            if m.bias is not None:
                lin.bias.data.copy_(m.bias.data)
            lin.requires_grad_(False)
            parent, _, child = name.rpartition(".")
            setattr(ref.get_submodule(parent), child, lin)
    return ref


def _qlora(base: nn.Module) -> tuple[nn.Module, nn.Module]:
    """A quantized model with LoRA (B perturbed so A gets gradients) and its dequantized fp32 twin."""
    model, _ = _quantized(base)
    for m in model.modules():
        # Tell every layer the CPU has AVX512-BF16, the condition for bitsandbytes' repacking, so the
        # orders below probe the hazard on any CI machine; QLinear4bit must ignore it.
        if is_4bit_linear(m):
            m.support_avx512bf16_for_cpu = True
    torch.manual_seed(2)  # lora_A's Kaiming init
    inject_lora(model, LoraConfig(r=8))
    g = torch.Generator().manual_seed(2)
    for _, m in lora_modules(model):
        m.lora_B.weight.data.normal_(0.0, 0.05, generator=g)  # B = 0 would leave A's gradient at 0
    return model, _dequantized_copy(model)  # built before any eval forward could touch the weights


def _adapter_grads(model: nn.Module, batch: torch.Tensor) -> dict[str, torch.Tensor]:
    model.train()
    model.zero_grad(set_to_none=True)
    model(input_ids=batch, labels=batch).loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if "lora_" in n}


def _eval_no_grad(model, batch):
    model.eval()
    with torch.no_grad():
        model(input_ids=batch)


def _eval_inference_mode(model, batch):
    model.eval()
    with torch.inference_mode():
        model(input_ids=batch)


def _eval_with_grad(model, batch):
    # Eval mode with autograd on: the first layer's input needs no grad, which is enough for
    # bitsandbytes' Linear4bit to repack (its condition is `not training and not x.requires_grad`).
    model.eval()
    model(input_ids=batch, labels=batch).loss.backward()
    model.zero_grad(set_to_none=True)


def _train_step(model, batch):
    _adapter_grads(model, batch)


ORDERS = {
    "a_train_first": [],
    "b_eval_no_grad_first": [_eval_no_grad],
    "c_train_eval_train": [_train_step, _eval_no_grad],
    "d_inference_mode_first": [_eval_inference_mode],
    "e_eval_with_grad_first": [_eval_with_grad],
}

# Both sides run the same fp32 dequantized weights through the same GEMMs: measured bitwise equal
# here (max |diff| 0.0, gradient norm 0.83). 1e-5 relative leaves room for another BLAS's blocking;
# the bug this guards against shows up as 0.4% (order e) to 99% (orders b-d) relative error.
GRAD_RTOL, GRAD_ATOL = 1e-5, 1e-7


@pytest.mark.parametrize("order", list(ORDERS))
def test_adapter_gradients_match_dequantized_reference(base, batch, order):
    model, ref = _qlora(base)
    for call in ORDERS[order]:
        call(model, batch)
    got = _adapter_grads(model, batch)
    want = _adapter_grads(ref, batch)
    assert set(got) == set(want) and len(got) == 2 * LINEARS_PER_LAYER * base.config.num_hidden_layers
    for name, g in got.items():
        assert g.abs().sum() > 0, f"{name}: zero gradient, the check would be vacuous"
        torch.testing.assert_close(
            g, want[name], rtol=GRAD_RTOL, atol=GRAD_ATOL, msg=lambda m, n=name: f"{n}: {m}"
        )
    for _, m in lora_modules(model):  # and the weights were never repacked for bnb's inference kernel
        assert not getattr(m.base_layer.weight.quant_state, "packing_format_for_cpu", False)


def test_quantize_model_replaces_every_linear_but_the_head(base):
    model, report = _quantized(base)
    n = LINEARS_PER_LAYER * base.config.num_hidden_layers
    assert report.num_quantized == n and report.skipped == ["lm_head"]
    linears = {name: m for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    assert sum(is_4bit_linear(m) for m in linears.values()) == n
    assert type(model.lm_head) is nn.Linear and model.lm_head.weight.dtype == torch.float32
    for name in report.quantized:
        w = model.get_submodule(name).weight
        assert w.dtype == torch.uint8 and not w.requires_grad
        assert w.numel() * 2 == base.get_submodule(name).weight.numel()  # two 4-bit codes per byte
    assert not any(p.requires_grad for p in model.parameters())


@pytest.mark.parametrize(
    "quant_type, bound",
    # Gaussian weights (std 0.02 init), blocksize 64. Measured relative Frobenius error per layer:
    # NF4 0.092-0.094, FP4 0.106-0.108. Bounds leave ~25% headroom; a wrong scale or code table
    # (e.g. the CPU kernel's row-straddling blocks, see core/quant.py) gives 0.17-0.39.
    [("nf4", 0.12), ("fp4", 0.135)],
)
def test_dequantized_weights_are_close(base, quant_type, bound):
    model, report = _quantized(base, quant_type=quant_type)
    for name in report.quantized:
        w = base.get_submodule(name).weight
        dq = dequantize_linear4bit(model.get_submodule(name))
        assert dq.shape == w.shape and dq.dtype == torch.float32
        rel = ((dq - w).norm() / w.norm()).item()
        assert 0.0 < rel < bound, f"{name}: relative error {rel:.4f}"


def test_logits_close_to_fp32_and_exact_against_dequantized(base, batch):
    model, _ = _quantized(base)
    ref = _dequantized_copy(model)
    with torch.no_grad():
        fp32, q, dq = (m.eval()(input_ids=batch).logits for m in (base, model, ref))
    rel = ((q - fp32).norm() / fp32.norm()).item()
    # ~9% weight noise compounds over 2 layers of a random-init model: measured rel 0.105-0.12.
    # A broken quantization (wrong scales, transposed weights) lands near or above 1.
    assert 1e-3 < rel < 0.2, rel
    torch.testing.assert_close(q, dq, rtol=1e-5, atol=1e-6)  # the forward computes with exactly these weights


def test_report_bytes(base):
    _, report = _quantized(base)
    numel = sum(base.get_submodule(n).weight.numel() for n in report.quantized)
    assert report.bytes_before == 4 * numel
    assert report.bytes_packed * 8 == report.bytes_before  # 4 bits vs 32 bits, exactly
    # Double quantization: one uint8 absmax per 64 weights, plus per layer a 16-entry fp32 NF4 table,
    # a 256-entry fp32 table for the absmax codes, one fp32 second-level absmax and one fp32 offset.
    per_layer = 16 * 4 + 256 * 4 + 4 + 4
    assert report.bytes_stats == numel // 64 + per_layer * report.num_quantized
    # Tiny layers (2-8K weights) pay that ~1 KiB table each: measured ratio 0.181. For real layer sizes
    # the ratio tends to 1/8 + 1/256 = 0.129 (checked on a 1024x1024 layer below).
    assert 0.125 < report.ratio < 0.2, report.ratio

    big = nn.Sequential(nn.Linear(1024, 1024, bias=False))
    r = quantize_model(big, QuantConfig())
    assert 0.125 < r.ratio < 0.1295, r.ratio
    r = quantize_model(nn.Sequential(nn.Linear(1024, 1024, bias=False)), QuantConfig(double_quant=False))
    assert r.ratio == pytest.approx(1 / 8 + 1 / 64 + 64 / (4 * 1024 * 1024))  # fp32 absmax per 64 weights


def test_qlora_trains_and_base_stays_frozen(base, batch):
    model, _ = _qlora(base)
    packed = {n: m.base_layer.weight.data.clone() for n, m in lora_modules(model)}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    model.train()
    for step in range(6):
        if step == 2:  # an evaluation in the middle of training must not change what training computes
            _eval_no_grad(model, batch)
            model.train()
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.05, losses
    for n, m in lora_modules(model):
        assert torch.equal(m.base_layer.weight.data, packed[n])


def test_bias_skip_and_odd_out_features_in_eval():
    # out_features=40 is not a multiple of 32: bitsandbytes' own eval path would assert (docs/environment.md);
    # QLinear4bit never takes that path.
    torch.manual_seed(3)
    net = nn.Sequential(nn.Linear(64, 40), nn.SiLU(), nn.Linear(40, 64), nn.Linear(64, 64))
    ref = copy.deepcopy(net)
    report = quantize_model(net, QuantConfig(), skip=["1", "2"])  # "1" is the SiLU: not a linear, ignored
    assert report.quantized == ["0", "3"] and report.skipped == ["2"]
    assert is_4bit_linear(net[0]) and type(net[2]) is nn.Linear
    torch.testing.assert_close(net[0].bias, ref[0].bias)
    x = torch.randn(5, 64)
    net.eval()
    with torch.no_grad():
        y = net(x)
    ref[0].weight.data = dequantize_linear4bit(net[0])
    ref[3].weight.data = dequantize_linear4bit(net[3])
    torch.testing.assert_close(y, ref.eval()(x), rtol=1e-5, atol=1e-6)


def test_bf16_compute_dtype_trains_through_the_base():
    torch.manual_seed(4)
    net = nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 32))
    quantize_model(net, QuantConfig(compute_dtype="bfloat16"))
    ref = nn.Sequential(*(nn.Linear(64, 64), nn.Linear(64, 32)))
    for r, q in zip(ref, net, strict=True):
        r.weight.data, r.bias.data = dequantize_linear4bit(q), q.bias.data.clone()
    x = torch.randn(8, 64, requires_grad=True)
    y = net(x)
    assert y.dtype == torch.float32  # computed in bf16, returned in the input's dtype
    y.square().sum().backward()
    x_ref = x.detach().clone().requires_grad_(True)
    ref(x_ref).square().sum().backward()
    # bf16 keeps 8 mantissa bits (~0.4% per rounding) and x, W, the output and grad_output are all
    # rounded: measured rel 4.6e-3. fp32 would agree to 1e-6; a lost base gradient gives ~1.
    assert ((x.grad - x_ref.grad).norm() / x_ref.grad.norm()).item() < 2e-2


def test_blocksize_that_cpu_kernel_mishandles_is_a_clear_error(base):
    with pytest.raises(ValueError) as e:
        quantize_model(copy.deepcopy(base), QuantConfig(blocksize=128))
    msg = str(e.value)
    assert "model.layers.0.self_attn.q_proj (in_features=64)" in msg
    assert "quant.blocksize: 64" in msg and "quant.skip_modules" in msg
    assert "down_proj" not in msg  # in_features=128 is fine


def test_lora_wraps_quantized_base_with_fp32_adapters(base):
    model, _ = _qlora(base)
    m = model.get_submodule("model.layers.0.self_attn.q_proj")
    assert isinstance(m, LoRALinear) and is_4bit_linear(m.base_layer)
    assert m.lora_A.weight.dtype == torch.float32 and m.lora_A.weight.requires_grad


@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
def test_fused_4bit_path_equals_the_module_path(bias):
    """An fp32-compute 4-bit base runs base and adapter in one node (dequantized in forward and again
    in backward); the same layer forced through the module path (a hook on its base) must agree."""
    torch.manual_seed(5)
    net = nn.Sequential(nn.Linear(128, 96, bias=bias))
    quantize_model(net, QuantConfig(compute_dtype="float32"))
    inject_lora(net, LoraConfig(r=8, target_modules=["0"]))
    layer = net[0]
    layer.lora_B.weight.data.normal_(0.0, 0.1)
    x = torch.randn(3, 7, 128)
    assert layer._fusable(x)
    g = torch.randn(3, 7, 96)

    def run() -> list[torch.Tensor]:
        xi = x.clone().requires_grad_(True)
        y = layer(xi)
        grads = torch.autograd.grad((y * g).sum(), [xi, layer.lora_A.weight, layer.lora_B.weight])
        return [y.detach(), *grads]

    fused = run()
    handle = layer.base_layer.register_forward_hook(lambda *a: None)
    try:
        assert not layer._fusable(x)
        module_path = run()
    finally:
        handle.remove()
    for f, m in zip(fused, module_path, strict=True):
        torch.testing.assert_close(f, m, rtol=1e-5, atol=1e-5)  # same maths, another summation order
        assert f.abs().max() > 0
    # the packed weight is all that autograd keeps of the base: no dense (out, in) tensor is saved
    saved: list[torch.Tensor] = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        layer(x.clone().requires_grad_(True))
    assert all(t.shape != (96, 128) for t in saved), [t.shape for t in saved]


def test_bf16_compute_4bit_base_is_not_fused_with_fp32_adapters():
    net = nn.Sequential(nn.Linear(128, 96))
    quantize_model(net, QuantConfig(compute_dtype="bfloat16"))
    inject_lora(net, LoraConfig(r=8, target_modules=["0"]))
    assert not net[0]._fusable(torch.randn(2, 128))


def test_missing_bitsandbytes_says_how_to_install(monkeypatch, base):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # import bitsandbytes -> ImportError
    with pytest.raises(ImportError, match="pip install"):
        quantize_model(copy.deepcopy(base), QuantConfig())


def test_dtype_names_map_through_one_table():
    import core.dtypes
    import core.modeling
    import core.quant

    # one mapping, so config dtype names cannot drift
    assert core.quant.DTYPES is core.modeling.DTYPES is core.dtypes.DTYPES
