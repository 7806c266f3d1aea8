"""LoRALinear maths against a hand-written reference, merge/unmerge, injection rules, freezing, counts."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from transformers import LlamaForCausalLM

from core.config import LoraConfig
from core.lora import (
    LoRALinear,
    disable_adapters,
    inject_lora,
    lora_modules,
    merge_adapters,
    merge_and_unload,
    unmerge_adapters,
)
from core.targets import find_targets
from tests.conftest import tiny_llama

ATTN = ["q_proj", "k_proj", "v_proj", "o_proj"]
MLP = ["gate_proj", "up_proj", "down_proj"]


@pytest.fixture
def model() -> LlamaForCausalLM:
    return tiny_llama()


@pytest.fixture
def ids() -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, 256, (2, 10), generator=g)  # (B, T)


def logits(m: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return m(input_ids=ids).logits


def perturb_b(m: nn.Module, seed: int = 2, std: float = 0.1) -> None:
    """Give every lora_B real values: with B = 0 every merge test passes trivially."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, mod in lora_modules(m):
            w = mod.lora_B.weight
            w.copy_(torch.randn(w.shape, generator=g) * std)


def linear_shapes(m: nn.Module) -> dict[str, tuple[int, int]]:
    """(out, in) of every nn.Linear, read from the weight tensors (independent of in/out_features)."""
    return {n: tuple(mod.weight.shape) for n, mod in m.named_modules() if type(mod) is nn.Linear}


# --- the whole model ------------------------------------------------------------------------------


def test_fresh_adapter_leaves_logits_unchanged(model, ids):
    base = logits(model, ids)
    inject_lora(model, LoraConfig(r=8, target_modules="all-linear"))
    assert torch.equal(logits(model, ids), base)


def test_merge_unmerge_merge_and_unload_agree(model, ids):
    base = logits(model, ids)
    inject_lora(model, LoraConfig(r=8))
    perturb_b(model)
    adapted = logits(model, ids)
    # the adapter must matter, or the equalities below prove nothing
    assert (adapted - base).abs().max() > 0.05

    merge_adapters(model)
    assert all(m.merged for _, m in lora_modules(model))
    merged = logits(model, ids)
    torch.testing.assert_close(merged, adapted, atol=1e-5, rtol=0)

    unmerge_adapters(model)
    assert not any(m.merged for _, m in lora_modules(model))
    torch.testing.assert_close(logits(model, ids), adapted, atol=1e-5, rtol=0)

    out = merge_and_unload(model)
    assert out is model
    torch.testing.assert_close(logits(model, ids), adapted, atol=1e-5, rtol=0)
    assert not any(isinstance(m, LoRALinear) for m in model.modules())
    assert type(model.model.layers[0].self_attn.q_proj) is nn.Linear
    assert type(model.model.layers[1].mlp.down_proj) is nn.Linear
    assert not any("lora_" in n for n, _ in model.named_parameters())


def test_merge_and_unmerge_twice_are_noops(model):
    inject_lora(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    perturb_b(model)
    weights = {n: m.base_layer.weight for n, m in lora_modules(model)}
    original = {n: w.clone() for n, w in weights.items()}

    merge_adapters(model)
    after_one = {n: w.clone() for n, w in weights.items()}
    assert all(not torch.equal(after_one[n], original[n]) for n in weights)  # the merge did something
    merge_adapters(model)
    assert all(torch.equal(weights[n], after_one[n]) for n in weights)

    unmerge_adapters(model)
    after_unmerge = {n: w.clone() for n, w in weights.items()}
    for n in weights:
        torch.testing.assert_close(after_unmerge[n], original[n], atol=1e-6, rtol=0)
    unmerge_adapters(model)
    assert all(torch.equal(weights[n], after_unmerge[n]) for n in weights)


def test_merge_refuses_non_finite(model):
    inject_lora(model, LoraConfig(r=4, target_modules=["q_proj"]))
    perturb_b(model)
    name, mod = next(lora_modules(model))
    with torch.no_grad():
        mod.lora_B.weight[0, 0] = float("inf")
    before = mod.base_layer.weight.clone()
    with pytest.raises(ValueError, match="non-finite"):
        mod.merge()
    assert torch.equal(mod.base_layer.weight, before)
    assert mod.merged is False
    with pytest.raises(ValueError, match="non-finite"):
        merge_and_unload(model)
    assert isinstance(model.get_submodule(name), LoRALinear)  # nothing was unloaded


def test_disable_adapters_gives_base_and_restores(model, ids):
    base = logits(model, ids)
    inject_lora(model, LoraConfig(r=8))
    perturb_b(model)
    adapted = logits(model, ids)
    assert (adapted - base).abs().max() > 0.05
    with disable_adapters(model):
        assert torch.equal(logits(model, ids), base)
    assert torch.equal(logits(model, ids), adapted)
    # restored even when the body raises
    with pytest.raises(KeyError), disable_adapters(model):
        raise KeyError("boom")
    assert torch.equal(logits(model, ids), adapted)


def test_disable_refuses_when_merged(model):
    inject_lora(model, LoraConfig(r=4))
    merge_adapters(model)
    with pytest.raises(RuntimeError, match="unmerge"), disable_adapters(model):
        pass


def test_dropout_train_vs_eval(model, ids):
    inject_lora(model, LoraConfig(r=8, dropout=0.3))
    perturb_b(model)
    torch.manual_seed(3)
    model.eval()
    e1, e2 = logits(model, ids), logits(model, ids)
    assert torch.equal(e1, e2)
    model.train()
    t1, t2 = logits(model, ids), logits(model, ids)
    assert (t1 - t2).abs().max() > 1e-3
    assert (t1 - e1).abs().max() > 1e-3


# --- a single LoRALinear vs the formula -----------------------------------------------------------


def reference(x, w, b, a_w, b_w, scaling):
    """The LoRA forward written out by hand: x @ Wᵀ + b + s·(x @ Aᵀ) @ Bᵀ."""
    out = x @ w.T + (b if b is not None else 0.0)
    return out + scaling * (x @ a_w.T) @ b_w.T


def make_layer(*, bias: bool, r: int = 4, alpha: float = 8.0, rslora: bool = False) -> LoRALinear:
    torch.manual_seed(5)
    base = nn.Linear(32, 48, bias=bias)
    layer = LoRALinear(base, r=r, alpha=alpha, use_rslora=rslora)
    with torch.no_grad():
        layer.lora_B.weight.normal_(0, 0.1)
    base.requires_grad_(False)
    return layer


@pytest.mark.parametrize("rslora", [False, True], ids=["alpha/r", "rslora"])
@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("shape", [(6, 32), (2, 5, 32)], ids=["2d", "3d"])
def test_layer_matches_reference(rslora, bias, shape):
    r, alpha = 4, 8.0
    layer = make_layer(bias=bias, r=r, alpha=alpha, rslora=rslora)
    expected_scaling = alpha / math.sqrt(r) if rslora else alpha / r
    assert layer.scaling == pytest.approx(expected_scaling)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(6))
    w, b = layer.base_layer.weight, layer.base_layer.bias
    a_w, b_w = layer.lora_A.weight, layer.lora_B.weight

    y = layer(x)
    y_ref = reference(x, w, b, a_w, b_w, expected_scaling)
    assert y.shape == (*shape[:-1], 48)
    torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=1e-5)
    # the adapter term is large enough that a wrong scale would fail the check above
    delta = (y_ref - reference(x, w, b, a_w, b_w, 0.0)).abs().max()
    assert delta > 0.05
    assert (y - reference(x, w, b, a_w, b_w, 1.0)).abs().max() > 1e-2 or expected_scaling == 1.0

    # gradients of A and B (and x) through the fused in-place path vs autograd of the reference
    g = torch.randn(y.shape, generator=torch.Generator().manual_seed(7))
    xr = x.clone().requires_grad_(True)
    xl = x.clone().requires_grad_(True)
    ga, gb, gx = torch.autograd.grad((layer(xl) * g).sum(), [a_w, b_w, xl])
    a_ref = a_w.detach().clone().requires_grad_(True)
    b_ref = b_w.detach().clone().requires_grad_(True)
    ra, rb, rx = torch.autograd.grad(
        (reference(xr, w, b, a_ref, b_ref, expected_scaling) * g).sum(), [a_ref, b_ref, xr]
    )
    torch.testing.assert_close(ga, ra, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(gb, rb, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(gx, rx, atol=1e-5, rtol=1e-5)
    assert ga.abs().max() > 0 and gb.abs().max() > 0


def test_fresh_layer_is_identity_and_uses_kaiming_a():
    torch.manual_seed(0)
    base = nn.Linear(32, 64)
    layer = LoRALinear(base, r=8, alpha=16)
    x = torch.randn(3, 32)
    assert torch.equal(layer.lora_B.weight, torch.zeros(64, 8))
    assert layer.lora_A.weight.abs().max() > 0
    assert layer.lora_A.weight.shape == (8, 32)  # A: r × in
    assert layer.lora_B.weight.shape == (64, 8)  # B: out × r
    assert torch.equal(layer(x), base(x))


def test_layer_rejects_nonpositive_rank():
    with pytest.raises(ValueError, match="r=0"):
        LoRALinear(nn.Linear(8, 8), r=0, alpha=1)


def test_delta_weight_is_scaled_ba():
    layer = make_layer(bias=False, r=4, alpha=12.0)
    expected = 3.0 * layer.lora_B.weight @ layer.lora_A.weight
    torch.testing.assert_close(layer.delta_weight(), expected)
    w0 = layer.base_layer.weight.clone()
    layer.merge()
    torch.testing.assert_close(layer.base_layer.weight, w0 + expected)


# --- freezing and gradients -----------------------------------------------------------------------


def test_only_lora_params_train(model, ids):
    inject_lora(model, LoraConfig(r=4, target_modules="all-linear"))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable
    assert all("lora_A" in n or "lora_B" in n for n in trainable)
    assert len(trainable) == 2 * 7 * 2  # 7 linears per layer × 2 layers × (A, B)

    perturb_b(model)  # with B = 0 the gradient of A is exactly zero
    model.train()
    model(input_ids=ids, labels=ids).loss.backward()
    for n, p in model.named_parameters():
        if "lora_" in n:
            assert p.grad is not None and p.grad.abs().max() > 0, n
        else:
            assert p.grad is None, n


def test_modules_to_save_trainable(model, ids):
    inject_lora(model, LoraConfig(r=4, target_modules=["q_proj"], modules_to_save=["lm_head"]))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert "lm_head.weight" in trainable
    assert "model.embed_tokens.weight" not in trainable
    assert {n for n in trainable if "lora_" not in n} == {"lm_head.weight"}
    model(input_ids=ids, labels=ids).loss.backward()
    assert model.lm_head.weight.grad is not None
    assert model.model.embed_tokens.weight.grad is None


def test_modules_to_save_unknown_name_raises(model):
    with pytest.raises(ValueError, match="lm_haed"):
        inject_lora(model, LoraConfig(r=4, modules_to_save=["lm_haed"]))


# --- parameter counts -----------------------------------------------------------------------------


def test_trainable_count_is_r_times_d_plus_k(model):
    shapes = linear_shapes(model)
    total_before = sum(p.numel() for p in model.parameters())
    report = inject_lora(model, LoraConfig(r=8, target_modules=["q_proj", "v_proj", "down_proj"]))
    chosen = [n for n in shapes if n.rsplit(".", 1)[-1] in ("q_proj", "v_proj", "down_proj")]
    # A is r×k, B is d×r: r·(d+k) per adapted d×k matrix (not 2·r·(d+k))
    expected = sum(8 * (d + k) for d, k in (shapes[n] for n in chosen))
    # by hand for this model: q 64×64, v 32×64 (2 kv heads × 16), down 64×128; two layers
    assert expected == 2 * 8 * ((64 + 64) + (32 + 64) + (64 + 128))
    assert report.lora_params == expected
    assert report.trainable == expected
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == expected
    assert report.total == total_before + expected
    assert sorted(report.targets) == sorted(chosen)


def test_trainable_count_article_example():
    # the article's example: r = 8 on a 4096×4096 matrix -> 65,536 (meta device: no memory used)
    with torch.device("meta"):
        m = nn.Sequential(nn.Linear(4096, 4096, bias=False))
    report = inject_lora(m, LoraConfig(r=8, target_modules=["0"]))
    assert report.lora_params == 65_536


def test_rank_pattern_gives_per_module_rank(model):
    shapes = linear_shapes(model)
    report = inject_lora(model, LoraConfig(r=8, target_modules=ATTN, rank_pattern={"q_proj": 4}))
    expected = 0
    for n, (d, k) in shapes.items():
        leaf = n.rsplit(".", 1)[-1]
        if leaf in ATTN:
            r = 4 if leaf == "q_proj" else 8
            expected += r * (d + k)
            mod = model.get_submodule(n)
            assert mod.r == r
            assert mod.lora_A.weight.shape == (r, k)
            assert mod.lora_B.weight.shape == (d, r)
            assert report.ranks[n] == r
    assert report.lora_params == expected
    assert report.trainable == expected


def test_rank_pattern_regex_alternation(model):
    inject_lora(model, LoraConfig(r=8, target_modules=ATTN, rank_pattern={"q_proj|v_proj": 2}))
    ranks = {n.rsplit(".", 1)[-1]: m.r for n, m in lora_modules(model)}
    assert ranks == {"q_proj": 2, "k_proj": 8, "v_proj": 2, "o_proj": 8}


# --- target selection -----------------------------------------------------------------------------


def _leaves(names):
    return sorted({n.rsplit(".", 1)[-1] for n in names})


def test_targets_by_suffix_list(model):
    names = find_targets(model, ["q_proj", "v_proj"])
    assert len(names) == 4
    assert _leaves(names) == ["q_proj", "v_proj"]


def test_targets_by_exact_full_name(model):
    names = find_targets(model, ["model.layers.1.self_attn.q_proj"])
    assert names == ["model.layers.1.self_attn.q_proj"]
    # a list entry matches a whole path segment only: "proj" is not a suffix of "q_proj" after a dot
    with pytest.raises(ValueError):
        find_targets(model, ["proj"])


def test_targets_by_regex_fullmatch(model):
    names = find_targets(model, r".*\.0\.self_attn\.(q|k)_proj")
    assert names == ["model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.k_proj"]


def test_partial_regex_does_not_match(model):
    with pytest.raises(ValueError, match="selects no module"):
        find_targets(model, "q_proj")  # a string is a regex fullmatch, not a search
    with pytest.raises(ValueError, match="selects no module"):
        find_targets(model, r"model\.layers\.0")


def test_all_linear_excludes_lm_head(model):
    names = find_targets(model, "all-linear")
    expected = [n for n in linear_shapes(model) if n != "lm_head"]
    assert names == expected
    assert len(names) == 14


def test_exclude_modules_list_and_regex(model):
    names = find_targets(
        model, "all-linear", exclude_modules=["down_proj", "model.layers.0.self_attn.o_proj"]
    )
    assert len(names) == 14 - 2 - 1
    assert not any(n.endswith("down_proj") for n in names)
    assert "model.layers.0.self_attn.o_proj" not in names
    assert "model.layers.1.self_attn.o_proj" in names

    names = find_targets(model, ["q_proj", "k_proj"], exclude_modules=r"model\.layers\.1\..*")
    assert names == ["model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.k_proj"]


def test_no_match_names_candidates(model):
    with pytest.raises(ValueError) as exc:
        find_targets(model, ["query_key_value"])
    msg = str(exc.value)
    assert "query_key_value" in msg
    for leaf in ("q_proj", "down_proj"):
        assert leaf in msg
    assert "'lm_head'" not in msg  # the head is no suggestion: no default would adapt it
    with pytest.raises(ValueError, match="q_proj"):
        inject_lora(model, LoraConfig(target_modules=["c_attn"]))
    assert not any(True for _ in lora_modules(model))  # nothing was injected


def test_exclude_everything_raises(model):
    with pytest.raises(ValueError, match="selects no module"):
        find_targets(model, ["q_proj"], exclude_modules=["q_proj"])


def test_inject_twice_raises(model):
    inject_lora(model, LoraConfig(r=4))
    with pytest.raises(ValueError, match="already has LoRA"):
        inject_lora(model, LoraConfig(r=4))
    # no LoRALinear got wrapped inside another
    assert not any(isinstance(m.base_layer, LoRALinear) for _, m in lora_modules(model))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_adapters_on_a_half_precision_base_train_in_fp32(dtype):
    """As PEFT's autocast_adapter_dtype: bf16 rounds small updates away, and GradScaler refuses fp16
    gradients, so the adapter weights stay fp32 while the base computes in half precision."""
    from core.lora import inject_lora, lora_modules
    from tests.conftest import tiny_llama

    model = tiny_llama().to(dtype)
    inject_lora(model, LoraConfig(r=4))
    for _, m in lora_modules(model):
        assert m.lora_A.weight.dtype == m.lora_B.weight.dtype == torch.float32
        assert m.base_layer.weight.dtype == dtype
        m.lora_B.weight.data.normal_(0.0, 0.05)
    ids = torch.randint(0, 256, (2, 8), generator=torch.Generator().manual_seed(0))
    out = model(input_ids=ids, labels=ids)
    assert out.logits.dtype == dtype and torch.isfinite(out.loss)
    out.loss.backward()
    grads = [m.lora_A.weight.grad for _, m in lora_modules(model)]
    assert all(g is not None and g.dtype == torch.float32 and g.abs().sum() > 0 for g in grads)


def test_a_forward_hook_on_the_base_sees_the_base_output_it_kept():
    layer = make_layer(bias=True, r=4, alpha=8.0, rslora=False)
    kept: list[torch.Tensor] = []
    layer.base_layer.register_forward_hook(lambda mod, inp, out: kept.append(out))
    x = torch.randn(3, 32)
    y = layer(x)
    base = layer.base_layer.weight, layer.base_layer.bias
    torch.testing.assert_close(kept[0], x @ base[0].t() + base[1])  # not overwritten by the adapter add
    assert not torch.allclose(y, kept[0])


def test_merging_into_a_tied_head_leaves_the_embeddings_alone(tmp_path):
    """lm_head tied to embed_tokens (Llama-3.2, Qwen2.5, Gemma) and adapted: the merge must not move
    the input embeddings, and the saved model must not tie the merged head back to them."""
    from transformers import AutoModelForCausalLM

    from core.lora import inject_lora, lora_modules, merge_and_unload
    from tests.conftest import tiny_llama

    model = tiny_llama(tie_word_embeddings=True)
    embed_before = model.model.embed_tokens.weight.detach().clone()
    inject_lora(model, LoraConfig(r=4, target_modules=["lm_head", "q_proj"]))
    for _, m in lora_modules(model):
        m.lora_B.weight.data.normal_(0.0, 0.1, generator=torch.Generator().manual_seed(3))
    ids = torch.randint(0, 256, (2, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = model(input_ids=ids).logits
        merge_and_unload(model)
        got = model(input_ids=ids).logits
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert torch.equal(model.model.embed_tokens.weight, embed_before)
    model.save_pretrained(tmp_path / "m")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "m").eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, want, atol=1e-5, rtol=1e-5)
