"""Shard-wise merge: read the base's safetensors one tensor at a time, fold the adapter into each adapted
weight with ``core.lora.merged_weight`` (the maths ``LoRALinear.merge`` runs), write HF-format shards.

info = stream_merge(base_dir(cfg.model), "runs/x/adapter", "runs/x/merged", BaseView(torch.float32), 2 * 10**9)

Peak memory is about one tensor plus the adapter: no model is ever built, no shard held whole (docs/merge.md).
"""

from __future__ import annotations

import json
import logging
import math
import shutil
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from core.adapter import PREFIX, AdapterError, read_adapter_files
from core.config import ModelConfig, QuantConfig
from core.errors import DeltatuneError
from core.lora import lora_scaling, merged_weight, modules_to_save_names, rank_and_alpha
from core.modeling import resolve_source
from core.targets import is_conv1d

log = logging.getLogger(__name__)

WEIGHTS = "model.safetensors"
INDEX = "model.safetensors.index.json"
GENERATION_CONFIG = "generation_config.json"
# Element sizes of safetensors' dtype names (the header's "dtype" field, safetensors' format spec).
_ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1}
_ITEMSIZE |= {"I64": 8, "I32": 4, "I16": 2, "I8": 1, "U64": 8, "U32": 4, "U16": 2, "U8": 1, "BOOL": 1}
_FLOATS = {"F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2"}


class MergeSourceError(DeltatuneError, ValueError):
    """The base model cannot be streamed as it is stored (no safetensors, names the model does not use);
    the same files fail the same way again."""


def base_dir(cfg: ModelConfig) -> Path:
    """The base model as a local directory: ``core.modeling.resolve_source`` (built-in, s3:// cached copy,
    local path), or for a hub id the hub's own cache (config and safetensors only, the files
    ``from_pretrained`` would fetch)."""
    src = resolve_source(cfg.name_or_path, storage_options=cfg.storage_options)
    path = Path(src).expanduser()
    if path.is_dir():
        return path
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(src, revision=cfg.revision, allow_patterns=["*.json", "*.safetensors"]))


def source_files(src: Path) -> dict[str, Path]:
    """``{tensor name: safetensors file}`` of the base in ``src``, from its index or its one file.

    Raises:
        MergeSourceError: no safetensors weights (``.bin`` pickles are never loaded).
    """
    index = src / INDEX
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return {k: src / f for k, f in weight_map.items()}
    if (src / WEIGHTS).is_file():
        with open(src / WEIGHTS, "rb") as f:
            meta, _ = _header(f)
        return {k: src / WEIGHTS for k in meta if k != "__metadata__"}
    bins = sorted(p.name for p in src.glob("*.bin"))
    if bins:
        raise MergeSourceError(
            f"{src} holds PyTorch pickles ({', '.join(bins[:3])}) and no safetensors; deltatune loads "
            "safetensors only: convert the base once (load it with transformers and save_pretrained it, "
            "which writes safetensors) and point model.name_or_path at the converted directory"
        )
    raise MergeSourceError(f"{src} has no {WEIGHTS} or {INDEX}: set model.name_or_path to a model directory")


def skeleton(src: Path, *, trust_remote_code: bool = False) -> nn.Module:
    """The base's module tree on the meta device (no weights): layer types, tied parameters, the head."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(src, trust_remote_code=trust_remote_code)
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)


@dataclass
class Update:
    """One adapted weight: the factors in the adapter's dtype (fp32, as LoRALinear keeps them)."""

    module: str
    lora_A: torch.Tensor  # (r, in)
    lora_B: torch.Tensor  # (out, r)
    scaling: float
    magnitude: torch.Tensor | None  # DoRA's m (out,)
    fan_in_fan_out: bool  # GPT-2 Conv1D: the base weight is stored (in, out)

    def apply(self, w: torch.Tensor) -> torch.Tensor:
        new, _ = merged_weight(
            w,
            self.lora_A,
            self.lora_B,
            self.scaling,
            magnitude=self.magnitude,
            fan_in_fan_out=self.fan_in_fan_out,
        )
        return new


@dataclass
class Adapter:
    """An adapter read for streaming: updates by weight name, modules_to_save copies by parameter name."""

    updates: dict[str, Update]
    replacements: dict[str, torch.Tensor]  # in the file's order, which load_adapter copies them in


def read_adapter(adapter_dir: str | Path, model: nn.Module) -> Adapter:
    """Read ``adapter_dir`` against ``model`` (a skeleton) with load_adapter's checks: every key must fit.

    Raises:
        AdapterError: a missing or unexpected key, a module that is not Linear/Conv1D, a wrong shape.
    """
    cfg, sd = read_adapter_files(adapter_dir)
    suffix = ".lora_A.weight"
    targets = sorted(k[len(PREFIX) : -len(suffix)] for k in sd if k.startswith(PREFIX) and k.endswith(suffix))
    try:
        saved = modules_to_save_names(model, cfg.modules_to_save)
    except ValueError as e:
        raise AdapterError(f"adapter {adapter_dir} does not fit this model: {e}") from e
    expected = {f"{PREFIX}{n}.lora_{ab}.weight" for n in targets for ab in "AB"}
    expected |= {f"{PREFIX}{n}.lora_magnitude_vector" for n in targets if cfg.use_dora}
    kept = {f"{PREFIX}{n}.{p}" for n in saved for p, _ in model.get_submodule(n).named_parameters()}
    missing, unexpected = sorted((expected | kept) - set(sd)), sorted(set(sd) - expected - kept)
    if missing or unexpected:
        raise AdapterError(
            f"adapter {adapter_dir} does not fit this model: missing {missing[:3]} unexpected {unexpected[:3]}; "
            "is it for the same base model?"
        )
    updates: dict[str, Update] = {}
    for name in targets:
        try:
            layer = model.get_submodule(name)
        except AttributeError as e:
            raise AdapterError(
                f"adapter {adapter_dir} adapts {name}, which this base model has no module for"
            ) from e
        conv = is_conv1d(layer)
        if not (conv or isinstance(layer, nn.Linear)):
            raise AdapterError(f"{name} is a {type(layer).__name__}; LoRA merges into Linear and Conv1D only")
        n_in, n_out = (int(layer.nx), int(layer.nf)) if conv else (layer.in_features, layer.out_features)
        r, alpha = rank_and_alpha(name, cfg)
        key = f"{PREFIX}{name}"
        a, b = sd[f"{key}.lora_A.weight"].float(), sd[f"{key}.lora_B.weight"].float()
        m = sd[f"{key}.lora_magnitude_vector"].float() if cfg.use_dora else None
        if a.shape != (r, n_in) or b.shape != (n_out, r) or (m is not None and m.shape != (n_out,)):
            raise AdapterError(
                f"{name}: adapter has lora_A {tuple(a.shape)}, lora_B {tuple(b.shape)} but the model expects "
                f"({r}, {n_in}) and ({n_out}, {r}) at r={r}"
            )
        updates[f"{name}.weight"] = Update(name, a, b, lora_scaling(r, alpha, cfg.use_rslora), m, conv)
    replacements = {k[len(PREFIX) :]: v for k, v in sd.items() if k in kept}
    return Adapter(updates, replacements)


@dataclass
class BaseView:
    """How a base tensor is read before the adapter is added: cast to the merge dtype (``original``), or,
    for QLoRA's ``dequantized`` base, as training saw it: cast to ``load_dtype`` (model.dtype), the
    4-bit layers replaced by dequant(quant(W)) (``core.quant.roundtrip_4bit``), then cast."""

    dtype: torch.dtype
    quant: QuantConfig | None = None
    load_dtype: torch.dtype | None = None
    quantized: dict[str, bool] = field(default_factory=dict)  # weight name -> stored (in, out) (Conv1D)

    def __call__(self, name: str, t: torch.Tensor) -> torch.Tensor:
        if not t.is_floating_point():
            return t
        if self.quant is None:
            return t.to(self.dtype)
        t = t.to(self.load_dtype)
        if name in self.quantized:
            from core.quant import roundtrip_4bit  # at call time: bitsandbytes, which only QLoRA needs

            transposed = self.quantized[name]
            w = roundtrip_4bit(t.t() if transposed else t, self.quant)  # (out, in)
            t = w.t() if transposed else w
        return t.to(self.dtype)


def dequantized_view(
    model: nn.Module, quant: QuantConfig, dtype: torch.dtype, load_dtype: torch.dtype
) -> BaseView:
    """The ``dequantized`` BaseView of ``model`` (a skeleton): the layers core.quant.quantize_model makes 4-bit."""
    from core.quant import quantizable

    named, _ = quantizable(model, quant.skip_modules)
    return BaseView(dtype, quant, load_dtype, {f"{n}.weight": is_conv1d(m) for n, m in named})


def _tied_groups(model: nn.Module) -> dict[str, list[str]]:
    """``{state_dict key: every key sharing its tensor}`` in state_dict order (lm_head tied to embed_tokens)."""
    by_id: dict[int, list[str]] = {}
    for k, v in model.state_dict(keep_vars=True).items():
        by_id.setdefault(id(v), []).append(k)
    return {k: keys for keys in by_id.values() for k in keys}


@dataclass
class _Entry:
    out: str  # the name written
    src: str  # the checkpoint tensor read
    nbytes: int
    numel: int
    shape: tuple[int, ...]
    kind: str  # the safetensors dtype name written


def _plan(files: dict[str, Path], model: nn.Module, adapter: Adapter, dtype: torch.dtype):
    """What to write, in checkpoint order, and which tied groups the adapter unties. Mirrors what
    load_model + load_adapter + merge_and_unload + save_pretrained writes: the model's state_dict keys,
    one key per tied group (the first, as save_pretrained keeps embed_tokens for a tied lm_head) unless an
    adapted weight is in the group (``_untie_adapted_weights`` then gives it a tensor of its own)."""
    groups = _tied_groups(model)
    missing = [k for k in groups if not any(g in files for g in groups[k])]
    if missing:
        raise MergeSourceError(
            f"the base checkpoint has no tensor for {missing[:3]} ({len(missing)} in all) under the names the "
            "model uses (an older naming that transformers renames on load?); set merge.mode: in_memory"
        )
    dropped = sorted(set(files) - set(groups))
    if dropped:
        log.info("not merged (the model does not use them, as from_pretrained drops them): %s", dropped[:5])
    untied = sorted({k for k in adapter.updates if len(groups[k]) > 1})
    out_keys = {}
    for k, keys in groups.items():
        if k == keys[0] or any(g in adapter.updates for g in keys):
            out_keys[k] = next(g for g in keys if g in files)
    by_src: dict[str, list[str]] = {}
    for out, src in out_keys.items():
        by_src.setdefault(src, []).append(out)
    entries: list[_Entry] = []
    out_kind = _NAMES[dtype]
    for path in dict.fromkeys(files.values()):
        with open(path, "rb") as f:
            meta, _ = _header(f)
        for src in meta:  # the header's order: the file's, which the reader then walks forward
            if src == "__metadata__" or src not in by_src or files.get(src) != path:
                continue
            kind, shape = meta[src]["dtype"], tuple(meta[src]["shape"])
            if kind not in _TORCH:
                raise MergeSourceError(
                    f"{path}: {src} has dtype {kind}, which the streaming merge does not read; set merge.mode: in_memory"
                )
            kind = out_kind if kind in _FLOATS else kind
            numel = math.prod(shape)
            entries += [_Entry(out, src, numel * _ITEMSIZE[kind], numel, shape, kind) for out in by_src[src]]
    return entries, untied, groups


def _shards(entries: list[_Entry], max_bytes: int) -> list[list[_Entry]]:
    """Greedy split in order, as huggingface_hub's split_torch_state_dict_into_shards: a new shard when the
    next tensor would overflow this one; a tensor larger than ``max_bytes`` gets a shard of its own."""
    shards: list[list[_Entry]] = [[]]
    size = 0
    for e in entries:
        if shards[-1] and size + e.nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(e)
        size += e.nbytes
    return [s for s in shards if s]


_TORCH = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
_TORCH |= {"I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8}
_TORCH |= {"BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}
_NAMES = {v: k for k, v in _TORCH.items()}


def _header(f) -> tuple[dict[str, Any], int]:
    """A safetensors file's header and where its data starts (the format: an 8-byte little-endian header
    length, the JSON header, then the tensors' bytes at ``data_offsets``; huggingface/safetensors README)."""
    f.seek(0)
    n = int.from_bytes(f.read(8), "little")
    return json.loads(f.read(n)), 8 + n


class _Reader:
    """Reads one tensor at a time with plain file reads into a fresh buffer, one file open at a time
    (entries come in checkpoint order). Not ``safe_open``'s memory map: its pages count in RSS for as long as
    the file stays open, a whole source shard on top of the tensors being written."""

    def __init__(self, files: dict[str, Path]) -> None:
        self.files, self.path, self.f = files, None, None
        self.meta: dict[str, Any] = {}
        self.start = 0

    def get(self, name: str) -> torch.Tensor:
        path = self.files[name]
        if path != self.path:
            self.close()
            self.f = open(path, "rb")  # noqa: SIM115 (kept open across calls, closed in close())
            self.meta, self.start = _header(self.f)
            self.path = path
        info = self.meta[name]
        begin, end = info["data_offsets"]
        buf = torch.empty(end - begin, dtype=torch.uint8)
        self.f.seek(self.start + begin)
        if end > begin and self.f.readinto(buf.numpy()) != end - begin:
            raise MergeSourceError(f"{path} is truncated: {name} is cut short; fetch the base model again")
        return buf.view(_TORCH[info["dtype"]]).reshape(info["shape"])

    def close(self) -> None:
        if self.f is not None:
            self.f.close()
        self.f, self.path = None, None


def _write_shard(
    path: Path, items: Iterator[tuple[str, torch.Tensor]], plan: list[_Entry], dtypes: list[str]
) -> None:
    """Write one safetensors file tensor by tensor, so that only the tensor being written is in memory
    (``save_file`` serializes the whole dict into one buffer first). The header is known beforehand from the
    plan; each tensor is checked against it as it arrives."""
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for e, kind in zip(plan, dtypes, strict=True):
        header[e.out] = {"dtype": kind, "shape": list(e.shape), "data_offsets": [offset, offset + e.nbytes]}
        offset += e.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned, as safetensors writes it
    with open(path, "wb") as f:
        f.write(len(raw).to_bytes(8, "little"))
        f.write(raw)
        for (name, t), e, kind in zip(items, plan, dtypes, strict=True):
            if name != e.out or _NAMES.get(t.dtype) != kind or list(t.shape) != list(e.shape):
                raise AssertionError(
                    f"{name}: {t.dtype} {tuple(t.shape)} does not match the planned {kind} {e.shape}"
                )
            f.write(t.contiguous().reshape(-1).view(torch.uint8).numpy().data)


def _tensors(
    shard: list[_Entry], reader: _Reader, adapter: Adapter, view: BaseView, groups: dict[str, list[str]]
) -> Iterator[tuple[str, torch.Tensor]]:
    for e in shard:
        t = view(e.out, reader.get(e.src))
        # modules_to_save: load_adapter copies each into its parameter, shared by a tied group, in the
        # file's order (the last copy into a group wins); an adapted weight is untied only after that.
        members = groups[e.out]
        for g, v in adapter.replacements.items():
            if g in members:
                t = v.to(t.dtype)
        if e.out in adapter.updates:
            t = adapter.updates[e.out].apply(t)
        yield e.out, t.contiguous()


def stream_merge(
    src: str | Path,
    adapter_dir: str | Path,
    out_dir: str | Path,
    view: BaseView,
    max_shard_bytes: int,
    *,
    model: nn.Module | None = None,
    trust_remote_code: bool = False,
) -> dict[str, Any]:
    """Write the merged model's weights, config.json and generation_config.json (when the base has one)
    into ``out_dir``; the tokenizer is the caller's. Equal bit for bit to the in-memory merge of the same
    base view (tests/test_merge.py).

    Args:
        src: the base model directory (:func:`base_dir`).
        view: how base tensors are read (the merge dtype; QLoRA's dequantized base).
        max_shard_bytes: per output file; one file is ``model.safetensors``, several get an index.
        model: the base's :func:`skeleton`, when the caller built it already.

    Returns:
        shards, tensors, merged (adapted weights), replaced (modules_to_save tensors), untied, total_size.
    """
    from transformers import AutoConfig

    src, out_dir = Path(src), Path(out_dir)
    model = model if model is not None else skeleton(src, trust_remote_code=trust_remote_code)
    files = source_files(src)
    adapter = read_adapter(adapter_dir, model)
    entries, untied, groups = _plan(files, model, adapter, view.dtype)
    shards = _shards(entries, max_shard_bytes)
    n = len(shards)
    names = [WEIGHTS] if n == 1 else [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    out_dir.mkdir(parents=True, exist_ok=True)
    reader = _Reader(files)
    weight_map: dict[str, str] = {}
    try:
        for shard, name in zip(shards, names, strict=True):  # one tensor in memory at a time
            _write_shard(
                out_dir / name, _tensors(shard, reader, adapter, view, groups), shard, [e.kind for e in shard]
            )
            weight_map |= {e.out: name for e in shard}
    finally:
        reader.close()
    total_size = sum(e.nbytes for e in entries)
    if n > 1:  # the index save_pretrained writes (transformers 5: total_parameters beside total_size)
        index = {
            "metadata": {"total_parameters": sum(e.numel for e in entries), "total_size": total_size},
            "weight_map": dict(sorted(weight_map.items())),
        }
        (out_dir / INDEX).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    config = AutoConfig.from_pretrained(src, trust_remote_code=trust_remote_code)
    config.dtype = view.dtype
    if untied and getattr(config, "tie_word_embeddings", False):
        config.tie_word_embeddings = False  # as core.lora._untie_adapted_weights records it
    config.save_pretrained(out_dir)
    if (src / GENERATION_CONFIG).is_file():
        shutil.copyfile(src / GENERATION_CONFIG, out_dir / GENERATION_CONFIG)
    replaced = sorted(k for k in weight_map if any(g in adapter.replacements for g in groups[k]))
    log.info(
        "streamed %d tensors into %d shard(s) in %s (%d adapted)",
        len(entries),
        n,
        out_dir,
        len(adapter.updates),
    )
    return {
        "shards": n,
        "tensors": len(entries),
        "merged": len(adapter.updates),
        "replaced": len(replaced),
        "untied": untied,
        "total_size": total_size,
    }
