"""Prepared rows as text with the trained tokens marked, and the prepare report in a few lines.

print(render_sample(load_split(prep.train_dir)[0], tokenizer, color=False))   # what the loss sees
deltatune prepare [CONFIG] --show 3                                           # the same, from the CLI
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import IO, Any

from core.data.encode import IGNORE_INDEX

# Trained tokens (label != -100) between these brackets when there is no colour (a file, a test, a pipe).
TRAINED_OPEN, TRAINED_CLOSE = "⟦", "⟧"
# On a terminal: trained tokens bold green (ANSI SGR 1;32), the rest as printed; reset after each span.
ANSI_TRAINED, ANSI_RESET = "\x1b[1;32m", "\x1b[0m"


def use_color(stream: IO[str], choice: str = "auto") -> bool:
    """``always``/``never``, or ``auto``: colour on a terminal unless ``$NO_COLOR`` is set (no-color.org)."""
    if choice != "auto":
        return choice == "always"
    return stream.isatty() and not os.environ.get("NO_COLOR")


def sub_rows(row: Mapping[str, Any]) -> list[tuple[int, int]]:
    """``[start, end)`` of each training row inside ``row``: one span, or one per packed row where its
    ``position_ids`` restart at 0 (core/data/packing.py)."""
    n = len(row["input_ids"])
    positions = row.get("position_ids")
    if positions is None or n == 0:
        return [(0, n)]
    starts = [i for i, p in enumerate(positions) if p == 0] or [0]
    if starts[0] != 0:
        starts.insert(0, 0)
    return list(zip(starts, [*starts[1:], n], strict=True))


def spans(input_ids: Sequence[int], labels: Sequence[int]) -> list[tuple[int, int, bool]]:
    """Runs of positions with the same trained flag (label != -100): ``[(start, end, trained), ...]``."""
    out: list[tuple[int, int, bool]] = []
    for i, label in enumerate(labels[: len(input_ids)]):
        trained = label != IGNORE_INDEX
        if out and out[-1][2] == trained:
            out[-1] = (out[-1][0], i + 1, trained)
        else:
            out.append((i, i + 1, trained))
    return out


def _decode(tokenizer: Any, ids: Sequence[int]) -> str:
    return tokenizer.decode(list(ids), skip_special_tokens=False, clean_up_tokenization_spaces=False)


def _pieces(tokenizer: Any, ids: Sequence[int], runs: list[tuple[int, int, bool]]) -> list[tuple[str, bool]]:
    """The text of each run. Decoding each run alone can lose a leading space (SentencePiece) or split a
    character whose bytes straddle the boundary, so a run is the difference of the decoded prefixes when
    decoding is prefix-stable, else decoded alone."""
    out: list[tuple[str, bool]] = []
    done = ""
    for start, end, trained in runs:
        upto = _decode(tokenizer, ids[:end])
        if upto.startswith(done):
            out.append((upto[len(done) :], trained))
        else:
            out.append((_decode(tokenizer, ids[start:end]), trained))
        done = upto
    return out


def render_sample(row: Mapping[str, Any], tokenizer: Any, *, color: bool) -> str:
    """One prepared row as text with its trained tokens marked, and its token counts.

    Args:
        row: a row of a prepared split (``input_ids``, ``labels``; ``source_line`` and a packed row's
            ``position_ids`` when present).
        tokenizer: the tokenizer that prepared it.
        color: mark trained tokens with ANSI colour (a terminal), else between ``⟦`` and ``⟧``.

    Returns:
        Per training row (each packed row separately), a header line
        ``[line L] T tokens, K trained, ends with EOS|no EOS at the end`` and the decoded text.
    """
    ids, labels = list(row["input_ids"]), list(row["labels"])
    eos = getattr(tokenizer, "eos_token_id", None)
    parts = sub_rows(row)
    blocks = []
    for k, (a, b) in enumerate(parts):
        sub_ids, sub_labels = ids[a:b], labels[a:b]
        trained = sum(label != IGNORE_INDEX for label in sub_labels)
        head = []
        if len(parts) > 1:
            head.append(f"packed row {k + 1}/{len(parts)}:")
        if row.get("source_line") is not None and len(parts) == 1:
            head.append(f"line {row['source_line']}:")
        head.append(f"{len(sub_ids)} tokens, {trained} trained")
        if eos is not None:
            head[-1] += ", ends with EOS" if sub_ids and sub_ids[-1] == eos else ", no EOS at the end"
        text = []
        for piece, is_trained in _pieces(tokenizer, sub_ids, spans(sub_ids, sub_labels)):
            if not is_trained:
                text.append(piece)
            elif color:
                text.append(f"{ANSI_TRAINED}{piece}{ANSI_RESET}")
            else:
                text.append(f"{TRAINED_OPEN}{piece}{TRAINED_CLOSE}")
        blocks.append(" ".join(head) + "\n" + "".join(text))
    return "\n".join(blocks)


def _count(value: Any) -> int | None:
    """A report entry as a number of rows: a count, a list of line numbers, or a dict with ``count``."""
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, list):
        return len(value)
    if isinstance(value, Mapping) and isinstance(value.get("count"), int):
        return value["count"]
    return None


def note_count(part: Mapping[str, Any], note: str) -> int | None:
    """How many kept rows carry ``note`` (``truncated``, ``lost_eos``, ``turns_dropped``, ...): the exact
    ``note_counts`` of the report (its line lists are capped), else the length of the note's lines."""
    counts = part.get("note_counts")
    if isinstance(counts, Mapping):
        return int(counts.get(note, 0))
    return _count(part.get(note))


def _rejected(part: Mapping[str, Any]) -> str:
    counts = part.get("rejected_counts")
    if counts is None:
        counts = {k: _count(v) for k, v in (part.get("rejected") or {}).items()}
    total = sum(v or 0 for v in counts.values())
    if not total:
        return "0"
    lines = part.get("rejected") or {}
    by = []
    for reason, n in sorted(counts.items(), key=lambda kv: -(kv[1] or 0)):
        seen = lines.get(reason) if isinstance(lines, Mapping) else None
        where = f", e.g. line {', '.join(map(str, seen[:3]))}" if isinstance(seen, list) and seen else ""
        by.append(f"{reason}: {n}{where}")
    return f"{total} ({'; '.join(by)})"


def summarize(report: Mapping[str, Any], report_path: str | os.PathLike[str]) -> str:
    """The prepare report (prepare_report.json, docs/data.md) in a few lines: rows kept per split,
    rejected by reason, truncated, duplicates, eval/train overlap, per source of a mixture, packing,
    whether the cache was hit, and where the full report is."""
    lines = [
        f"prepared {report.get('source')}: {report.get('train')} train / {report.get('eval')} eval rows "
        f"({report.get('kept')} of {report.get('total')} rows kept)",
        f"rejected: {_rejected(report)}",
    ]
    for i, part in enumerate(report.get("sources") or []):
        lines.append(
            f"  source {i} {part.get('source')}: {part.get('kept')} of {part.get('total')} rows kept, "
            f"{part.get('used')} used, rejected: {_rejected(part)}"
        )
    if report.get("eval_source"):
        ev = report["eval_source"]
        lines.append(
            f"eval file {ev.get('source')}: {ev.get('kept')} of {ev.get('total')} rows kept, "
            f"rejected: {_rejected(ev)}"
        )
    truncated = note_count(report, "truncated")
    if truncated is not None:
        line = f"truncated: {truncated} row(s) longer than max_seq_len={report.get('max_seq_len')}"
        details = [
            f"{n} {what}"
            for note, what in (("lost_eos", "lost their EOS"), ("turns_dropped", "kept fewer turns"))
            if (n := note_count(report, note))
        ]
        lines.append(line + (f" ({', '.join(details)})" if details else ""))
    other = {
        k: v
        for k, v in (report.get("note_counts") or {}).items()
        if k not in ("truncated", "lost_eos", "turns_dropped") and v
    }
    if other:
        lines.append("notes: " + ", ".join(f"{k}: {v}" for k, v in sorted(other.items())))
    if "duplicate_count" in report:
        dropped = " (dropped)" if report.get("duplicates_dropped") else " (kept: data.drop_duplicates=false)"
        lines.append(f"duplicates: {report['duplicate_count']}{dropped if report['duplicate_count'] else ''}")
    overlap = _count(report.get("eval_overlap"))
    if overlap:
        lines.append(f"eval rows also in train: {overlap}")
    if "train_tokens" in report:
        lines.append(f"train tokens: {report['train_tokens']}, trained: {report.get('train_trained_tokens')}")
    if isinstance(report.get("packing"), Mapping):
        stats = ", ".join(f"{k}: {v}" for k, v in report["packing"].items() if not isinstance(v, list | dict))
        lines.append(f"packing: {stats}")
    hit = report.get("cache_hit")
    fingerprint = str(report.get("fingerprint") or "")[:12]
    lines.append(f"cache: {'hit' if hit else 'built'} {fingerprint} ({report.get('cache_path')})")
    lines.append(f"report: {report_path}")
    return "\n".join(lines)
