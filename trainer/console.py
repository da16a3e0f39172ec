"""What a run prints: rank 0's log lines and durations as people read them. A leaf module."""

from __future__ import annotations

import sys


def say(is_main: bool, msg: str) -> None:
    """Print ``msg`` on rank 0 only (every rank runs the same code; one copy of each line is enough)."""
    if is_main:
        print(msg, flush=True)


def warn(msg: str) -> None:
    """A warning from this rank, on stderr (rank-specific: printed wherever it happens)."""
    print(msg, file=sys.stderr, flush=True)


def fmt_time(seconds: float) -> str:
    """``1h02m03s`` / ``2m03s``."""
    seconds = int(max(0, seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"


def one_line(err: BaseException) -> str:
    """``Type: the first line of its message`` (at most 300 characters of it)."""
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0][:300] if text else ''}"
