"""Adapter files in PEFT's format: ``adapter_config.json`` + ``adapter_model.safetensors``.

Keys read ``base_model.model.<module path>.lora_A.weight`` / ``.lora_B.weight`` (and
``base_model.model.<path>.weight`` for modules_to_save), so ``PeftModel.from_pretrained`` loads them.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from core.config import LoraConfig
from core.errors import DeltatuneError
from core.fsutil import writing_dir
from core.lora import inject_lora, lora_modules, modules_to_save_names, rank_and_alpha
from core.lora_init import as_plain_lora, initial_factors

log = logging.getLogger(__name__)

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PREFIX = "base_model.model."


class AdapterError(DeltatuneError, ValueError):
    """An adapter is incomplete, corrupt, or does not fit the model it is loaded into; the same files
    and model fail the same way again."""

    retryable = False


def adapter_params(model: nn.Module, modules_to_save: list[str] | None = None) -> dict[str, torch.Tensor]:
    """The adapter's live parameters under PEFT key names."""
    out: dict[str, torch.Tensor] = {}
    for name, m in lora_modules(model):
        out[f"{PREFIX}{name}.lora_A.weight"] = m.lora_A.weight
        out[f"{PREFIX}{name}.lora_B.weight"] = m.lora_B.weight
        if m.lora_magnitude_vector is not None:  # DoRA: PEFT's save_pretrained writes it without ".weight"
            out[f"{PREFIX}{name}.lora_magnitude_vector"] = m.lora_magnitude_vector
    for name in modules_to_save_names(model, modules_to_save or []):
        for pname, p in model.get_submodule(name).named_parameters():
            out[f"{PREFIX}{name}.{pname}"] = p
    return out


def adapter_state_dict(model: nn.Module, modules_to_save: list[str] | None = None) -> dict[str, torch.Tensor]:
    """The adapter's tensors under PEFT key names (detached, contiguous, on CPU)."""
    return {k: v.detach().to("cpu").contiguous() for k, v in adapter_params(model, modules_to_save).items()}


def check_adapter_tensors(
    sd: dict[str, torch.Tensor], expected_keys: list[str] | None = None, *, require_trained: bool = True
) -> None:
    """Refuse an adapter that is incomplete or broken before it is written.

    The known failure elsewhere is a 40-byte adapter after a "successful" ZeRO-3 run
    (TRL#4416, PEFT#2892): keys missing or tensors gathered as empty shards.

    Raises:
        AdapterError: a key is missing, a tensor is empty or non-finite, or (``require_trained``)
            every lora_B is all zero, i.e. the adapter is still the identity.
    """
    if not sd:
        raise AdapterError("adapter has no tensors: was LoRA injected into this model?")
    missing = sorted(set(expected_keys or []) - set(sd))
    if missing:
        raise AdapterError(f"adapter is missing {len(missing)} expected tensors, e.g. {missing[:3]}")
    empty = [k for k, v in sd.items() if v.numel() == 0]
    if empty:
        raise AdapterError(
            f"adapter tensors are empty (shape [0]), e.g. {empty[:3]}: under ZeRO-3 gather the parameters "
            "before saving"
        )
    bad = [k for k, v in sd.items() if not torch.isfinite(v).all()]
    if bad:
        raise AdapterError(f"adapter tensors hold inf/nan, e.g. {bad[:3]}; training diverged, lower train.lr")
    b_keys = [k for k in sd if k.endswith("lora_B.weight")]
    if require_trained and b_keys and all(not sd[k].any() for k in b_keys):
        raise AdapterError("every lora_B is all zero: the adapter never trained (no optimizer step applied?)")


def _alpha_pattern(cfg: LoraConfig) -> dict[str, float]:
    # With alpha unset, inject_lora gives a rank_pattern module alpha = 2·(its r), but PEFT (and
    # lora_config_from_peft) would use lora_alpha = 2·cfg.r there: spell those alphas out.
    out = dict(cfg.alpha_pattern)
    if cfg.alpha is None:
        for key, r in cfg.rank_pattern.items():
            out.setdefault(key, 2.0 * r)
    return out


def peft_config_dict(
    cfg: LoraConfig, base_model: str, targets: list[str], *, fan_in_fan_out: bool = False
) -> dict[str, Any]:
    """adapter_config.json in the schema PEFT writes and reads.

    ``fan_in_fan_out``: some adapted base stores its weight (in, out), GPT-2's Conv1D (also when it was
    quantized to 4-bit, see core.quant). PEFT sets it per layer type on load anyway (peft/tuners/lora/
    model.py ``_create_new_module`` warns and forces it for Conv1D), but it writes true for GPT-2.
    """
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "r": cfg.r,
        "lora_alpha": cfg.lora_alpha,
        "lora_dropout": cfg.dropout,
        # The exact adapted module paths: unambiguous for PEFT and for us, whatever rule chose them.
        "target_modules": sorted(targets),
        "exclude_modules": None,
        "use_rslora": cfg.use_rslora,
        "rank_pattern": dict(cfg.rank_pattern),
        "alpha_pattern": _alpha_pattern(cfg),
        "modules_to_save": list(cfg.modules_to_save) or None,
        "bias": "none",
        "fan_in_fan_out": fan_in_fan_out,
        "init_lora_weights": True,
        "inference_mode": True,
        "use_dora": cfg.use_dora,
        "layers_to_transform": None,
        "layers_pattern": None,
    }


def lora_config_from_peft(d: dict[str, Any]) -> LoraConfig:
    """Read a PEFT adapter_config.json back into our LoraConfig (LoRA and DoRA, no trained biases).

    ``fan_in_fan_out`` is accepted either way: the layout follows each layer's type (Conv1D or Linear),
    as PEFT decides it, and lora_A/lora_B are (r, in)/(out, r) in both.
    """
    if d.get("peft_type", "LORA") != "LORA":
        raise AdapterError(f"adapter peft_type is {d.get('peft_type')!r}; only LORA adapters are supported")
    if d.get("bias", "none") != "none":
        raise AdapterError(
            f"adapter trains biases (bias={d.get('bias')!r}), which deltatune does not load; "
            "retrain it with bias 'none'"
        )
    # A field the file leaves out takes PEFT's LoraConfig default (r=8, lora_alpha=8), as PeftModel
    # would read the same file; our own default alpha = 2r applies to configs we write, never here.
    return LoraConfig(
        r=d.get("r", 8),
        alpha=d.get("lora_alpha", 8),
        dropout=d.get("lora_dropout", 0.0),
        target_modules=d["target_modules"],
        exclude_modules=d.get("exclude_modules"),
        use_rslora=d.get("use_rslora", False),
        rank_pattern=d.get("rank_pattern") or {},
        alpha_pattern=d.get("alpha_pattern") or {},
        modules_to_save=d.get("modules_to_save") or [],
        use_dora=bool(d.get("use_dora", False)),
    )


def save_adapter(
    model: nn.Module,
    out_dir: str | Path,
    cfg: LoraConfig,
    *,
    base_model: str,
    state_dict: dict[str, torch.Tensor] | None = None,
    require_trained: bool = True,
) -> Path:
    """Check and write the adapter atomically (a temp dir beside ``out_dir``, then rename).

    Args:
        state_dict: tensors to write; default ``adapter_state_dict(model)``. Pass gathered full
            tensors when the model is sharded (ZeRO-3).
        require_trained: refuse an adapter whose every lora_B is zero.
    """
    out_dir = Path(out_dir)
    targets = [n for n, _ in lora_modules(model)]
    sd = state_dict if state_dict is not None else adapter_state_dict(model, cfg.modules_to_save)
    expected = [f"{PREFIX}{n}.lora_{ab}.weight" for n in targets for ab in "AB"]
    expected += [f"{PREFIX}{n}.lora_magnitude_vector" for n, m in lora_modules(model) if m.use_dora]
    check_adapter_tensors(sd, expected, require_trained=require_trained)
    conf = peft_config_dict(cfg, base_model, targets, fan_in_fan_out=_any_fan_in_fan_out(model))
    # PiSSA/OLoRA: the factors apply to the residual base; publish them as a plain LoRA on the original W.
    sd, conf = (
        as_plain_lora(sd, conf, dict(lora_modules(model)), PREFIX)
        if has_initial_factors(model)
        else (sd, conf)
    )
    with writing_dir(out_dir) as tmp:
        # Tied weights (embed_tokens and lm_head both in modules_to_save) share one storage, which
        # safetensors refuses: every tensor after the first on a storage is written as a copy.
        seen: set[int] = set()
        own = {}
        for k, v in sd.items():
            ptr = v.untyped_storage().data_ptr()
            own[k] = v.detach().clone() if ptr in seen else v.detach().contiguous()
            seen.add(ptr)
        sd = own
        save_file(sd, str(tmp / WEIGHTS_NAME), metadata={"format": "pt"})
        (tmp / CONFIG_NAME).write_text(json.dumps(conf, indent=2))
    log.info("saved adapter: %d tensors to %s", len(sd), out_dir)
    return out_dir


def _any_fan_in_fan_out(model: nn.Module) -> bool:
    """Some adapted base is a Conv1D, or a 4-bit layer quantized from one (``from_conv1d``)."""
    return any(
        m.fan_in_fan_out or getattr(m.base_layer, "from_conv1d", False) for _, m in lora_modules(model)
    )


def has_initial_factors(model: nn.Module) -> bool:
    """Whether the model's adapters were initialised by PiSSA/OLoRA (core/lora_init.py)."""
    return any(initial_factors(m) is not None for _, m in lora_modules(model))


def read_adapter_config(adapter_dir: str | Path) -> dict[str, Any]:
    path = Path(adapter_dir) / CONFIG_NAME
    if not path.is_file():
        raise AdapterError(f"{path} not found: {adapter_dir} is not an adapter directory")
    return json.loads(path.read_text())


def read_adapter_files(adapter_dir: str | Path) -> tuple[LoraConfig, dict[str, torch.Tensor]]:
    """``adapter_config.json`` as a LoraConfig and the tensors of ``adapter_model.safetensors``
    (safetensors only, never a pickle)."""
    adapter_dir = Path(adapter_dir)
    cfg = lora_config_from_peft(read_adapter_config(adapter_dir))
    weights = adapter_dir / WEIGHTS_NAME
    if not weights.is_file():
        raise AdapterError(f"{weights} not found; only safetensors adapters are loaded (no pickle)")
    return cfg, load_file(str(weights))


def load_adapter(model: nn.Module, adapter_dir: str | Path) -> LoraConfig:
    """Inject LoRA as described by ``adapter_dir`` and load its weights (strict: every key must fit).

    Works on adapters written by us or by PEFT. Returns the adapter's LoraConfig.
    """
    cfg, sd = read_adapter_files(adapter_dir)
    existing = dict(lora_modules(model))
    if not existing:
        inject_lora(model, cfg)
    for name, m in existing.items():  # loading into adapters already there: they must be this kind
        if m.merged:
            raise AdapterError(f"{name}: the model's adapters are merged; unmerge_adapters(model) first")
        r, alpha = rank_and_alpha(name, cfg)
        if (m.r, m.lora_alpha, m.use_rslora, m.use_dora) != (r, alpha, cfg.use_rslora, cfg.use_dora):
            raise AdapterError(
                f"{name}: the model's adapter has r={m.r}, alpha={m.lora_alpha:g}, rslora={m.use_rslora}, "
                f"dora={m.use_dora} but {adapter_dir} has r={r}, alpha={alpha:g}, rslora={cfg.use_rslora}, "
                f"dora={cfg.use_dora}; load it into a fresh base model"
            )
    params = adapter_params(model, cfg.modules_to_save)
    missing, unexpected = sorted(set(params) - set(sd)), sorted(set(sd) - set(params))
    if missing or unexpected:
        raise AdapterError(
            f"adapter {adapter_dir} does not fit this model: missing {missing[:3]} unexpected {unexpected[:3]}; "
            "is it for the same base model?"
        )
    with torch.no_grad():
        for key, tensor in sd.items():
            target = params[key]
            if target.shape != tensor.shape:
                raise AdapterError(
                    f"{key}: adapter has shape {tuple(tensor.shape)}, model {tuple(target.shape)}"
                )
            target.copy_(tensor.to(target.dtype))
    return cfg
