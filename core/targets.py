"""Which modules of a model get adapters: per-family target tables and PEFT's matching rules.

sel = select_targets(model, LoraConfig())   # default "attention-mlp": every attention and MLP projection
sel.names, sel.rule                         # the module paths chosen, and how they were chosen (logged)
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field

from torch import nn

from core.config import ATTENTION, ATTENTION_MLP, LoraConfig

log = logging.getLogger(__name__)

# Every attention projection and every MLP projection, by ``config.model_type``, as PEFT keeps in
# ``peft/utils/constants.py`` (TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING), which lists only the
# attention projections for most families; ours add the MLP, as QLoRA (arXiv:2305.14314, sec. 4) and
# the LoRA-vs-full article recommend. Names are module-path suffixes. Checked against the module trees
# transformers 5 builds from each family's config (tests/test_families.py).
_LLAMA = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
_NEOX = ("query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h")
FAMILY_TARGETS: dict[str, tuple[str, ...]] = {
    **dict.fromkeys(
        (
            "llama",
            "mistral",
            "qwen2",
            "qwen3",
            "gemma",
            "gemma2",
            "gemma3_text",
            "olmo",
            "olmo2",
            "cohere",
            "granite",
            "stablelm",
            "exaone4",
        ),
        _LLAMA,
    ),
    # Mixture-of-experts models: transformers 5 stores the routed experts as 3-D parameters, not linear
    # layers, so only the attention (and a shared expert, where the family has one) can take LoRA.
    "mixtral": ("q_proj", "k_proj", "v_proj", "o_proj"),
    "qwen3_moe": ("q_proj", "k_proj", "v_proj", "o_proj"),
    "qwen2_moe": ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
    "deepseek_v3": (
        "q_a_proj",
        "q_b_proj",
        "kv_a_proj_with_mqa",
        "kv_b_proj",
        "o_proj",
        "gate_proj",
        "up_proj",
        "down_proj",
    ),
    "phi": ("q_proj", "k_proj", "v_proj", "dense", "fc1", "fc2"),
    "phi3": ("qkv_proj", "o_proj", "gate_up_proj", "down_proj"),  # fused q|k|v and gate|up
    "gpt2": ("c_attn", "c_proj", "c_fc"),  # transformers Conv1D: weights stored (in, out)
    "gpt_bigcode": ("c_attn", "c_proj", "c_fc"),
    "starcoder2": ("q_proj", "k_proj", "v_proj", "o_proj", "c_fc", "c_proj"),
    "gpt_neox": _NEOX,
    "falcon": _NEOX,
    "bloom": _NEOX,
    "gptj": ("q_proj", "k_proj", "v_proj", "out_proj", "fc_in", "fc_out"),
    "opt": ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"),
}

# The attention projections alone (``target_modules: attention``, the original LoRA paper's choice and
# the sweep's q,k,v,o variants): each family's entry above less its MLP. GPT-2's c_proj is both the
# attention output and the MLP's down projection, so its attention one is named with its parent.
_QKVO = ("q_proj", "k_proj", "v_proj", "o_proj")
ATTENTION_TARGETS: dict[str, tuple[str, ...]] = {
    **{kind: _QKVO for kind, names in FAMILY_TARGETS.items() if names[:4] == _QKVO},
    "deepseek_v3": ("q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj"),
    "phi": ("q_proj", "k_proj", "v_proj", "dense"),
    "phi3": ("qkv_proj", "o_proj"),
    "gpt2": ("c_attn", "attn.c_proj"),
    "gpt_bigcode": ("c_attn", "attn.c_proj"),
    "gpt_neox": ("query_key_value", "attention.dense"),
    "falcon": ("query_key_value", "self_attention.dense"),
    "bloom": ("query_key_value", "self_attention.dense"),
    "gptj": ("q_proj", "k_proj", "v_proj", "out_proj"),
    "opt": ("q_proj", "k_proj", "v_proj", "out_proj"),
}

ALL_LINEAR = "all-linear"


def _conv1d_type() -> type | None:
    try:  # transformers' GPT-2 style layer: y = x @ W + b with W of shape (in, out)
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # pragma: no cover - transformers is a dependency; core stays importable
        return None
    return Conv1D


_CONV1D = _conv1d_type()


def is_conv1d(module: nn.Module) -> bool:
    return _CONV1D is not None and isinstance(module, _CONV1D)


def is_adaptable(module: nn.Module) -> bool:
    """A layer LoRA can wrap: ``nn.Linear`` (bitsandbytes 4-bit layers included) or transformers' Conv1D."""
    return isinstance(module, nn.Linear) or is_conv1d(module)


def matches(name: str, spec: list[str] | tuple[str, ...] | str) -> bool:
    """PEFT's rule: a list matches a name exactly or as a ``.suffix``; a string is a regex fullmatch."""
    if isinstance(spec, str):
        return re.fullmatch(spec, name) is not None
    return any(name == t or name.endswith("." + t) for t in spec)


def pattern_value(name: str, pattern: dict[str, int] | dict[str, float]) -> int | float | None:
    """The value of the first rank_pattern/alpha_pattern key matching ``name``: PEFT's rule, a regex over
    a path suffix, grouped so that ``"q_proj|v_proj"`` works."""
    for key, value in pattern.items():
        if re.fullmatch(rf"(.*\.)?(?:{key})", name):
            return value
    return None


def output_head_names(model: nn.Module) -> set[str]:
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return {n for n, m in model.named_modules() if head is not None and m is head}


def model_type(model: nn.Module) -> str | None:
    return getattr(getattr(model, "config", None), "model_type", None)


@dataclass
class TargetSelection:
    """The modules chosen for adapters, the rule that chose them, and the listed names that matched nothing."""

    names: list[str]
    rule: str
    unmatched: list[str] = field(default_factory=list)

    @property
    def kinds(self) -> dict[str, int]:
        return count_kinds(self.names)


def count_kinds(names: list[str]) -> dict[str, int]:
    """How many modules of each kind (last path segment: ``q_proj``, ``c_attn``) ``names`` holds."""
    kinds: dict[str, int] = {}
    for name in names:
        kind = name.rsplit(".", 1)[-1]
        kinds[kind] = kinds.get(kind, 0) + 1
    return kinds


class TargetError(ValueError):
    """lora.target_modules / exclude_modules select nothing usable in this model."""


def _candidates(adaptable: list[str], heads: set[str]) -> list[str]:
    return list(dict.fromkeys(n.rsplit(".", 1)[-1] for n in adaptable if n not in heads))


def select_targets(
    model: nn.Module,
    target_modules: list[str] | str = ATTENTION_MLP,
    exclude_modules: list[str] | str | None = None,
    *,
    strict: bool = False,
) -> TargetSelection:
    """Resolve ``lora.target_modules`` on ``model``.

    Args:
        target_modules: ``"attention-mlp"`` (the family's attention and MLP projections from
            :data:`FAMILY_TARGETS`; every linear layer but the head for a family not in the table),
            ``"attention"`` (the attention projections, :data:`ATTENTION_TARGETS`),
            ``"all-linear"`` (every linear layer but the output head), a list (exact paths or
            ``.suffix``) or a regex string (fullmatch on the module path).
        exclude_modules: removed from the selection, same rules.
        strict: a listed name that matches nothing is an error instead of a warning.

    Raises:
        TargetError: nothing selected, or (``strict``) a listed name matched nothing; the message lists the
            module names this model has.
    """
    adaptable = [n for n, m in model.named_modules() if n and is_adaptable(m)]
    heads = output_head_names(model)
    unmatched: list[str] = []
    kind = model_type(model)
    tables = {ATTENTION_MLP: FAMILY_TARGETS, ATTENTION: ATTENTION_TARGETS}
    if target_modules == ATTENTION and kind not in ATTENTION_TARGETS:
        raise TargetError(
            f"lora.target_modules='attention': model_type {kind!r} is not in deltatune's family table, so its "
            f"attention projections are not known. Its linear layers end in {_candidates(adaptable, heads)}: "
            "list the attention ones in lora.target_modules"
        )
    if isinstance(target_modules, str) and target_modules in tables and kind in tables[target_modules]:
        table = tables[target_modules][kind]
        chosen = [n for n in adaptable if matches(n, table) and n not in heads]
        missing = [t for t in table if not any(matches(n, [t]) for n in chosen)]
        rule = f"{target_modules} for model_type {kind!r}: {', '.join(table)}"
        if missing:  # the table is stale for this transformers version: say so, adapt what is there
            log.warning(
                f"lora.target_modules={target_modules!r}: model_type {kind!r} has no modules named {missing} "
                f"(its adaptable modules end in {_candidates(adaptable, heads)}); adapting the rest. Name the "
                "modules to adapt in lora.target_modules to choose them yourself."
            )
    elif target_modules in (ATTENTION_MLP, ALL_LINEAR):
        chosen = [n for n in adaptable if n not in heads]
        rule = (
            "all-linear (every linear layer but the output head)"
            if target_modules == ALL_LINEAR
            else f"attention-mlp: model_type {kind!r} is not in deltatune's family table, so every linear "
            "layer but the output head"
        )
    elif isinstance(target_modules, str):
        chosen = [n for n in adaptable if matches(n, target_modules)]
        rule = f"regex {target_modules!r}"
    else:
        chosen = [n for n in adaptable if matches(n, target_modules)]
        unmatched = [t for t in target_modules if not any(matches(n, [t]) for n in chosen)]
        rule = f"names {list(target_modules)}"
    if exclude_modules:
        chosen = [n for n in chosen if not matches(n, exclude_modules)]
        rule += f", excluding {exclude_modules!r}"
    candidates = _candidates(adaptable, heads)
    example = next((n for n in adaptable if n not in heads), None)
    if not chosen:
        raise TargetError(
            f"lora.target_modules selects no module of this {kind or 'model'} ({rule}). Its linear layers end "
            f"in {candidates} (full path e.g. {example!r}): set lora.target_modules to a list of those names, a "
            f"regex over full paths, '{ALL_LINEAR}', or leave it unset for '{ATTENTION_MLP}'"
            + (", and check lora.exclude_modules" if exclude_modules else "")
        )
    if unmatched:
        msg = (
            f"lora.target_modules names {unmatched} match no linear layer of this {kind or 'model'}, so those "
            f"layers get no adapter; its linear layers end in {candidates}. Replace them with names from that "
            f"list, or leave lora.target_modules unset for '{ATTENTION_MLP}'"
        )
        if strict:
            raise TargetError(msg + " (lora.strict_targets is true)")
        log.warning("%s; lora.strict_targets: true makes this an error", msg)
    return TargetSelection(chosen, rule, unmatched)


def find_targets(
    model: nn.Module, target_modules: list[str] | str, exclude_modules: list[str] | str | None = None
) -> list[str]:
    """Names of the modules LoRA adapts (:func:`select_targets` without the rule)."""
    return select_targets(model, target_modules, exclude_modules).names


def choose_targets(model: nn.Module, cfg: LoraConfig) -> TargetSelection:
    """:func:`select_targets` for a LoraConfig, with the choice logged."""
    sel = select_targets(model, cfg.target_modules, cfg.exclude_modules, strict=cfg.strict_targets)
    log.info("LoRA targets: %d modules (%s)", len(sel.names), sel.rule)
    return sel
