"""Check a run config against its model's architecture before any data is prepared or weights load.

report = preflight(cfg)     # seconds: the model is built from its config on the meta device
report["adapters"]          # the modules LoRA will adapt and the rule that chose them

The model comes from ``config.json`` alone (``AutoModelForCausalLM.from_config`` under
``torch.device("meta")``: shapes, no storage), so a target that matches nothing, a rank pattern that
names no target, a layer 4-bit quantization cannot take or a data.max_seq_len longer than the model's
context fails before prepare and launch, not minutes into the train stage of a 7B model.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

from core.config import RunConfig
from core.errors import DeltatuneError
from core.metrics import metric_fn
from core.targets import TargetError, choose_targets, is_conv1d, model_type, pattern_value

log = logging.getLogger(__name__)


class PreflightError(DeltatuneError, ValueError):
    """The run config does not fit its model; the same config fails the same way again."""

    retryable = False


def model_config(cfg: RunConfig, source: str | None = None) -> Any:
    """The transformers config of ``cfg.model`` (its ``config.json``; no weights are read)."""
    from transformers import AutoConfig

    from core.modeling import resolve_source

    src = source or resolve_source(cfg.model.name_or_path, storage_options=cfg.model.storage_options)
    return AutoConfig.from_pretrained(
        src, revision=cfg.model.revision, trust_remote_code=cfg.model.trust_remote_code
    )


def meta_model(cfg: RunConfig, source: str | None = None) -> nn.Module:
    """The model of ``cfg.model`` with every tensor on the meta device (built from its config only)."""
    from transformers import AutoModelForCausalLM

    config = model_config(cfg, source)
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, trust_remote_code=cfg.model.trust_remote_code)


# Where a transformers config records the positions the model was built for: max_position_embeddings
# (Llama, Qwen2, Mistral, Gemma, Phi-3, ...) or n_positions (GPT-2 style configs, whose attribute_map only
# aliases the first name to it). A config with neither (relative positions, e.g. T5) is not checked.
CONTEXT_KEYS = ("max_position_embeddings", "n_positions")


def context_length(model_config: Any) -> tuple[str, int] | None:
    """The model's context length as ``(config.json key, value)``, or None when its config has none.

    A multimodal config is read through its text config (``get_text_config()``), where the language
    model's positions are.
    """
    if model_config is None:
        return None
    text = model_config.get_text_config() if hasattr(model_config, "get_text_config") else model_config
    values = text.to_dict() if hasattr(text, "to_dict") else dict(vars(text))
    for key in CONTEXT_KEYS:
        value = values.get(key)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return key, value
    return None


def context_problems(cfg: RunConfig, model_config: Any) -> list[str]:
    """data.max_seq_len against the model's context length: one problem (with what to set) or none.

    Rows longer than the positions the model was built for get positions it never saw (learned position
    embeddings, as GPT-2's, fail outright with an index error), so it is a config error, not a warning.
    """
    found = context_length(model_config)
    if found is None or cfg.data.max_seq_len <= found[1]:
        return []
    key, n = found
    return [
        f"data.max_seq_len={cfg.data.max_seq_len} is longer than the model's context length {n} "
        f"({key} in its config.json); set data.max_seq_len to at most {n} (e.g. --set data.max_seq_len={n})"
    ]


def check_context(cfg: RunConfig, source: str | None = None) -> None:
    """The context-length check alone, from ``config.json`` (``deltatune prepare`` builds no model).

    Raises:
        PreflightError: data.max_seq_len is longer than the model's context length.
    """
    config = model_config(cfg, source)
    _refuse(cfg, {"model_type": getattr(config, "model_type", None)}, context_problems(cfg, config))


def _refuse(cfg: RunConfig, report: dict[str, Any], problems: list[str]) -> None:
    if problems:
        raise PreflightError(
            f"run config does not fit model {cfg.model.name_or_path} ({report['model_type']}):\n- "
            + "\n- ".join(problems)
        )


def _in_out(module: nn.Module) -> tuple[int, int]:
    if is_conv1d(module):  # weight (in, out)
        return module.nx, module.nf
    return module.in_features, module.out_features


def check_model(cfg: RunConfig, model: nn.Module, *, device_type: str = "cpu") -> dict[str, Any]:
    """Every check that needs only the model's architecture; returns what the run will adapt.

    Args:
        device_type: where training will run ("cpu" or "cuda"): 4-bit layouts differ by backend.

    Raises:
        PreflightError: every problem found, in one message, each with what to change in the config.
    """
    report: dict[str, Any] = {"model_type": model_type(model), "method": cfg.method}
    problems = context_problems(cfg, getattr(model, "config", None))
    if cfg.method == "full":
        report["trainable_formula"] = sum(p.numel() for p in model.parameters())  # every weight, tied once
        _refuse(cfg, report, problems)
        return report
    lora = cfg.lora
    try:
        sel = choose_targets(model, lora)
    except TargetError as e:
        raise PreflightError("\n- ".join([str(e), *problems])) from None
    modules = {name: model.get_submodule(name) for name in sel.names}
    kinds = sel.kinds
    report["adapters"] = {
        "rule": sel.rule,
        "count": len(sel.names),
        "kinds": kinds,
        "unmatched": sel.unmatched,
    }

    for key in lora.rank_pattern.keys() | lora.alpha_pattern.keys():
        if not any(pattern_value(n, {key: 1}) for n in sel.names):
            problems.append(
                f"lora.rank_pattern/alpha_pattern key {key!r} matches none of the adapted modules "
                f"(they end in {list(kinds)}); use one of those names or a regex over their paths"
            )
    too_big = []
    formula = 0  # trainable parameters: r·(d + k) per adapted (k, d) matrix, + d for a DoRA magnitude
    for name, m in modules.items():
        r = int(pattern_value(name, lora.rank_pattern) or lora.r)
        d_in, d_out = _in_out(m)
        formula += r * (d_in + d_out) + (d_out if lora.use_dora else 0)
        if r > min(d_in, d_out):
            too_big.append(f"{name} (r={r}, in/out={_in_out(m)})")
    if too_big:
        # B·A of rank r cannot exceed min(in, out): the extra rank only costs memory and a smaller
        # effective scale (alpha/r).
        problems.append(
            f"LoRA rank exceeds a layer's smaller dimension on {len(too_big)} module(s), e.g. {too_big[:3]}; "
            "lower lora.r (or that module's lora.rank_pattern entry) to at most min(in, out)"
        )
    if lora.modules_to_save:
        from core.lora import modules_to_save_names

        try:
            saved = modules_to_save_names(model, lora.modules_to_save)
        except ValueError as e:
            problems.append(f"{e}; use module names of this model (e.g. 'lm_head', 'embed_tokens')")
        else:
            formula += sum(p.numel() for n in saved for p in model.get_submodule(n).parameters())
    report["trainable_formula"] = formula
    if cfg.method == "qlora":
        from core.quant import quantization_problems

        problems += quantization_problems(model, cfg.quant, device_type)
    _refuse(cfg, report, problems)
    return report


def preflight(cfg: RunConfig, source: str | None = None) -> dict[str, Any]:
    """:func:`check_model` on :func:`meta_model`, for the device training will use; logs the outcome.

    A user metric (``eval.metric: module:function``) is imported here first, so that one that does not
    resolve fails before training, not at the evaluate stage after it (``core.metrics.MetricError``).
    """
    if cfg.eval.enabled:
        metric_fn(cfg.eval.metric, cfg.eval)
    device_type = "cuda" if torch.cuda.is_available() else "cpu"
    report = check_model(cfg, meta_model(cfg, source), device_type=device_type)
    if "adapters" in report:
        a = report["adapters"]
        log.info("preflight: %s adapts %d modules %s (%s)", cfg.method, a["count"], a["kinds"], a["rule"])
    return report
