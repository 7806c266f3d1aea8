"""Segments -> token ids and labels (-100 where not trained), and the tokenizer identity that keys the cache."""

from __future__ import annotations

import hashlib
import json
from typing import Any

from core.config import DataConfig
from core.data.errors import Reject
from core.data.formats import Segments, segments

IGNORE_INDEX = -100


def adds_bos(tokenizer: Any) -> bool:
    """True when the tokenizer's own config prepends BOS (observed, not guessed from attributes)."""
    bos = tokenizer.bos_token_id
    if bos is None:
        return False
    with_special = tokenizer("a", add_special_tokens=True)["input_ids"]
    return bool(with_special) and with_special[0] == bos


def _encode(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"]) if text else []


def encode_row(seg: Segments, tokenizer: Any, cfg: DataConfig, adds_bos: bool) -> tuple[dict, bool]:
    """Token ids and labels for one row; returns (record, truncated). Raises Reject('too_long')."""
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    pieces = [(_encode(tokenizer, text), trained) for text, trained in seg.pieces]
    ids: list[int] = []
    labels: list[int] = []
    first = next((p for p, _ in pieces if p), [])
    if adds_bos and not (first and first[0] == bos):  # a chat template may have rendered BOS already
        ids.append(bos)
        labels.append(IGNORE_INDEX)  # BOS is never a target: a causal LM never predicts position 0
    prompt_len = len(ids)  # tokens before the last trained piece: the generation prompt
    last_trained = max(i for i, (_, trained) in enumerate(pieces) if trained)
    for i, (piece, trained) in enumerate(pieces):
        if i == last_trained and cfg.format != "text":
            prompt_len = len(ids)
        ids += piece
        labels += piece if trained or not cfg.mask_prompt else [IGNORE_INDEX] * len(piece)
        if trained and cfg.add_eos and not (seg.templated and eos in piece):
            ids.append(eos)
            labels.append(eos)
    if cfg.format == "text":
        prompt_len = 0  # plain text has no prompt: evaluation scores it by loss only, no generation
    truncated = len(ids) > cfg.max_seq_len
    ids, labels = ids[: cfg.max_seq_len], labels[: cfg.max_seq_len]
    # Position 0 is never predicted, so a row needs a trained label at position >= 1 to teach anything.
    if prompt_len >= cfg.max_seq_len or all(label == IGNORE_INDEX for label in labels[1:]):
        raise Reject("too_long")
    record = {
        "input_ids": ids,
        "labels": labels,
        "prompt": seg.prompt,
        "reference": seg.reference,
        "prompt_len": prompt_len,
    }
    return record, truncated


class Encoder:
    """Rows of one source -> records, with the options of the run. Built once per source (and once per
    worker process: it pickles with its tokenizer), called per row by the prepare stage.

    ``encode(row, line)`` returns ``(record, notes)``: the record's keys are ``input_ids``, ``labels``,
    ``prompt``, ``reference``, ``prompt_len``; ``notes`` are report keys that the prepare stage counts with
    their lines (``truncated``, ...). A row that cannot be used raises :class:`Reject` with its reason.
    """

    def __init__(self, cfg: DataConfig, tokenizer: Any, fmt: str | None = None, fields: dict | None = None):
        self.cfg, self.tokenizer = cfg, tokenizer
        self.format = fmt or cfg.format
        self.fields = dict(cfg.fields if fields is None else fields)
        self.adds_bos = adds_bos(tokenizer)

    def encode(self, row: Any, line: int) -> tuple[dict, tuple[str, ...]]:
        record, truncated = encode_row(
            segments(row, self.format, self.tokenizer), self.tokenizer, self.cfg, self.adds_bos
        )
        return record, ("truncated",) if truncated else ()


def tokenizer_identity(tokenizer: Any) -> str:
    """A sha256 of everything about ``tokenizer`` that changes token ids or templates."""
    h = hashlib.sha256(type(tokenizer).__name__.encode())
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        h.update(backend.to_str().encode())
    else:  # slow tokenizer: the vocabulary is the best stable proxy
        h.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    special = {
        "bos": tokenizer.bos_token_id,
        "eos": tokenizer.eos_token_id,
        "pad": tokenizer.pad_token_id,
        "adds_bos": adds_bos(tokenizer),
        "chat_template": getattr(tokenizer, "chat_template", None),
    }
    h.update(json.dumps(special, sort_keys=True, default=str).encode())
    return h.hexdigest()
