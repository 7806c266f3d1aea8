"""Tiny random models of the common families, built from their transformers configs (no download).

Every size is a multiple of 64 so that 4-bit quantization on CPU (blocksize 64) takes every layer.
"""

from __future__ import annotations

import torch
from transformers import AutoConfig, AutoModelForCausalLM

SMALL = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=256,
    head_dim=16,
)
# Per family: config overrides on top of SMALL (names the family's config does not have are dropped).
_FAMILY = {
    "llama": {},
    "qwen2": {},  # q/k/v with biases
    "mistral": {"sliding_window": None},  # grouped-query attention (2 KV heads for 4 query heads)
    "phi3": {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2},  # fused qkv_proj and gate_up_proj
    "gpt2": {
        "n_embd": 64,
        "n_layer": 2,
        "n_head": 4,
        "n_inner": 256,
        "n_positions": 64,
        "bos_token_id": 1,
        "eos_token_id": 2,
    },  # Conv1D, tied head
    "gemma": {},  # tied head, GeGLU MLP
    # Checked on the meta device only (their module names):
    "falcon": {"new_decoder_architecture": True, "num_kv_heads": 2},
    "gpt_neox": {},
    "phi": {},
    "starcoder2": {"bos_token_id": 1, "eos_token_id": 2},
    "olmo": {},
    "mixtral": {"num_local_experts": 4},
}
TRAINED = ("llama", "qwen2", "mistral", "phi3", "gpt2", "gemma")
ALL = tuple(_FAMILY)


def family_config(family: str):
    cfg = AutoConfig.for_model(family)
    for key, value in {**SMALL, **_FAMILY[family]}.items():
        if key in cfg.to_dict() or key in _FAMILY[family]:
            try:
                setattr(cfg, key, value)
            except AttributeError:  # a derived property (falcon's head_dim)
                pass
    return cfg


def family_model(family: str, seed: int = 0, *, meta: bool = False):
    """A random fp32 model of ``family`` in eval mode (on the meta device with ``meta``)."""
    torch.manual_seed(seed)
    cfg = family_config(family)
    if meta:
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(cfg)
    return AutoModelForCausalLM.from_config(cfg).float().eval()
