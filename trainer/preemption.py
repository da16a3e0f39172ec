"""Graceful stop on preemption or time limit.

SLURM sends SIGTERM at preemption, and submitit asks it to send SIGUSR2 shortly before the time
limit. Doing a collective checkpoint inside a signal handler is unsafe (the other ranks are in the
middle of a step), so the handler only sets a flag; the flag rides in each step's verdict all-reduce
(a MAX over ranks), so every rank learns of it at the same step, saves, and returns ``EXIT_PREEMPTED``.
The launcher may then hand the signal on to the handler that was installed before ours
(submitit's requeue logic) with :func:`forward_to_previous_handler`.
"""

from __future__ import annotations

import signal
from types import FrameType
from typing import Any

EXIT_PREEMPTED = 75
"""Exit status of a run stopped by a signal after saving its checkpoint (EX_TEMPFAIL: try again)."""

STOP_SIGNALS = (signal.SIGUSR2, signal.SIGTERM)

_received: list[int] = []
_previous: dict[int, Any] = {}


def _on_signal(signum: int, frame: FrameType | None) -> None:
    _received.append(signum)


def install() -> None:
    """Route the stop signals to the flag, remembering the handlers they replace."""
    _received.clear()
    for sig in STOP_SIGNALS:
        current = signal.getsignal(sig)
        if current is not _on_signal:
            _previous[sig] = current
        signal.signal(sig, _on_signal)


def uninstall() -> None:
    for sig, handler in _previous.items():
        signal.signal(sig, handler if handler is not None else signal.SIG_DFL)
    _previous.clear()


def requested() -> bool:
    return bool(_received)


def received_signal() -> int | None:
    return _received[0] if _received else None


def forward_to_previous_handler() -> bool:
    """Call the handler our own replaced (e.g. submitit's checkpoint-and-requeue) for the signal we got.

    Returns False when there is nothing to forward (no signal, or the previous handler was a default).
    """
    signum = received_signal()
    if signum is None:
        return False
    # SLURM/submitit may deliver SIGTERM and SIGUSR2 together; USR2 is the one whose handler requeues.
    if signal.SIGUSR2 in _received:
        signum = signal.SIGUSR2
    handler = _previous.get(signum)
    uninstall()
    if callable(handler):
        handler(signum, None)
        return True
    return False
