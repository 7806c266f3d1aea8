"""Chat templates: the built-in ones (chatml, llama3, ...), a Jinja string or file from data.chat_template.

A template is rendered by the tokenizer's own ``apply_chat_template(chat_template=...)``, so a built-in
renders exactly as the model's published ``tokenizer_config.json`` template does.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from core.config import DataConfig
from core.data.errors import DataError

logger = logging.getLogger(__name__)

# The chat_template strings of the models' published tokenizer_config.json files (Hugging Face hub).
BUILTIN_TEMPLATES: dict[str, str] = {
    # teknium/OpenHermes-2.5-Mistral-7B (ChatML; Qwen2 renders the same turns)
    "chatml": (
        "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content']"
        " + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
        "{% endif %}"
    ),
    # meta-llama/Meta-Llama-3-8B-Instruct
    "llama3": (
        "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = "
        "'<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + "
        "'<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}"
        "{{ content }}{% endfor %}{% if add_generation_prompt %}"
        "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
    ),
    # HuggingFaceH4/zephyr-7b-beta
    "zephyr": (
        "{% for message in messages %}\n{% if message['role'] == 'user' %}\n"
        "{{ '<|user|>\n' + message['content'] + eos_token }}\n{% elif message['role'] == 'system' %}\n"
        "{{ '<|system|>\n' + message['content'] + eos_token }}\n{% elif message['role'] == 'assistant' %}\n"
        "{{ '<|assistant|>\n'  + message['content'] + eos_token }}\n{% endif %}\n"
        "{% if loop.last and add_generation_prompt %}\n{{ '<|assistant|>' }}\n{% endif %}\n{% endfor %}"
    ),
    # mistralai/Mistral-7B-Instruct-v0.1 ([INST] turns; no system role)
    "mistral": (
        "{{ bos_token }}{% for message in messages %}{% if (message['role'] == 'user') != "
        "(loop.index0 % 2 == 0) %}{{ raise_exception('Conversation roles must alternate "
        "user/assistant/user/assistant/...') }}{% endif %}{% if message['role'] == 'user' %}"
        "{{ '[INST] ' + message['content'] + ' [/INST]' }}{% elif message['role'] == 'assistant' %}"
        "{{ message['content'] + eos_token + ' ' }}{% else %}{{ raise_exception('Only user and assistant "
        "roles are supported!') }}{% endif %}{% endfor %}"
    ),
    # meta-llama/Llama-2-7b-chat-hf ([INST] turns, the system message folded into the first one)
    "llama2": (
        "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}{% set system_message "
        "= messages[0]['content'] %}{% else %}{% set loop_messages = messages %}{% set system_message = false "
        "%}{% endif %}{% for message in loop_messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 "
        "== 0) %}{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
        "{% endif %}{% if loop.index0 == 0 and system_message != false %}{% set content = '<<SYS>>\\n' + "
        "system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}{% else %}{% set content = "
        "message['content'] %}{% endif %}{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + "
        "content.strip() + ' [/INST]' }}{% elif message['role'] == 'assistant' %}{{ ' '  + content.strip() + "
        "' ' + eos_token }}{% endif %}{% endfor %}"
    ),
    # google/gemma-7b-it (no system role: it raises)
    "gemma": (
        "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not "
        "supported') }}{% endif %}{% for message in messages %}{% if (message['role'] == 'user') != "
        "(loop.index0 % 2 == 0) %}{{ raise_exception('Conversation roles must alternate "
        "user/assistant/user/assistant/...') }}{% endif %}{% if (message['role'] == 'assistant') %}"
        "{% set role = 'model' %}{% else %}{% set role = message['role'] %}{% endif %}{{ '<start_of_turn>' + "
        "role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}{% endfor %}{% if add_generation_prompt "
        "%}{{'<start_of_turn>model\n'}}{% endif %}"
    ),
    # microsoft/Phi-3-mini-4k-instruct (ends a conversation with eos_token when not generating)
    "phi3": (
        "{% for message in messages %}{% if message['role'] == 'system' %}{{'<|system|>\n' + "
        "message['content'] + '<|end|>\n'}}{% elif message['role'] == 'user' %}{{'<|user|>\n' + "
        "message['content'] + '<|end|>\n'}}{% elif message['role'] == 'assistant' %}{{'<|assistant|>\n' + "
        "message['content'] + '<|end|>\n'}}{% endif %}{% endfor %}{% if add_generation_prompt %}"
        "{{ '<|assistant|>\n' }}{% else %}{{ eos_token }}{% endif %}"
    ),
    # deltatune's plain fallback for a tokenizer without a template: "<|role|>\ncontent\n" per message,
    # "<|assistant|>\n" as the generation prompt. Its end of turn is the newline; EOS ends the sequence
    # (data.add_eos), never each turn.
    "plain": (
        "{% for message in messages %}{{ '<|' + message['role'] + '|>\n' + message['content'] + '\n' }}"
        "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
    ),
}
FALLBACK_TEMPLATE = "plain"


def _resolve(spec: str) -> tuple[str, str]:
    """``data.chat_template`` -> (template text, how to name it in messages)."""
    if spec in BUILTIN_TEMPLATES:
        return BUILTIN_TEMPLATES[spec], f"built-in {spec!r}"
    if "{{" in spec or "{%" in spec:
        return spec, "data.chat_template (a Jinja string)"
    path = Path(spec).expanduser()
    if path.is_file():
        try:
            return path.read_text(encoding="utf-8"), f"data.chat_template file {spec}"
        except (OSError, UnicodeDecodeError) as e:
            raise DataError(
                f"data.chat_template={spec!r}: cannot read it ({e}); give a readable UTF-8 file"
            ) from e
    raise DataError(
        f"data.chat_template={spec!r} is not a built-in template ({', '.join(BUILTIN_TEMPLATES)}), a Jinja "
        "string (with {{ }} or {% %}) or an existing file; set one of those, or leave it unset to use the "
        "tokenizer's own template"
    )


def template_key(cfg: DataConfig) -> str | None:
    """What of ``data.chat_template`` changes the prepared data: the template text, not a file's name, so
    that editing a .jinja file re-keys the cache. None when unset (the tokenizer's own template is part of
    the tokenizer's identity).

    Raises:
        DataError: the setting names no built-in, Jinja string or readable file.
    """
    if cfg.chat_template is None:
        return None
    return _resolve(cfg.chat_template)[0]


def chat_template(cfg: DataConfig, tokenizer: Any) -> tuple[str, str]:
    """The template chat rows are rendered with, and its name for messages: ``data.chat_template`` when
    set, else the tokenizer's own, else the plain fallback (with a warning that says so).

    Raises:
        DataError: ``data.chat_template`` names no built-in, Jinja string or readable file.
    """
    if cfg.chat_template is not None:
        return _resolve(cfg.chat_template)
    own = getattr(tokenizer, "chat_template", None)
    if isinstance(own, dict):  # a tokenizer with named templates: transformers uses "default"
        own = own.get("default")
    if isinstance(own, str) and own:
        return own, "the tokenizer's chat template"
    logger.warning(
        "the tokenizer has no chat template and data.chat_template is not set: chat rows use the plain "
        "fallback %r ('<|role|>\\ncontent\\n' per message); set data.chat_template (e.g. chatml, llama3) to "
        "the format the model should learn",
        FALLBACK_TEMPLATE,
    )
    return BUILTIN_TEMPLATES[FALLBACK_TEMPLATE], f"the fallback {FALLBACK_TEMPLATE!r} template"
