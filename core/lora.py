"""LoRA adapter layers (Hu et al. 2021, arXiv:2106.09685) and their injection into a model.

report = inject_lora(model, LoraConfig(r=8, target_modules="all-linear"))
...train...; merge_and_unload(model)      # W <- W + (alpha/r)·B·A, plain nn.Linear again
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

from core.config import LoraConfig
from core.lora_init import KAIMING, initialize
from core.targets import choose_targets, is_conv1d, matches, pattern_value

log = logging.getLogger(__name__)


def lora_scaling(r: int, alpha: float, use_rslora: bool = False) -> float:
    """s = alpha/r, or alpha/sqrt(r) with rsLoRA (Kalajdzievski 2023, arXiv:2312.03732)."""
    return alpha / math.sqrt(r) if use_rslora else alpha / r


class LoRALinear(nn.Module):
    """A frozen linear layer plus a trainable low-rank update: y = W·x + s·B·A·x.

    ``base_layer`` is an ``nn.Linear``, a bitsandbytes ``Linear4bit`` (itself an ``nn.Linear``
    subclass) or transformers' GPT-2 ``Conv1D``, whose weight is stored (in, out) = (nx, nf) and used as
    y = x @ W + b (PEFT's ``fan_in_fan_out``): A and B keep the (r, in) / (out, r) layout either way. A is Kaiming-uniform and B is zero, so a fresh adapter leaves outputs unchanged;
    s = alpha/r, or alpha/sqrt(r) with rsLoRA (Kalajdzievski 2023, arXiv:2312.03732).
    Sizes come from ``in_features``/``out_features``: ZeRO-3 shards ``weight`` to shape [0].
    """

    def __init__(
        self,
        base_layer: nn.Linear,
        r: int,
        alpha: float,
        dropout: float = 0.0,
        use_rslora: bool = False,
        dtype: torch.dtype | None = None,
        use_dora: bool = False,
    ) -> None:
        super().__init__()
        if r <= 0:
            raise ValueError(f"LoRA rank must be positive, got r={r}")
        self.base_layer = base_layer
        # Conv1D's weight is (in, out): merges add (B·A)ᵀ, and the fused path takes Wᵀ as a view.
        self.fan_in_fan_out = is_conv1d(base_layer)
        if self.fan_in_fan_out:
            self.in_features, self.out_features = int(base_layer.nx), int(base_layer.nf)
        else:
            self.in_features: int = base_layer.in_features
            self.out_features: int = base_layer.out_features
        self.r = r
        self.lora_alpha = float(alpha)
        self.use_rslora = use_rslora
        self.scaling = lora_scaling(r, alpha, use_rslora)
        self.lora_dropout: nn.Module = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        weight = base_layer.weight
        if dtype is None:
            # fp32 adapters on a half-precision or 4-bit (uint8) base, as PEFT's autocast_adapter_dtype:
            # small updates to bf16/fp16 weights round away, and GradScaler refuses fp16 gradients.
            dtype = weight.dtype if weight.dtype in (torch.float32, torch.float64) else torch.float32
        factory = {"device": weight.device if weight.device.type != "meta" else None, "dtype": dtype}
        self.lora_A = nn.Linear(self.in_features, r, bias=False, **factory)  # (r, in)
        self.lora_B = nn.Linear(r, self.out_features, bias=False, **factory)  # (out, r)
        self.merged = False
        self.disabled = False
        self.reset_lora_parameters()
        # DoRA (Liu et al. 2024, arXiv:2402.09353, eq. 5): a trained magnitude m (out,) per output row,
        # initialised to ||W||_2 over in (PEFT's DoraLinearLayer.update_layer), so outputs start unchanged.
        self.use_dora = use_dora
        self.lora_magnitude_vector: nn.Parameter | None = None
        self._dora_merge_norm: torch.Tensor | None = None  # ||W + s·B·A|| at merge, for an exact unmerge
        if use_dora:
            with torch.no_grad():
                norm = torch.linalg.norm(self.base_weight_dense(dtype), dim=1)  # (out, in) -> (out,)
            self.lora_magnitude_vector = nn.Parameter(norm)

    def base_weight_dense(self, dtype: torch.dtype) -> torch.Tensor:
        """The base weight as a dense (out, in) tensor: dequantized for 4-bit, transposed for Conv1D."""
        base = self.base_layer
        if callable(getattr(base, "dequantized_weight", None)):
            return base.dequantized_weight(dtype)
        return self._in_base_layout(base.weight).to(dtype)

    @torch.no_grad()
    def _adapted_row_norm(self, w: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """||W + s·B·A|| per output row (PEFT's get_weight_norm), without forming the (out, in) sum:
        ||W_i||² + 2s·<B_i, (W·Aᵀ)_i> + s²·<B_i, (B·A·Aᵀ)_i>, from an (out, in) @ (in, r) product and
        r x r ones. Each step then reads W twice instead of writing two (out, in) temporaries; detached,
        as the norm is a constant in backward (the paper's sec. 4.3)."""
        s = self.scaling
        wa = w @ a.t()  # (out, in) @ (in, r) -> (out, r)
        bg = b @ (a @ a.t())  # (out, r) @ (r, r) -> (out, r)
        w_sq = torch.linalg.vector_norm(w, dim=1).square()  # (out,)
        sq = w_sq + (2 * s) * (b * wa).sum(1) + (s * s) * (b * bg).sum(1)  # (out,)
        return sq.clamp_min(0).sqrt()

    def reset_lora_parameters(self) -> None:
        # Same init as loralib/PEFT: A ~ Kaiming-uniform(a=sqrt(5)), B = 0, so B·A = 0 at step 0.
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)

    def extra_repr(self) -> str:
        dora = ", dora=True" if self.use_dora else ""
        return f"r={self.r}, alpha={self.lora_alpha:g}, scaling={self.scaling:g}{dora}, merged={self.merged}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a_w, b_w = self.lora_A.weight, self.lora_B.weight
        if self.use_dora and not (self.merged or self.disabled):
            return self._dora_forward(x)
        if not (self.merged or self.disabled) and self._fusable(x):
            base = self.base_layer
            if type(base) is nn.Linear:
                return _LoRALinearFn.apply(x, base.weight, base.bias, a_w, b_w, self.scaling, None)
            if self.fan_in_fan_out:  # Conv1D: (in, out) -> (out, in) as a view, no copy
                return _LoRALinearFn.apply(x, base.weight.t(), base.bias, a_w, b_w, self.scaling, None)
            unpack = partial(base.dequantized_weight, x.dtype)  # a 4-bit base, dequantized on demand
            return _LoRALinearFn.apply(x, None, base.bias, a_w, b_w, self.scaling, unpack)
        out = self.base_layer(x)  # (..., out); called as a module so hooks (ZeRO-3 gathers) run
        if self.merged or self.disabled:
            return out
        if x.dtype != a_w.dtype:
            x = x.to(a_w.dtype)
        x = self.lora_dropout(x)  # nn.Identity at dropout 0: returns x itself, no copy
        # Add out of place when the base output cannot take it in place: another dtype (a bf16 4-bit
        # compute dtype); a view, which autograd forbids modifying when a custom Function made it
        # (bitsandbytes' MatMul4Bit with a bias on 3-D input) and which gains nothing otherwise; or an
        # output a forward hook on the base has seen, and may have kept, as the base's own.
        if (
            out.dtype != b_w.dtype
            or not out.is_contiguous()
            or out._is_view()
            or self.base_layer._forward_hooks
        ):
            return out + (F.linear(F.linear(x, a_w), b_w) * self.scaling).to(out.dtype)
        return _LoRAAddInPlace.apply(out, x, a_w, b_w, self.scaling)

    def _dora_forward(self, x: torch.Tensor) -> torch.Tensor:
        """PEFT's DoraLinearLayer.forward: y = base(x) + (m/||W+sBA|| - 1)·(W·x) + m/||W+sBA||·s·B·A·x.

        Without dropout (or in eval) W·x is the base output less its bias, and the sum regroups as
        m/||W+sBA||·(base(x) + s·B·A·x) + (1 - m/||W+sBA||)·bias: three (..., out) tensors instead of
        six. With dropout W·dropout(x) is computed, as PEFT does (peft/tuners/lora/layer.py, dora.py).
        """
        out = self.base_layer(x)  # (..., out)
        a_w, b_w = self.lora_A.weight, self.lora_B.weight
        dtype = a_w.dtype
        xd = self.lora_dropout(x.to(dtype))
        w = self.base_weight_dense(dtype)  # (out, in)
        scale = self.lora_magnitude_vector / self._adapted_row_norm(w, a_w.detach(), b_w.detach())  # (out,)
        lora = F.linear(F.linear(xd, a_w), b_w)  # (..., in) -> (..., r) -> (..., out), unscaled
        if isinstance(self.lora_dropout, nn.Identity) or not self.training:
            t = torch.add(out.to(dtype), lora, alpha=self.scaling)  # base(x) + s·B·A·x
            bias = self.base_layer.bias
            y = t * scale if bias is None else torch.addcmul((1 - scale) * bias.to(dtype), t, scale)
            return y.to(out.dtype)
        base = F.linear(xd, w)  # (..., out)
        return out + ((scale - 1) * base + scale * (lora * self.scaling)).to(out.dtype)

    def _fusable(self, x: torch.Tensor) -> bool:
        """Base and adapter in one autograd node: a frozen nn.Linear, or a 4-bit base computing in x's
        dtype (``dequantized_weight``, core.quant.QLinear4bit), that nobody hooks, dtypes all equal.

        Anything else (ZeRO-3-partitioned bases, hooks on the base, a trainable base, mixed dtypes such
        as a bf16 4-bit compute dtype under fp32 adapters, dropout) calls ``base_layer`` as a module and
        adds the adapter after it.
        """
        base, w = self.base_layer, self.base_layer.weight
        if type(base) is nn.Linear or self.fan_in_fan_out:
            w_dtype = w.dtype
        elif callable(getattr(base, "dequantized_weight", None)):
            w_dtype = getattr(base, "compute_dtype", None) or x.dtype
        else:
            return False
        return (
            not w.requires_grad
            and (base.bias is None or (not base.bias.requires_grad and base.bias.dtype == x.dtype))
            and not hasattr(w, "ds_id")  # DeepSpeed ZeRO-3 gathers it in the module's hooks
            and not (
                base._forward_hooks
                or base._forward_pre_hooks
                or base._backward_hooks
                or base._backward_pre_hooks
            )
            and not (nn.modules.module._global_forward_hooks or nn.modules.module._global_forward_pre_hooks)
            and isinstance(self.lora_dropout, nn.Identity)
            and x.dtype == w_dtype == self.lora_A.weight.dtype == self.lora_B.weight.dtype
            and not torch.is_autocast_enabled(x.device.type)
        )

    # --- merge ---------------------------------------------------------------------------------
    def delta_weight(self) -> torch.Tensor:
        """s·B·A, the update this adapter adds to W: (out, r) @ (r, in) -> (out, in)."""
        return (self.lora_B.weight @ self.lora_A.weight) * self.scaling

    def _in_base_layout(self, w: torch.Tensor) -> torch.Tensor:
        """An (out, in) tensor in the base weight's layout: transposed for Conv1D's (in, out)."""
        return w.t() if self.fan_in_fan_out else w

    def _base_weight(self) -> torch.Tensor:
        w = self.base_layer.weight
        if not w.dtype.is_floating_point:
            raise TypeError(
                f"cannot merge into a quantized base weight ({type(self.base_layer).__name__}, {w.dtype}): "
                "reload the base model in float16/bfloat16/float32, load the adapter, then merge"
            )
        return w

    def merge(self) -> None:
        """Fold s·B·A into the base weight. Idempotent; refuses to write non-finite weights."""
        if self.merged:
            return
        w = self._base_weight()
        magnitude = self.lora_magnitude_vector.detach() if self.use_dora else None
        new, norm = merged_weight(
            w.data,
            self.lora_A.weight.detach(),
            self.lora_B.weight.detach(),
            self.scaling,
            magnitude=magnitude,
            fan_in_fan_out=self.fan_in_fan_out,
        )
        self._dora_merge_norm = norm
        w.data.copy_(new)
        self.merged = True

    def unmerge(self) -> None:
        """Subtract s·B·A from the base weight again. Idempotent."""
        if not self.merged:
            return
        w = self._base_weight()
        if self.use_dora:  # W = W'/(m/||W + sBA||) - sBA with the norm cached at merge, as PEFT does
            factor = self.lora_magnitude_vector.detach() / self._dora_merge_norm  # (out,)
            dense = self._in_base_layout(w.data).to(factor.dtype)  # (out, in)
            new = self._in_base_layout(dense / factor[:, None] - self.delta_weight().detach()).to(w.dtype)
            if not torch.isfinite(new).all():
                raise ValueError("unmerge would produce non-finite weights, refusing")
            w.data.copy_(new)
            self._dora_merge_norm = None
            self.merged = False
            return
        delta = self.delta_weight()
        new = (w.data.to(delta.dtype) - self._in_base_layout(delta)).to(w.dtype)
        if not torch.isfinite(new).all():
            raise ValueError("unmerge would produce non-finite weights, refusing")
        w.data.copy_(new)
        self.merged = False


def merged_weight(
    w: torch.Tensor,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: float,
    *,
    magnitude: torch.Tensor | None = None,
    fan_in_fan_out: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The merged base weight, in ``w``'s layout and dtype: W + s·B·A, or DoRA's m/||W + s·B·A||·(W + s·B·A).

    The one place the merge maths lives: ``LoRALinear.merge`` and the streaming merge
    (core/merge/sharded.py) both call it, so the two agree bit for bit. The sum is formed in the
    adapter's dtype (fp32 for a half-precision base, as LoRALinear keeps its factors) and rounded to
    ``w.dtype`` once, so a bf16 merge loses no more than one rounding of the merged weight.

    Args:
        w: the base weight as stored: (out, in), or (in, out) for GPT-2's Conv1D (``fan_in_fan_out``).
        lora_A: (r, in). lora_B: (out, r). scaling: alpha/r or alpha/sqrt(r).
        magnitude: DoRA's m (out,), or None for plain LoRA.

    Returns:
        (merged weight like ``w``, DoRA's ||W + s·B·A|| per output row (out,) or None).

    Raises:
        ValueError: the result is not finite (the adapter holds inf/nan).
    """
    delta = (lora_B @ lora_A) * scaling  # (out, r) @ (r, in) -> (out, in)
    dense = (w.t() if fan_in_fan_out else w).to(delta.dtype)  # (out, in)
    v = dense + delta  # (out, in)
    norm = None
    if magnitude is not None:  # PEFT's Linear.merge for DoRA: W' = m/||W + sBA|| · (W + sBA)
        norm = torch.linalg.norm(v, dim=1).detach()  # (out,)
        v = (magnitude / norm)[:, None] * v  # (out,) -> (out, 1) * (out, in)
    new = (v.t() if fan_in_fan_out else v).to(w.dtype)
    if not torch.isfinite(new).all():
        raise ValueError("merge would produce non-finite weights; the adapter holds inf/nan, refusing")
    return new, norm


def _adapter_grads(g2d, x, h_t, b_w, s: float, need_h: bool, need_a: bool, need_b: bool):
    """The adapter's share of a backward, every skinny GEMM as (r, ·) @ (·, ·) (see _LoRAAddInPlace).

    Returns (s·(g @ B)ᵀ of shape (r, N) or None, grad of A (r, in) or None, grad of B (out, r) or None).
    """
    gh_t = grad_a = grad_b = None
    if need_h:
        gh_t = torch.mm(b_w.t(), g2d.t()).mul_(s)  # (r, out) @ (out, N) -> (r, N) = s·(g @ B)ᵀ
        if need_a:
            grad_a = torch.mm(gh_t, x.reshape(-1, x.shape[-1]))  # (r, N) @ (N, in) -> (r, in)
    if need_b:
        grad_b = torch.mm(h_t, g2d).mul_(s).t().contiguous()  # (r, N) @ (N, out) -> (out, r)
    return gh_t, grad_a, grad_b


class _LoRAAddInPlace(torch.autograd.Function):
    """out += s·(x @ Aᵀ) @ Bᵀ in place, with GEMM layouts chosen for the r-sized operands.

    Same maths and saved tensors as autograd of the plain formula (x and the r-sized h, as PEFT saves),
    but: (1) the scale rides on the r-sized product and the add is one ``addmm_`` into the base output,
    with no (..., out) temporaries; (2) the in-place add happens inside the Function, on a 2-D view taken
    with autograd off, so autograd records no view + ``CopySlices`` (which clones the (N, out) gradient
    in backward); (3) every skinny GEMM is written as (r, ·) @ (·, ·): on CPU (MKL, fp32, r=8, N=512,
    out=1408, one thread) ``g @ B`` and ``gᵀ @ h`` took 0.82 ms each here, the same products as
    ``(Bᵀ @ gᵀ)ᵀ`` and ``(hᵀ @ g)ᵀ`` 0.19 ms; an nn.Linear backward (PEFT's lora_B) takes the slow ones.
    A base layer whose backward read its own output would make autograd raise here, never go wrong.
    """

    @staticmethod
    def forward(ctx, out, x, a_w, b_w, scaling):
        x2d = x.reshape(-1, x.shape[-1])  # (N, in), a view when contiguous
        h_t = torch.mm(a_w, x2d.t())  # (r, in) @ (in, N) -> (r, N) = hᵀ
        out.view(-1, out.shape[-1]).addmm_(h_t.t(), b_w.t(), alpha=scaling)  # (N, r) @ (r, out)
        ctx.mark_dirty(out)
        ctx.save_for_backward(x, h_t, a_w, b_w)
        ctx.scaling = scaling
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        x, h_t, a_w, b_w = ctx.saved_tensors
        s = ctx.scaling
        g2d = grad.reshape(-1, grad.shape[-1])  # (N, out)
        need_x, need_a, need_b = ctx.needs_input_grad[1:4]
        gh_t, grad_a, grad_b = _adapter_grads(g2d, x, h_t, b_w, s, need_x or need_a, need_a, need_b)
        grad_x = torch.mm(gh_t.t(), a_w).view(x.shape) if need_x else None  # (N, r) @ (r, in) -> (..., in)
        return grad, grad_x, grad_a, grad_b, None


class _LoRALinearFn(torch.autograd.Function):
    """y = x @ Wᵀ + b + s·(x @ Aᵀ) @ Bᵀ for a frozen W, as :class:`_LoRAAddInPlace` plus the base GEMM.

    One node instead of two: the input gradient is one buffer, ``g @ W`` then ``addmm_`` of the adapter's
    share, instead of two (N, in) tensors summed by autograd. Saves x, hᵀ (r, N) and the weights, as the
    two-node path does. For a packed (4-bit) base, ``w`` is None and ``unpack()`` returns the dense W:
    it runs in forward and again in backward, so only the packed weight stays alive in between (as in
    bitsandbytes' ``MatMul4Bit``), and the adapter add costs no extra node or (N, out) buffer.
    """

    @staticmethod
    def forward(ctx, x, w, bias, a_w, b_w, scaling, unpack):
        dense = w if unpack is None else unpack()  # (out, in)
        x2d = x.reshape(-1, x.shape[-1])  # (N, in)
        out = torch.mm(x2d, dense.t()) if bias is None else torch.addmm(bias, x2d, dense.t())  # (N, out)
        h_t = torch.mm(a_w, x2d.t())  # (r, in) @ (in, N) -> (r, N) = hᵀ
        out.addmm_(h_t.t(), b_w.t(), alpha=scaling)  # += s·(N, r) @ (r, out)
        ctx.save_for_backward(x, h_t, w, a_w, b_w)
        ctx.scaling, ctx.unpack = scaling, unpack
        return out.view(*x.shape[:-1], out.shape[-1])

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        x, h_t, w, a_w, b_w = ctx.saved_tensors
        s = ctx.scaling
        g2d = grad.reshape(-1, grad.shape[-1])  # (N, out)
        need_x, _, _, need_a, need_b = ctx.needs_input_grad[:5]
        gh_t, grad_a, grad_b = _adapter_grads(g2d, x, h_t, b_w, s, need_x or need_a, need_a, need_b)
        grad_x = None
        if need_x:
            dense = w if ctx.unpack is None else ctx.unpack()
            grad_x = torch.mm(g2d, dense).addmm_(gh_t.t(), a_w).view(x.shape)  # g @ W + (N, r) @ (r, in)
        return grad_x, None, None, grad_a, grad_b, None, None


# ----------------------------------------------------------------------------------------------------
# Target selection and injection
# ----------------------------------------------------------------------------------------------------


@dataclass
class InjectionReport:
    """What inject_lora changed: adapted modules, and trainable vs total parameter counts."""

    targets: list[str]
    lora_params: int  # sum of r·(d+k) over adapted d×k matrices
    trainable: int
    total: int
    ranks: dict[str, int] = field(default_factory=dict)
    rule: str = ""  # how the targets were chosen (core.targets.TargetSelection.rule)

    @property
    def trainable_share(self) -> float:
        return self.trainable / self.total if self.total else 0.0

    def summary(self) -> str:
        return (
            f"LoRA on {len(self.targets)} modules: {self.trainable:,} trainable of {self.total:,} parameters "
            f"({100 * self.trainable_share:.3f}%)"
        )


def param_numel(p: torch.Tensor) -> int:
    """Logical element count: ZeRO-3 partitions (``ds_numel``) and bnb 4-bit packing are undone."""
    if hasattr(p, "ds_numel"):
        return int(p.ds_numel)
    qs = getattr(p, "quant_state", None)
    if qs is not None and getattr(qs, "shape", None) is not None:
        return math.prod(qs.shape)
    return p.numel()


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) logical parameter counts."""
    trainable = total = 0
    for p in model.parameters():
        n = param_numel(p)
        total += n
        trainable += n if p.requires_grad else 0
    return trainable, total


def _set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def rank_and_alpha(name: str, cfg: LoraConfig) -> tuple[int, float]:
    """The rank and alpha of module ``name`` under ``cfg`` (rank_pattern/alpha_pattern, then r/alpha)."""
    r = int(pattern_value(name, cfg.rank_pattern) or cfg.r)
    return r, float(pattern_value(name, cfg.alpha_pattern) or (cfg.alpha if cfg.alpha is not None else 2 * r))


def inject_lora(model: nn.Module, cfg: LoraConfig) -> InjectionReport:
    """Wrap every targeted linear in a :class:`LoRALinear` and freeze all but the adapters.

    Modules named in ``cfg.modules_to_save`` stay fully trainable (e.g. embeddings and head when
    tokens were added). Calling it on a model that already has adapters raises.
    """
    if any(True for _ in lora_modules(model)):
        raise ValueError("model already has LoRA adapters; merge_and_unload() it or reload the base model")
    selection = choose_targets(model, cfg)
    targets = selection.names
    ranks: dict[str, int] = {}
    lora_params = 0
    for name in targets:
        base = model.get_submodule(name)
        r, alpha = rank_and_alpha(name, cfg)
        ranks[name] = r
        layer = LoRALinear(base, r, alpha, cfg.dropout, cfg.use_rslora, use_dora=cfg.use_dora)
        _set_submodule(model, name, layer)
        lora_params += r * (layer.in_features + layer.out_features)  # A: r×k, B: d×r
    if cfg.init_lora_weights != KAIMING:  # PiSSA/OLoRA: factors from W, W <- W - s·B·A
        with torch.no_grad():
            for _, m in lora_modules(model):
                initialize(m, cfg.init_lora_weights)
        log.info("LoRA factors initialised by %s; the base weights hold the residual", cfg.init_lora_weights)
    for p in model.parameters():
        p.requires_grad_(False)
    for _, m in lora_modules(model):
        m.lora_A.weight.requires_grad_(True)
        m.lora_B.weight.requires_grad_(True)
        if m.lora_magnitude_vector is not None:  # DoRA's magnitude is trained with the factors
            m.lora_magnitude_vector.requires_grad_(True)
    for name in modules_to_save_names(model, cfg.modules_to_save):
        model.get_submodule(name).requires_grad_(True)
    trainable, total = count_parameters(model)
    report = InjectionReport(targets, lora_params, trainable, total, ranks, selection.rule)
    log.info(report.summary())
    return report


def modules_to_save_names(model: nn.Module, names: list[str]) -> list[str]:
    """Resolve ``modules_to_save`` entries (exact or ``.suffix``) to module paths; unknown names raise."""
    if not names:
        return []
    found = [n for n, _ in model.named_modules() if n and matches(n, names)]
    missing = [t for t in names if not any(n == t or n.endswith("." + t) for n in found)]
    if missing:
        raise ValueError(f"lora.modules_to_save names {missing} match no module in the model")
    return found


def lora_modules(model: nn.Module) -> Iterator[tuple[str, LoRALinear]]:
    for name, m in model.named_modules():
        if isinstance(m, LoRALinear):
            yield name, m


def _untie_adapted_weights(model: nn.Module) -> None:
    """Give every adapted base weight that is shared with another module (an lm_head tied to the input
    embeddings) a storage of its own, and record the untying in the config: merging into a tied weight
    would change the embeddings too, and saving would tie them back."""
    uses: dict[int, int] = {}
    for _, p in model.named_parameters(remove_duplicate=False):
        uses[p.data_ptr()] = uses.get(p.data_ptr(), 0) + 1
    for name, m in lora_modules(model):
        w = m.base_layer.weight
        if uses.get(w.data_ptr(), 0) > 1 and w.dtype.is_floating_point:
            m.base_layer.weight = nn.Parameter(w.detach().clone(), requires_grad=w.requires_grad)
            config = getattr(model, "config", None)
            if getattr(config, "tie_word_embeddings", False):
                config.tie_word_embeddings = False
            log.info("untied %s.weight before merging: it was shared with another module", name)


def merge_adapters(model: nn.Module) -> None:
    _untie_adapted_weights(model)
    for _, m in lora_modules(model):
        m.merge()


def unmerge_adapters(model: nn.Module) -> None:
    for _, m in lora_modules(model):
        m.unmerge()


def merge_and_unload(model: nn.Module) -> nn.Module:
    """Merge every adapter and put the plain base layers back; returns the same model object."""
    _untie_adapted_weights(model)
    for name, m in list(lora_modules(model)):
        m.merge()
        _set_submodule(model, name, m.base_layer)
    return model


@contextmanager
def disable_adapters(model: nn.Module) -> Iterator[nn.Module]:
    """Run the base model alone (adapters bypassed, nothing merged or copied).

    Only the LoRA layers are bypassed: ``modules_to_save`` loaded from an adapter replaced the base
    weights of those modules, so score such a base before loading the adapter (core.evaluate does).
    """
    mods = [m for _, m in lora_modules(model)]
    if any(m.merged for m in mods):
        raise RuntimeError("adapters are merged into the weights; unmerge_adapters(model) before disabling")
    prev = [m.disabled for m in mods]
    for m in mods:
        m.disabled = True
    try:
        yield model
    finally:
        for m, p in zip(mods, prev, strict=True):
            m.disabled = p
