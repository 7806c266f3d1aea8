"""How every ``deltatune`` subcommand presents itself in ``--help``: a one-line summary (in the list of
commands), a description, and examples, all plain text."""

from __future__ import annotations

import argparse
import textwrap
from typing import Any

WIDTH = 88


def paragraphs(text: str) -> str:
    """``text`` re-wrapped to WIDTH columns, paragraph by paragraph (blank lines separate them)."""
    return "\n\n".join(textwrap.fill(" ".join(p.split()), WIDTH) for p in text.strip().split("\n\n"))


def command(
    sub: Any, name: str, summary: str, description: str, examples: list[str]
) -> argparse.ArgumentParser:
    """Add subcommand ``name``: ``summary`` in ``deltatune --help``, ``description`` and ``examples``
    (one command line each) in ``deltatune NAME --help``."""
    return sub.add_parser(
        name,
        help=summary,
        description=paragraphs(description),
        epilog="examples:\n" + "\n".join(f"  {e}" for e in examples),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
