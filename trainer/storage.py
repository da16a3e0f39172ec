"""Disk space as a run sees it: free bytes, the size of a checkpoint (estimated, then measured), and the one
line that says a write failed, where, and how much room it wanted. A leaf module (no package imports)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

FP32_BYTES = 4


def free_bytes(path: Path) -> int | None:
    """Bytes free for this user on the file system holding ``path`` (its nearest existing ancestor)."""
    p = Path(path)
    while not p.exists() and p != p.parent:
        p = p.parent
    try:
        return shutil.disk_usage(p).free
    except OSError:
        return None


def tree_bytes(path: Path) -> int:
    """Bytes of the regular files under ``path`` (what a checkpoint occupies)."""
    total = 0
    for root, _, files in os.walk(path):
        for name in files:
            try:
                total += os.lstat(os.path.join(root, name)).st_size
            except OSError:
                continue
    return total


def estimate_checkpoint_bytes(n_params: int, param_bytes: int, separate_master: bool, ema_rates: int) -> int:
    """Bytes of one checkpoint, from the model and optimizer before anything was written.

    Per parameter: the module's weights (``param_bytes``: 2 in bf16, 4 in fp32), a float32 master copy where
    the optimizer keeps one apart from the module (``separate_master``: bf16, or ZeRO 1-3), Adam's two float32
    moments, one float32 value per EMA rate (partitioned, so written once over all ranks) and the export's
    float32 raw weights plus every EMA. Pickle headers and the small states add well under 1 %."""
    per_param = param_bytes + (FP32_BYTES if separate_master else 0) + 2 * FP32_BYTES
    per_param += FP32_BYTES * ema_rates + FP32_BYTES * (1 + ema_rates)
    return n_params * per_param


def fmt_bytes(n: int | None) -> str:
    """``123,456,789 bytes (123.5 MB)``: exact for a reader comparing with ``df -B1``, rounded for the eye."""
    if n is None:
        return "unknown bytes"
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= size:
            return f"{n:,} bytes ({n / size:.1f} {unit})"
    return f"{n:,} bytes"


def _os_error(err: BaseException) -> OSError | None:
    """The OSError behind ``err``: torch.save's zip writer turns a full disk into ``RuntimeError: [enforce fail
    at inline_container.cc:672] unexpected pos ...``, raised while handling the ``OSError`` it hit."""
    seen: set[int] = set()
    cur: BaseException | None = err
    while cur is not None and id(cur) not in seen:
        if isinstance(cur, OSError) and cur.errno is not None:
            return cur
        seen.add(id(cur))
        cur = cur.__cause__ or cur.__context__
    return None


def describe(err: BaseException) -> str:
    """One line for a failed write: ``OSError: [Errno 28] No space left on device`` (the file name left out:
    the caller names the directory), also when the library raised something else on top of it."""
    err = _os_error(err) or err
    if isinstance(err, OSError) and err.errno is not None:
        return f"{type(err).__name__}: [Errno {err.errno}] {err.strerror or os.strerror(err.errno)}"
    text = " ".join(str(err).split())
    return f"{type(err).__name__}: {text[:300]}" if text else type(err).__name__


def space_warning(root: Path, each: int, keep_last: int, existing: int, how: str) -> str | None:
    """The warning line when ``root`` cannot hold the checkpoints a run keeps at once (``keep_last`` complete
    ones plus the one being written, of which ``existing`` are already there), else None."""
    free = free_bytes(root)
    more = max(0, keep_last + 1 - existing) * each
    if free is None or free >= more:
        return None
    return (
        f"warning: {root} has {fmt_bytes(free)} free, but a checkpoint of this run takes {fmt_bytes(each)} "
        f"({how}) and train.keep_last={keep_last} keeps up to {keep_last + 1} at once: {fmt_bytes(more)} more "
        "are needed; saves will fail once the disk is full"
    )
