"""The one rule for names that become paths in a run directory or an artifact store.

Run names, model names, versions and aliases all end up as path segments (``<store>/<model>/versions/<v>``),
so every one is checked by ``check_name`` when it is first read, not when the store finally sees it.
"""

from __future__ import annotations

import re

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


def is_safe_name(name: object) -> bool:
    """Letters, digits, '.', '_' and '-', starting with a letter or digit, and no '..'."""
    return isinstance(name, str) and bool(_NAME.fullmatch(name)) and ".." not in name


def check_name(kind: str, name: object) -> str:
    """Return ``name`` if it is safe (see ``is_safe_name``), else raise ``ValueError`` naming ``kind``."""
    if not is_safe_name(name):
        raise ValueError(
            f"invalid {kind} {name!r}: expected a non-empty name of letters, digits, '.', '_', '-' "
            "that starts with a letter or digit (no '/', no '..'); e.g. 'llama-tiny-lora'"
        )
    return name  # type: ignore[return-value]
