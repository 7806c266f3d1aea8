"""Which storage-option keys hold credentials: masked in logs (store), refused in run configs (config).

One pattern for both, so a key the store would redact is also a key a run config cannot carry.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from typing import Any

SECRET_KEY = re.compile(r"secret|token|password|passwd|credential|api_?key|access_?key|^key$", re.I)


def redact(options: Any) -> Any:
    """Return a copy of storage options with every secret-looking value replaced by ``'***'``.

    Args:
        options: Storage options (nested dicts and lists allowed).

    Returns:
        The same structure with values under keys like ``secret``, ``token``, ``key`` masked.
    """
    if isinstance(options, Mapping):
        return {
            k: ("***" if SECRET_KEY.search(str(k)) and v is not None else redact(v))
            for k, v in options.items()
        }
    if isinstance(options, (list, tuple)):
        return type(options)(redact(v) for v in options)
    return options


def secret_key_paths(options: Any, prefix: str = "") -> Iterator[str]:
    """Yield the dotted path of every secret-looking key in nested dicts/lists (``client_kwargs.token``).

    Args:
        options: Storage options (nested dicts and lists allowed).
        prefix: path of ``options`` itself, prepended to each result.
    """
    if isinstance(options, Mapping):
        for k, v in options.items():
            path = f"{prefix}.{k}" if prefix else str(k)
            if SECRET_KEY.search(str(k)):
                yield path
            else:
                yield from secret_key_paths(v, path)
    elif isinstance(options, (list, tuple)):
        for i, v in enumerate(options):
            yield from secret_key_paths(v, f"{prefix}[{i}]")
