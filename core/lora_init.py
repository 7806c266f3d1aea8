"""PiSSA and OLoRA initialisation of LoRA layers, and their export as a plain LoRA adapter.

initialize(layer, "pissa")          # A, B from W's top-r singular triplets; W <- W - s·B·A: outputs unchanged
initialize(layer, "pissa_niter_4")  # the same with torch.svd_lowrank (4 subspace iterations): fast on 4096²
initialize(layer, "olora")          # A, B from W = Q·R (first r columns of Q, rows of R)
sd, conf = as_plain_lora(sd, conf, layers)   # ΔW = s·(B·A - B0·A0) as a rank-2r LoRA on the original W

PiSSA: Meng et al. 2024, arXiv:2404.02948; OLoRA: Büyükakyüz 2024, arXiv:2406.01775. Both move the
principal part of W into the trainable factors, so the base a PiSSA/OLoRA adapter runs on is the residual
W_res = W - s·B0·A0, not the model's W. The published adapter and the merged model must not depend on
W_res: :func:`as_plain_lora` rewrites the trained (A, B) and the initial (A0, B0) as one LoRA of rank 2r,
[A; A0] and [B, -B0], that applies to the original W, which is what PEFT's
``save_pretrained(path_initial_model_for_weight_conversion=...)`` writes (peft/peft_model.py), so
the merge stage, the evaluation and ``PeftModel.from_pretrained`` all load it on the unmodified base.
"""

from __future__ import annotations

import math
import re
from typing import Any

import torch
from torch import nn

from core.targets import is_conv1d

KAIMING = "kaiming"  # A Kaiming-uniform, B = 0 (loralib, PEFT's init_lora_weights=True)
_NITER = re.compile(r"pissa_niter_(\d+)")


def _dense(base: nn.Module) -> torch.Tensor:
    w = base.weight
    if not w.dtype.is_floating_point:
        raise TypeError(
            f"PiSSA/OLoRA need a full-precision base weight ({type(base).__name__} holds {w.dtype}): "
            "set lora.init_lora_weights: kaiming for method qlora"
        )
    return w.t() if is_conv1d(base) else w  # (out, in); Conv1D stores (in, out)


@torch.no_grad()
def initialize(layer: nn.Module, how: str) -> None:
    """Set ``layer.lora_A``/``lora_B`` by PiSSA or OLoRA and subtract s·B·A from its base weight.

    The initial factors stay on the layer as buffers ``lora_A0``/``lora_B0`` (not saved in the
    state dict: a resumed run initializes again from the same base weights and gets the same ones), for
    :func:`as_plain_lora`.

    Args:
        layer: a ``core.lora.LoRALinear`` (attributes ``base_layer``, ``lora_A``, ``lora_B``, ``r``,
            ``scaling``).
        how: ``pissa``, ``pissa_niter_<n>`` or ``olora``.
    """
    base, r, s = layer.base_layer, layer.r, layer.scaling
    w = _dense(base)
    w32 = w.to(torch.float32)  # (out, in)
    if how == "olora":
        q, rr = torch.linalg.qr(w32)  # (out, k) (k, in), k = min(out, in)
        b, a = q[:, :r], rr[:r]  # (out, r), (r, in)
    elif how == "pissa" or _NITER.fullmatch(how):
        if how == "pissa":
            u, sv, vh = torch.linalg.svd(w32, full_matrices=False)  # (out, k) (k,) (k, in)
            u, sv, vh = u[:, :r], sv[:r], vh[:r]
        else:  # Halko et al. 2011 randomized SVD, as PEFT's pissa_niter_<n>
            u, sv, v = torch.svd_lowrank(w32, q=r, niter=int(_NITER.fullmatch(how).group(1)))
            vh = v.t()
        root = torch.sqrt(sv / s)  # s·B·A = U_r·S_r·V_rᵀ, the factors split evenly
        a, b = root[:, None] * vh, u * root[None, :]  # (r, in), (out, r)
    else:
        raise ValueError(
            f"lora.init_lora_weights={how!r}: expected {KAIMING}, pissa, pissa_niter_<n> or olora"
        )
    layer.lora_A.weight.copy_(a.to(layer.lora_A.weight.dtype))
    layer.lora_B.weight.copy_(b.to(layer.lora_B.weight.dtype))
    # The residual from the factors as they are stored (their dtype), so base + s·B·A is W to rounding.
    delta = (layer.lora_B.weight.to(torch.float32) @ layer.lora_A.weight.to(torch.float32)) * s
    residual = (w32 - delta).to(w.dtype)
    base.weight.data.copy_(residual.t() if is_conv1d(base) else residual)
    layer.register_buffer("lora_A0", layer.lora_A.weight.detach().clone(), persistent=False)
    layer.register_buffer("lora_B0", layer.lora_B.weight.detach().clone(), persistent=False)


def initial_factors(layer: nn.Module) -> tuple[torch.Tensor, torch.Tensor] | None:
    a0, b0 = getattr(layer, "lora_A0", None), getattr(layer, "lora_B0", None)
    return None if a0 is None else (a0, b0)


def as_plain_lora(
    sd: dict[str, torch.Tensor], conf: dict[str, Any], layers: dict[str, nn.Module], prefix: str
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The adapter of PiSSA/OLoRA-initialised ``layers`` as a plain LoRA on the original base weights.

    ΔW = s·(B·A - B0·A0) = s·[B, -B0]·[A; A0]: rank 2r, so alpha doubles too (×√2 under rsLoRA) to keep
    s, as PEFT's conversion does. Layers without initial factors keep their tensors.

    Args:
        sd: adapter tensors under PEFT keys (``<prefix><module>.lora_A.weight``).
        conf: the adapter_config.json dict; a converted copy is returned.
        layers: module path -> LoRA layer.
    """
    out = dict(sd)
    for name, layer in layers.items():
        init = initial_factors(layer)
        if init is None:
            continue
        a0, b0 = (t.detach().to("cpu") for t in init)
        ka, kb = f"{prefix}{name}.lora_A.weight", f"{prefix}{name}.lora_B.weight"
        out[ka] = torch.cat([sd[ka], a0.to(sd[ka].dtype)], dim=0).contiguous()  # (2r, in)
        out[kb] = torch.cat([sd[kb], -b0.to(sd[kb].dtype)], dim=1).contiguous()  # (out, 2r)
    conf = dict(conf)
    grow = math.sqrt(2.0) if conf.get("use_rslora") else 2.0
    conf["r"] = 2 * conf["r"]
    conf["lora_alpha"] = conf["lora_alpha"] * grow
    conf["rank_pattern"] = {k: 2 * v for k, v in (conf.get("rank_pattern") or {}).items()}
    conf["alpha_pattern"] = {k: v * grow for k, v in (conf.get("alpha_pattern") or {}).items()}
    conf["init_lora_weights"] = True
    return out, conf
