"""Segments -> token ids and labels (-100 where not trained), and the tokenizer identity that keys the cache."""

from __future__ import annotations

import hashlib
import json
from typing import Any

import jinja2
from transformers import PreTrainedTokenizerFast

from core.config import DataConfig
from core.data.errors import DataError, Reject
from core.data.formats import Segments, segments
from core.data.templates import chat_template

IGNORE_INDEX = -100


def adds_bos(tokenizer: Any) -> bool:
    """True when the tokenizer's own config prepends BOS (observed, not guessed from attributes)."""
    bos = tokenizer.bos_token_id
    if bos is None:
        return False
    with_special = tokenizer("a", add_special_tokens=True)["input_ids"]
    return bool(with_special) and with_special[0] == bos


# The methods between ``tokenizer(text)`` and its Rust tokenizer (transformers 4.x and 5.x names): a class
# that overrides one of them (CodeLlama, LayoutLM, LUKE, a seq2seq tokenizer's input mode, ...) encodes
# text its own way.
_ENCODE_PATH = (
    "__call__",
    "_call_one",
    "encode_plus",
    "batch_encode_plus",
    "_encode_plus",
    "_batch_encode_plus",
    "_switch_to_input_mode",
)


def _rust_tokenizer(tokenizer: Any) -> Any | None:
    """The fast tokenizer's Rust ``tokenizers.Tokenizer`` where calling it directly gives the ids that
    ``tokenizer(texts, add_special_tokens=False)`` gives: its class encodes text as transformers' generic
    fast tokenizer does, and nothing that transformers sets before it encodes (truncation, padding,
    special-token splitting) differs. None otherwise: then the tokenizer itself is called."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None or not isinstance(tokenizer, PreTrainedTokenizerFast):
        return None
    cls = type(tokenizer)
    if any(
        getattr(cls, name, None) is not getattr(PreTrainedTokenizerFast, name, None) for name in _ENCODE_PATH
    ):
        return None
    if backend.truncation is not None or backend.padding is not None:
        return None
    if backend.encode_special_tokens != bool(getattr(tokenizer, "split_special_tokens", False)):
        return None
    return backend


def token_ids(tokenizer: Any, texts: list[str]) -> list[list[int]]:
    """The token ids of each of ``texts`` (no special tokens added), in one call: the same ids as
    ``tokenizer(text, add_special_tokens=False)`` text by text, with the per-call overhead paid once.

    A fast tokenizer's Rust ``encode_batch_fast`` (no offsets: measured ~40 % less CPU than
    ``tokenizer(texts)`` with the builtin tiny-llama tokenizer), where ``_rust_tokenizer`` says
    that it gives the same ids; else ``tokenizer(texts, add_special_tokens=False)`` (a slow tokenizer
    encodes text by text inside it). An empty text has no tokens and is not sent.
    """
    sent = [t for t in texts if t]
    if not sent:
        return [[] for _ in texts]
    rust = _rust_tokenizer(tokenizer)
    if rust is not None:
        # Older tokenizers releases have only encode_batch.
        encode = getattr(rust, "encode_batch_fast", rust.encode_batch)
        ids = iter([e.ids for e in encode(sent, add_special_tokens=False)])
    else:
        ids = iter([list(x) for x in tokenizer(sent, add_special_tokens=False)["input_ids"]])
    return [next(ids) if t else [] for t in texts]


def segment_texts(seg: Segments) -> list[str]:
    """The texts of ``seg`` in the order ``encode_row`` takes their ids: each turn's context, then answer."""
    return [text for turn in seg.turns for text in (turn.context, turn.answer)]


def encode_row(
    seg: Segments, seg_ids: list[list[int]], tokenizer: Any, cfg: DataConfig, adds_bos: bool
) -> tuple[dict, tuple[str, ...]]:
    """Token ids and labels for one row, fitted to ``cfg.max_seq_len`` by ``cfg.truncation``.

    Each turn's context and answer are tokenised separately (no BPE merge across the mask boundary), by
    the caller: ``seg_ids`` are the token ids of ``segment_texts(seg)``, so that a batch of rows is tokenised
    in one call. EOS is added once, at the end of the sequence (``cfg.add_eos``), unless a chat template
    already ended the last kept turn with it; a template's own end-of-turn marker is trained as part of
    each answer.

    Returns:
        (record, notes): notes are report keys: ``truncated`` (the row was shortened), ``lost_eos`` (it was
        cut, so it no longer ends with its EOS / end-of-turn), ``turns_dropped`` (truncate_turns kept a
        prefix of whole turns).

    Raises:
        Reject: ``too_long`` when nothing trainable fits (or with truncation ``drop``).
    """
    assert len(seg_ids) == 2 * len(seg.turns), (len(seg_ids), len(seg.turns))
    bos, eos, max_len = tokenizer.bos_token_id, tokenizer.eos_token_id, cfg.max_seq_len
    turns = list(zip(seg_ids[::2], seg_ids[1::2], strict=True))  # (context, answer) ids of each turn
    first = next((ids for pair in turns for ids in pair if ids), [])
    # A chat template may have rendered BOS already; BOS is never a target (position 0 is never predicted).
    head = [bos] if adds_bos and not (first and first[0] == bos) else []

    def tail(k: int) -> list[int]:  # the EOS after the last of k kept turns
        if not cfg.add_eos or eos is None or (seg.templated and eos in turns[k - 1][1]):
            return []
        return [eos]

    def length(k: int) -> int:
        return len(head) + sum(len(c) + len(a) for c, a in turns[:k]) + len(tail(k))

    notes: list[str] = []
    kept = len(turns)
    if length(kept) > max_len:
        if cfg.truncation == "drop":
            raise Reject("too_long")
        notes.append("truncated")
        if cfg.truncation == "truncate_turns" and seg.templated:  # chat: whole turns only
            kept = max((k for k in range(1, len(turns)) if length(k) <= max_len), default=0)
            if not kept:  # the first trainable turn does not fit
                raise Reject("too_long")
            notes.append("turns_dropped")
        elif tail(len(turns)) or seg.templated:  # truncate (or a single-turn format): the last turn is cut
            notes.append("lost_eos")  # ... and with it the EOS / end-of-turn the row ended with

    ids = list(head)
    starts: list[int] = []  # where each kept turn's answer starts
    for context, answer in turns[:kept]:
        starts.append(len(ids) + len(context))
        ids += context + answer
    end = tail(kept)
    ids += end
    # The last turn with an answer token inside the window: the row's prompt, reference and trained turn.
    last = max((j for j, start in enumerate(starts) if start < max_len), default=None)
    if last is None:
        raise Reject("too_long")
    labels = [IGNORE_INDEX] * len(head)
    for j, (context, answer) in enumerate(turns[:kept]):
        labels += context if not cfg.mask_prompt else [IGNORE_INDEX] * len(context)
        trained = not (cfg.train_on_last_turn_only and j != last) or not cfg.mask_prompt
        labels += answer if trained else [IGNORE_INDEX] * len(answer)
    labels += end
    ids, labels = ids[:max_len], labels[:max_len]
    # Position 0 is never predicted, so a row needs a trained label at position >= 1 to teach anything.
    if all(label == IGNORE_INDEX for label in labels[1:]):
        raise Reject("too_long")
    turn = seg.turns[last]
    record = {
        "input_ids": ids,
        "labels": labels,
        "prompt": turn.prompt,
        "reference": turn.reference,
        # tokens before the answer: the generation prompt (plain text has none: it is scored by loss only)
        "prompt_len": 0 if seg.scored_only else starts[last],
    }
    return record, tuple(notes)


class Encoder:
    """Rows of one source -> records, with the options of the run. Built once per source (and once per
    worker process: it pickles with its tokenizer), called per batch of rows by the prepare stage
    (``encode_batch``: one tokenizer call for the whole batch).

    ``encode(row, line)`` returns ``(record, notes)``: the record's keys are ``input_ids``, ``labels``,
    ``prompt``, ``reference``, ``prompt_len``; ``notes`` are report keys that the prepare stage counts with
    their lines (``truncated``, ``lost_eos``, ``turns_dropped``). A row that cannot be used raises
    :class:`Reject` with its reason; a chat template that refuses a row raises :class:`DataError`.
    """

    def __init__(self, cfg: DataConfig, tokenizer: Any, fmt: str | None = None, fields: dict | None = None):
        self.cfg, self.tokenizer = cfg, tokenizer
        self.format = fmt or cfg.format
        self.fields = dict(cfg.fields if fields is None else fields)
        self.adds_bos = adds_bos(tokenizer)
        self.template, self.template_name = (
            chat_template(cfg, tokenizer) if self.format == "chat" else (None, None)
        )

    def render(self, messages: list[dict], add_generation_prompt: bool) -> str:
        """``messages`` rendered by this source's chat template (text, not ids)."""
        return self.tokenizer.apply_chat_template(
            messages,
            chat_template=self.template,
            tokenize=False,
            add_generation_prompt=add_generation_prompt,
        )

    def segments_of(self, row: Any, line: int) -> Segments:
        """The turns of ``row`` (at ``line`` of its source) as this source's format and template give them.

        Raises:
            Reject: the row cannot be used.
            DataError: the chat template is not valid Jinja, or it refused the row (the message names
                ``line`` and what to set).
        """
        try:
            return segments(
                row,
                self.format,
                fields=self.fields,
                render=self.render,
                system_prompt=self.cfg.system_prompt,
                eos_text=self.tokenizer.eos_token,
            )
        except jinja2.TemplateSyntaxError as e:
            raise DataError(
                f"{self.template_name} is not a valid Jinja template ({e}); fix it or set data.chat_template "
                "to a built-in name"
            ) from None
        except jinja2.TemplateError as e:
            fixes = ["set data.chat_template to a template that accepts it"]
            if self.cfg.system_prompt is not None:
                fixes.append(
                    "set data.system_prompt: null (the template may refuse the system message it adds)"
                )
            fixes.append("or fix the rows")
            raise DataError(
                f"line {line}: {self.template_name} refused this row: {e}. {'; '.join(fixes)}"
            ) from None

    def encode(self, row: Any, line: int) -> tuple[dict, tuple[str, ...]]:
        """One row -> ``(record, notes)``, its segments tokenised one call each (``encode_batch`` gives
        the same for each row of a batch).

        Raises:
            Reject: the row cannot be used (its reason is the report key).
            DataError: the chat template refused the row (the message names ``line``).
        """
        seg = self.segments_of(row, line)
        texts = segment_texts(seg)
        ids = [list(self.tokenizer(t, add_special_tokens=False)["input_ids"]) if t else [] for t in texts]
        return encode_row(seg, ids, self.tokenizer, self.cfg, self.adds_bos)

    def encode_batch(self, rows: list[tuple[Any, int]]) -> list[tuple[dict, tuple[str, ...]] | Reject]:
        """``(row, line)`` pairs -> what ``encode`` gives for each, or the :class:`Reject` it raises, with
        the segments of every row tokenised in one call (``token_ids``): the same records and notes.

        Raises:
            DataError: the chat template refused a row (the message names its line).
        """
        out: list[Any] = []
        segs: list[tuple[int, Segments]] = []  # (position in out, segments) of the rows that have them
        for row, line in rows:
            try:
                segs.append((len(out), self.segments_of(row, line)))
                out.append(None)
            except Reject as r:
                out.append(r)
        texts = [segment_texts(seg) for _, seg in segs]
        flat = token_ids(self.tokenizer, [t for row_texts in texts for t in row_texts])
        start = 0
        for (i, seg), row_texts in zip(segs, texts, strict=True):
            seg_ids, start = flat[start : start + len(row_texts)], start + len(row_texts)
            try:
                out[i] = encode_row(seg, seg_ids, self.tokenizer, self.cfg, self.adds_bos)
            except Reject as r:
                out[i] = r
        return out


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
