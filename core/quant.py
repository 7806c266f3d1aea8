"""4-bit (NF4/FP4) base quantization for QLoRA (Dettmers et al. 2023, arXiv:2305.14314) with bitsandbytes.

report = quantize_model(model, QuantConfig(quant_type="nf4"))   # every linear but the head -> QLinear4bit
w = dequantize_linear4bit(model.model.layers[0].self_attn.q_proj)  # (out, in) fp32, e.g. to merge an adapter
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch
from torch import nn

from core.config import QuantConfig
from core.dtypes import DTYPES
from core.targets import is_conv1d

log = logging.getLogger(__name__)

_INSTALL_HINT = (
    "bitsandbytes is not installed, and method 'qlora' needs it for 4-bit base weights: "
    "`pip install 'bitsandbytes==0.50.2'` (CPU and CUDA wheels on PyPI), or use method 'lora'"
)


def _import_bnb():
    # bitsandbytes' CPU backend logs a warning at import when the optional `kernels` package is absent;
    # that package only speeds up the inference kernel QLinear4bit never calls, so keep the log quiet.
    cpu_log = logging.getLogger("bitsandbytes.backends.cpu.ops")
    level = cpu_log.level
    cpu_log.setLevel(logging.ERROR)
    try:
        import bitsandbytes as bnb
        from bitsandbytes.nn.modules import fix_4bit_weight_quant_state_from_module
    finally:
        cpu_log.setLevel(level)
    return bnb, fix_4bit_weight_quant_state_from_module


try:
    bnb, _fix_quant_state = _import_bnb()
except ImportError as _e:  # core.quant stays importable; quantize_model says how to install
    bnb, _fix_quant_state, _BNB_ERROR = None, None, _e
else:
    _BNB_ERROR = None


def _bnb():
    """bitsandbytes, or an ImportError that says how to install it."""
    try:
        import bitsandbytes
    except ImportError as e:
        raise ImportError(f"{_INSTALL_HINT} ({e})") from e
    if bnb is None:  # installed after this module was imported: start again in a fresh process
        raise ImportError(f"{_INSTALL_HINT} ({_BNB_ERROR})")
    return bitsandbytes


_Linear4bitBase = bnb.nn.Linear4bit if bnb is not None else nn.Linear


class QLinear4bit(_Linear4bitBase):
    """A bitsandbytes ``Linear4bit`` whose forward always takes the differentiable path.

    Why (bitsandbytes 0.50.2, ``bitsandbytes/nn/modules.py`` ``Linear4bit.forward``): on a CPU with
    AVX512-BF16, a forward with ``not self.training and x.requires_grad == False`` (eval mode under
    ``no_grad``/``inference_mode``, or eval mode for a layer whose input needs no grad) calls
    ``functional._convert_weight_packed_for_cpu``, which *mutates the layer in place*: it re-packs
    ``weight.data`` into 32-row tiles, replaces ``quant_state.absmax`` by a transposed bf16 copy,
    drops the double quantization and sets ``quant_state.packing_format_for_cpu = True``. From then
    on ``bnb.matmul_4bit`` (``autograd/_functions.py``) sends every call, training included, to
    ``F.gemv_4bit``, a custom op with no autograd kernel: the base output is computed in bf16 and its
    backward returns no gradient to the input (torch only warns "an autograd kernel was not
    registered"), so the adapters of every earlier layer get wrong gradients, silently with an
    out-of-place adapter add (PEFT's), or an in-place error in our fused LoRALinear. Undoing it is no fix:
    ``_convert_weight_packed_for_cpu_inverse`` keeps the bf16-rounded scales, and without double
    quantization leaves ``absmax`` transposed (measured: 27% relative error in the weights). So the
    conversion must never happen: this forward is ``Linear4bit.forward`` without it. With grad it runs
    ``MatMul4Bit`` (dequantize, linear; its backward dequantizes again and saves only the packed
    weight, so no full-size weight stays alive per layer); without grad ``gemm_4bit`` (dequantize,
    linear). The conversion is also where bitsandbytes asserts ``out_features % 32 == 0``: this layer
    has no such limit.
    """

    def _quant_state(self):
        _fix_quant_state(self)
        return _usable_quant_state(self)

    def dequantized_weight(self, dtype: torch.dtype) -> torch.Tensor:
        """The dense (out, in) weight this layer computes with, as a new ``dtype`` tensor.

        LoRALinear's fused path calls it in forward and again in backward, as ``MatMul4Bit`` does, so
        that no full-size weight stays alive between the two.
        """
        return bnb.functional.dequantize_4bit(self.weight.data, self._quant_state()).to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        qs = self._quant_state()
        dtype = self.compute_dtype or x.dtype
        bias = None if self.bias is None else self.bias.to(dtype)
        out = bnb.matmul_4bit(x.to(dtype), self.weight, quant_state=qs, bias=bias)  # (..., in) -> (..., out)
        return out.to(x.dtype)


def is_4bit_linear(module: nn.Module) -> bool:
    """True for any bitsandbytes ``Linear4bit`` (ours included); False when bitsandbytes is absent."""
    return bnb is not None and isinstance(module, bnb.nn.Linear4bit)


@dataclass
class QuantReport:
    """What quantize_model changed: quantized layers and their weight bytes before and after."""

    quantized: list[str]
    skipped: list[str]
    bytes_before: int  # the original weights at their load dtype (fp32: 4 bytes per weight)
    bytes_packed: int  # the 4-bit codes, two per byte
    bytes_stats: int  # absmax scales, double-quant state and the code tables of every layer
    quant_type: str = "nf4"
    per_layer: dict[str, tuple[int, int]] = field(default_factory=dict)  # name -> (in, out)

    @property
    def num_quantized(self) -> int:
        return len(self.quantized)

    @property
    def bytes_after(self) -> int:
        return self.bytes_packed + self.bytes_stats

    @property
    def ratio(self) -> float:
        return self.bytes_after / self.bytes_before if self.bytes_before else 0.0

    def summary(self) -> str:
        return (
            f"{self.quant_type} on {self.num_quantized} linear layers ({len(self.skipped)} kept): "
            f"{self.bytes_before / 2**20:.2f} MiB -> {self.bytes_after / 2**20:.2f} MiB ({self.ratio:.3f}x)"
        )


def _quant_state_tensors(qs) -> list[torch.Tensor]:
    out = [qs.absmax, qs.code]
    if getattr(qs, "nested", False) and qs.state2 is not None:
        out += [qs.state2.absmax, qs.state2.code]
        if isinstance(qs.offset, torch.Tensor):
            out.append(qs.offset)
    return out


_BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)  # QuantConfig.blocksize's allowed values


def _in_out(m: nn.Module) -> tuple[int, int]:
    """(in_features, out_features) from attributes only (works on the meta device); Conv1D is (nx, nf)."""
    return (int(m.nx), int(m.nf)) if is_conv1d(m) else (int(m.in_features), int(m.out_features))


def _skipped(name: str, skip: list[str]) -> bool:
    return any(name == s or name.endswith("." + s) for s in skip)


def quantizable(model: nn.Module, skip: list[str]) -> tuple[list[tuple[str, nn.Module]], list[str]]:
    """(layers quantize_model turns 4-bit, names it keeps): plain ``nn.Linear`` and GPT-2 ``Conv1D``,
    except the output head and ``skip`` (exact or ``.suffix``). Reads module types only, no weights."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    named, kept = [], []
    for name, m in model.named_modules():
        if type(m) is not nn.Linear and not is_conv1d(m):  # Linear4bit and LoRALinear are left alone
            continue
        if m is head or _skipped(name, skip):
            kept.append(name)
        else:
            named.append((name, m))
    return named, kept


def quantization_problems(model: nn.Module, cfg: QuantConfig, device_type: str) -> list[str]:
    """Why ``quantize_model(model, cfg)`` on ``device_type`` would fail, as messages that say what to
    change in the config; empty when it fits. Reads only module types and in/out sizes, so ``model``
    may live on the meta device (a preflight check before any weight is loaded).
    """
    named, kept = quantizable(model, cfg.skip_modules)
    if not named:
        return [
            f"4-bit quantization finds no linear layer to quantize (kept in full precision: {kept[:8]}); "
            "remove names from quant.skip_modules or use method lora"
        ]
    if device_type != "cpu":
        return []
    # bitsandbytes 0.50.2's CPU dequantize_4bit kernel (backends/cpu/ops.py ->
    # cdequantize_blockwise_cpu_*) works row by row: when in_features is not a multiple of the
    # blocksize, blocks straddle rows and (for in_features % 16 == 0) it reads the wrong scale.
    # Measured: 64x64 at blocksize 128 dequantizes with 17-39% relative error, against 9% for NF4.
    ins = {name: _in_out(m)[0] for name, m in named}
    bad = {name: k for name, k in ins.items() if k % cfg.blocksize != 0}
    if not bad:
        return []
    fits = [b for b in _BLOCKSIZES if all(k % b == 0 for k in ins.values())]
    shown = ", ".join(f"{n} (in_features={k})" for n, k in list(bad.items())[:8]) + (
        " ..." if len(bad) > 8 else ""
    )
    remedies = [f"keep them in full precision with quant.skip_modules: {sorted(bad)}"]
    if fits:
        remedies.insert(0, f"set quant.blocksize: {max(fits)} (divides every in_features)")
    remedies.append("or use method lora")
    return [
        f"{len(bad)} layer(s) cannot be 4-bit quantized on CPU with quant.blocksize={cfg.blocksize}, which must "
        f"divide in_features: {shown}; " + "; ".join(remedies)
    ]


def quantize_model(
    model: nn.Module,
    cfg: QuantConfig,
    *,
    device: torch.device | str | None = None,
    skip: list[str] | None = None,
) -> QuantReport:
    """Replace every ``nn.Linear`` and GPT-2 ``Conv1D`` except the output head by a 4-bit
    :class:`QLinear4bit`, in place. A Conv1D's (in, out) weight is quantized transposed, as (out, in),
    and the layer gets ``from_conv1d = True``, so LoRA on it keeps PEFT's (r, in)/(out, r) factors and
    its adapter (``fan_in_fan_out: true``) loads and merges into the full-precision Conv1D model.

    Each weight becomes a bitsandbytes ``Params4bit`` quantized on ``device`` (default: CPU), with
    blockwise absmax scales (``cfg.blocksize``), optionally double-quantized. Every parameter of the
    model is frozen afterwards (it is the base of QLoRA); the rest of the model moves to ``device``.

    Args:
        model: a causal LM (``get_output_embeddings()`` names the head that stays in full precision).
        cfg: quant_type nf4|fp4, double_quant, compute_dtype, blocksize.
        device: where the quantized model lives; None keeps it on the CPU.
        skip: module names (exact or ``.suffix``) kept in full precision, added to ``cfg.skip_modules``.

    Raises:
        ImportError: bitsandbytes is missing (the message says how to install it).
        ValueError: on CPU, a layer whose in_features is not a multiple of ``cfg.blocksize``
            (every such layer is named, with what to change; see :func:`quantization_problems`).
    """
    _bnb()
    dev = torch.device(device) if device is not None else torch.device("cpu")
    if skip:
        cfg = cfg.model_copy(update={"skip_modules": [*cfg.skip_modules, *skip]})
    problems = quantization_problems(model, cfg, dev.type)
    if problems:
        raise ValueError("; ".join(problems))
    named, skipped = quantizable(model, cfg.skip_modules)

    compute_dtype = DTYPES[cfg.compute_dtype]
    before = packed = stats = 0
    seen: set[int] = set()  # count a storage once, should bitsandbytes ever share code tables
    per_layer: dict[str, tuple[int, int]] = {}
    for name, lin in named:
        conv1d = is_conv1d(lin)
        n_in, n_out = _in_out(lin)
        w = lin.weight.data.t() if conv1d else lin.weight.data  # (out, in)
        before += w.numel() * w.element_size()
        q = QLinear4bit(
            n_in,
            n_out,
            bias=lin.bias is not None,
            compute_dtype=compute_dtype,
            compress_statistics=cfg.double_quant,
            quant_type=cfg.quant_type,
            quant_storage=torch.uint8,
            device="meta",  # no throwaway fp32 init: the weight is replaced right below
        )
        # Params4bit quantizes when moved to a device while bnb_quantized is False (Params4bit.to ->
        # _quantize -> functional.quantize_4bit), the CPU included.
        q.weight = bnb.nn.Params4bit(
            data=w.contiguous(),
            requires_grad=False,
            quant_type=cfg.quant_type,
            compress_statistics=cfg.double_quant,
            blocksize=cfg.blocksize,
            quant_storage=torch.uint8,
            module=q,
        ).to(dev)
        if lin.bias is not None:
            q.bias = nn.Parameter(lin.bias.data.to(dev), requires_grad=False)
        q.from_conv1d = conv1d  # adapter export writes fan_in_fan_out: true (core.adapter)
        q.train(lin.training)
        packed += q.weight.data.untyped_storage().nbytes()
        for t in _quant_state_tensors(q.weight.quant_state):
            key = t.untyped_storage().data_ptr()
            if key not in seen:
                seen.add(key)
                stats += t.untyped_storage().nbytes()
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, q)
        per_layer[name] = (n_in, n_out)

    for m in model.modules():  # the rest follows to the device; .data keeps tied parameters tied
        if is_4bit_linear(m):
            continue
        for p in m.parameters(recurse=False):
            if p.device != dev:
                p.data = p.data.to(dev)
        for bname, b in list(m.named_buffers(recurse=False)):
            if b is not None and b.device != dev:
                m._buffers[bname] = b.to(dev)
    for p in model.parameters():
        p.requires_grad_(False)

    report = QuantReport([n for n, _ in named], skipped, before, packed, stats, cfg.quant_type, per_layer)
    log.info(report.summary())
    return report


def _usable_quant_state(layer: nn.Module):
    """The layer's 4-bit quant_state, refusing one that bitsandbytes' CPU inference path repacked."""
    qs = getattr(layer.weight, "quant_state", None)
    if qs is None:
        raise TypeError(f"{type(layer).__name__} holds no 4-bit quant_state; is it quantized?")
    if getattr(qs, "packing_format_for_cpu", False):  # repacked by plain Linear4bit code elsewhere
        raise RuntimeError(
            "this 4-bit layer was repacked by bitsandbytes' CPU inference path, which loses its exact "
            "scales and has no backward; reload the base model and quantize it with core.quant.quantize_model"
        )
    return qs


def dequantize_linear4bit(layer: nn.Module) -> torch.Tensor:
    """The (out, in) fp32 weight a bitsandbytes 4-bit layer computes with (for merges and checks)."""
    _bnb()
    return bnb.functional.dequantize_4bit(layer.weight.data, _usable_quant_state(layer)).to(torch.float32)


def roundtrip_4bit(w: torch.Tensor, cfg: QuantConfig) -> torch.Tensor:
    """dequant(quant(w)) for an (out, in) weight, quantized as :func:`quantize_model` quantizes it on the
    CPU (``Params4bit._quantize``: ``functional.quantize_4bit`` with the config's quant_type, blocksize and
    double quantization): the weight a QLoRA adapter was trained against, in ``w``'s dtype. The compute
    dtype only sets the precision of the 4-bit layer's matmul, not these values."""
    functional = _bnb().functional
    q, state = functional.quantize_4bit(
        w.contiguous(),
        blocksize=cfg.blocksize,
        compress_statistics=cfg.double_quant,
        quant_type=cfg.quant_type,
        quant_storage=torch.uint8,
    )
    return functional.dequantize_4bit(q, state)  # (out, in), state.dtype == w.dtype


__all__ = [
    "QLinear4bit",
    "QuantReport",
    "dequantize_linear4bit",
    "is_4bit_linear",
    "quantizable",
    "quantization_problems",
    "quantize_model",
    "roundtrip_4bit",
]
