"""Chat templates: the built-in ones (chatml, llama3, ...), a Jinja string or file from data.chat_template."""

from __future__ import annotations

from core.config import DataConfig


def template_key(cfg: DataConfig) -> str | None:
    """What of ``data.chat_template`` changes the prepared data (the template text, not a file's name)."""
    return cfg.chat_template
