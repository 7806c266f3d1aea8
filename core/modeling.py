"""Load base models and tokenizers (hub id, local dir, s3:// URI, or ``builtin:tiny-llama``) safely.

Weights load through safetensors only; ``trust_remote_code`` stays off unless the config opts in.
"""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path

import torch
from torch import nn

from core.config import ModelConfig, QuantConfig, cache_root
from core.dtypes import DTYPES

log = logging.getLogger(__name__)


def resolve_source(name_or_path: str, *, storage_options: dict | None = None) -> str:
    """Map ``builtin:*`` to the built tiny model and ``s3://``/fsspec URIs to a local cached copy.

    Hub ids and local paths come back unchanged: ``from_pretrained`` handles them.

    Args:
        name_or_path: hub id, local dir, ``file://`` path, fsspec URI or ``builtin:tiny-llama``.
        storage_options: fsspec options for a remote URI (``ModelConfig.storage_options``).
    """
    # At call time: core.tiny imports tokenizers and transformers' model classes (seconds at start-up).
    from core.tiny import resolve_model_path

    if "://" in name_or_path and not name_or_path.startswith("file://"):
        return str(_fetch_remote_dir(name_or_path, storage_options or {}))
    path = name_or_path.removeprefix("file://")
    if path.startswith(("/", "./", "../", "~")) and not Path(path).expanduser().exists():
        # A path, not a hub id ("org/name"): say so, instead of the hub's "Repo id must be in the form".
        raise FileNotFoundError(
            f"model.name_or_path={name_or_path} does not exist; give a model directory (config.json and "
            "*.safetensors), a hub id such as meta-llama/Meta-Llama-3-8B, an s3:// URI, or builtin:tiny-llama"
        )
    return resolve_model_path(path)


_VERSION_FIELDS = (
    "ETag",
    "etag",
    "md5Hash",
    "generation",
    "mtime",
    "LastModified",
    "last_modified",
    "created",
)


def _remote_listing(fs, root: str) -> list[tuple[str, int, str]]:
    """(relative path, size, ETag or mtime) of every file under ``root``, sorted."""
    fs.invalidate_cache(root)  # s3fs keeps listings per instance, and fsspec reuses instances
    prefix = root.rstrip("/") + "/"
    listing = []
    for path, info in fs.find(root, detail=True).items():
        if info.get("type", "file") != "file" or not path.startswith(prefix):
            continue
        version = next((info[k] for k in _VERSION_FIELDS if info.get(k) is not None), "")
        listing.append((_safe_relpath(path[len(prefix) :], root), int(info.get("size") or 0), str(version)))
    return sorted(listing)


def _safe_relpath(rel: str, root: str) -> str:
    """An object key below ``root`` as a relative local path, or an error: object keys are arbitrary
    strings, and ``a/../../x`` or ``/abs`` would write outside the cache (a .pth into site-packages)."""
    parts = rel.split("/")
    if not rel or any(p in ("", ".", "..") for p in parts) or "\\" in rel:
        raise ValueError(
            f"refusing to fetch {root}: object key {rel!r} is not a plain relative path (empty, '.' or "
            "'..' parts, or a backslash) and could write outside the model cache"
        )
    return rel


def _fetch_remote_dir(uri: str, storage_options: dict) -> Path:
    """Copy a model directory from an fsspec URI into the cache, keyed by the URI and its file listing.

    The listing (path, size, ETag or mtime) is part of the key, so a model rewritten at the same URI
    is fetched anew instead of served stale from the cache.
    """
    import json
    import shutil

    import fsspec

    from core.fsutil import make_temp_dir

    fs, root = fsspec.core.url_to_fs(uri, **storage_options)
    listing = _remote_listing(fs, root)
    if not listing:
        raise FileNotFoundError(
            f"no files under {uri}: expected a model directory (config.json, *.safetensors); check "
            f"model.name_or_path and model.storage_options, and that credentials are in the environment"
        )
    key = hashlib.sha256(json.dumps([uri, listing]).encode()).hexdigest()[:16]
    dest = cache_root() / "remote-models" / key
    if (dest / ".complete").exists():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = make_temp_dir(dest.parent, f".{key}.tmp-")  # not mkdtemp's 0700: a shared cache
    try:
        locals_ = [tmp / rel for rel, _, _ in listing]
        for local in locals_:
            local.parent.mkdir(parents=True, exist_ok=True)
        fs.get([f"{root.rstrip('/')}/{rel}" for rel, _, _ in listing], [str(p) for p in locals_])
        got = sorted((rel, p.stat().st_size) for (rel, _, _), p in zip(listing, locals_, strict=True))
        if got != [(rel, size) for rel, size, _ in listing]:
            raise RuntimeError(f"{uri} changed while it was being downloaded; run again")
        (tmp / ".complete").write_text(json.dumps({"uri": uri, "files": listing}))
        if dest.exists() and not (dest / ".complete").exists():
            shutil.rmtree(dest, ignore_errors=True)  # not ours to finish: only complete dirs move in
        try:
            os.replace(tmp, dest)
        except OSError:
            if not (dest / ".complete").exists():
                raise
            log.info("%s was fetched concurrently by another process; using that copy", uri)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


def load_tokenizer(cfg: ModelConfig, source: str | None = None):
    """The tokenizer of ``cfg`` (or ``cfg.tokenizer``); a pad token is set to EOS when missing."""
    from transformers import AutoTokenizer

    src = source or resolve_source(cfg.tokenizer or cfg.name_or_path, storage_options=cfg.storage_options)
    tok = AutoTokenizer.from_pretrained(src, revision=cfg.revision, trust_remote_code=cfg.trust_remote_code)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def load_model(
    cfg: ModelConfig,
    *,
    source: str | None = None,
    quant: QuantConfig | None = None,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
) -> nn.Module:
    """Load a causal LM from safetensors; with ``quant`` the linear layers become 4-bit (QLoRA).

    Args:
        cfg: the model section of the run config.
        source: an already resolved local path (default: resolve ``cfg.name_or_path``).
        quant: quantize every linear layer except the output head with bitsandbytes.
        dtype: overrides ``cfg.dtype``.
        device: where to put the model (default: stay on CPU).
    """
    from transformers import AutoModelForCausalLM

    src = source or resolve_source(cfg.name_or_path, storage_options=cfg.storage_options)
    torch_dtype = dtype or DTYPES[cfg.dtype]
    kwargs = {}
    if cfg.attn_implementation:
        kwargs["attn_implementation"] = cfg.attn_implementation
    model = AutoModelForCausalLM.from_pretrained(
        src,
        revision=cfg.revision,
        dtype=torch_dtype,
        trust_remote_code=cfg.trust_remote_code,
        use_safetensors=True,
        **kwargs,
    )
    if quant is not None:
        # At call time: core.quant imports bitsandbytes (seconds at start-up), which only QLoRA needs.
        from core.quant import quantize_model

        quantize_model(model, quant, device=device)
    elif device is not None:
        model.to(device)
    return model


def pick_device(local_rank: int | None = None) -> torch.device:
    """CUDA device of this rank when there is a GPU, else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", local_rank or 0)
    return torch.device("cpu")
