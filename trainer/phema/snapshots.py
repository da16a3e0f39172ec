"""Snapshots of the power-function EMA profiles, written during training into ``<output_dir>/phema``.

Layout::

    phema/
        snap_00001000/rank_<r>.pt   each rank's shadows of every profile (PowerEMA.state_dict, plus the step
                                    and every parameter's full shape): every rank writes its own part,
                                    partitioned as the EMA is (trainer/ema.py: its ZeRO-3 shards, or its
                                    slice of the flattened parameters under ZeRO-0/1/2)
        index.json                  {"snapshots": [{"step", "images", "t", "sigma_rels", "world_size",
                                    "zero3", "dir", "files"}, ...]}, oldest first

Every file is written to a temporary name and renamed; the index lists a snapshot only after every rank's
file is on disk and is itself replaced atomically, so a crash mid-snapshot (or mid-prune) leaves an unlisted
directory, never read, that the next snapshot removes. A snapshot that cannot be written (a full disk) is one
warning line on every rank and is skipped: training goes on, and reconstruction works from the snapshots
that exist (its fit error says when the gaps matter). Retention (``train.phema.keep``) is the snapshots' own:
checkpoint pruning never touches this directory. A resume re-trains steps past its checkpoint, so
snapshots newer than the step being written (from the lost timeline) are dropped from the index first.
"""

from __future__ import annotations

import json
import math
import shutil
import sys
from pathlib import Path
from typing import Any

from trainer.checkpoint import atomic_torch_save, atomic_write_text
from trainer.ckpt_writer import fsync_dir
from trainer.distributed import DistEnv, any_rank
from trainer.phema.averages import PowerEMA
from trainer.storage import describe

INDEX = "index.json"
SNAPSHOT_DIR = "phema"


class SnapshotError(RuntimeError):
    """Missing or inconsistent snapshots, with a one-line reason."""


def snapshot_tag(step: int) -> str:
    return f"snap_{step:08d}"


def read_index(root: Path) -> list[dict[str, Any]]:
    """The snapshot entries of ``root`` (a ``phema`` directory), oldest first."""
    path = root / INDEX
    if not path.is_file():
        raise SnapshotError(f"{path}: missing (no post-hoc EMA snapshots in this run: train.phema.enabled?)")
    try:
        entries = json.loads(path.read_text())["snapshots"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise SnapshotError(f"{path}: unreadable ({type(err).__name__}: {err})") from None
    return list(entries)


def check_index(root: Path, entries: list[dict[str, Any]]) -> None:
    """Every listed file exists and no complete snapshot directory is missing from the index (stale)."""
    listed = {e["dir"] for e in entries}
    for e in entries:
        for name in e["files"]:
            if not (root / e["dir"] / name).is_file():
                raise SnapshotError(f"{root / e['dir'] / name}: listed in {root / INDEX} but missing")
    steps = [e["step"] for e in entries]
    if steps != sorted(set(steps)):
        raise SnapshotError(f"{root / INDEX}: stale index (steps not strictly increasing: {steps})")
    newest = max(steps, default=-1)
    for d in sorted(root.glob("snap_*")):
        if d.name not in listed and d.is_dir() and int(d.name.removeprefix("snap_")) < newest:
            raise SnapshotError(
                f"{root / INDEX}: stale index (does not list {d.name}, older than its newest; a leftover of an "
                "interrupted write or prune is safe to remove, and the run's next snapshot removes it)"
            )


class SnapshotWriter:
    """Writes snapshots of ``phema`` (collective: every rank calls :meth:`write`)."""

    def __init__(self, root: Path, phema: PowerEMA, env: DistEnv, keep: int) -> None:
        self.root, self.phema, self.env, self.keep = root, phema, env, keep

    def write(self, step: int, images: int) -> Path | None:
        """The snapshot of step ``step`` (collective); None when it could not be written (warned, skipped)."""
        tag = snapshot_tag(step)
        tag_dir = self.root / tag
        error = None
        if self.env.is_main:
            try:
                self._prepare(step, tag_dir)
            except (OSError, SnapshotError) as err:
                error = describe(err)
        if not self._agree(error, step, tag_dir):
            return None
        t = self.phema.steps()
        # Every rank holds a part of the average (trainer.ema's layouts), so every rank writes one.
        payload = {**self.phema.state_dict(), "step": step, "shapes": self.phema.full_shapes()}
        try:
            atomic_torch_save(payload, tag_dir / f"rank_{self.env.rank}.pt")  # fsynced
            fsync_dir(tag_dir)  # its name too (not os.sync: that would flush a background checkpoint as well)
        except OSError as err:
            error = describe(err)
        if not self._agree(error, step, tag_dir):
            return None
        if self.env.is_main:
            entry = {
                "step": step,
                "images": images,
                "t": t,
                "sigma_rels": self.phema.sigma_rels,
                "world_size": self.env.world_size,
                "zero3": self.phema.zero3,
                "dir": tag,
                "files": [f"rank_{r}.pt" for r in range(self.env.world_size)],
            }
            try:
                entries = [*read_index(self.root), entry] if (self.root / INDEX).is_file() else [entry]
                pruned = entries[: max(0, len(entries) - self.keep)] if self.keep else []
                self._write_index(entries[len(pruned) :])
                for e in pruned:
                    shutil.rmtree(self.root / e["dir"], ignore_errors=True)
            except (OSError, SnapshotError) as err:
                error = describe(err)
        return tag_dir if self._agree(error, step, tag_dir) else None

    def _prepare(self, step: int, tag_dir: Path) -> None:
        """Rank 0: the index without the lost timeline's snapshots, no leftovers, an empty ``tag_dir``."""
        self.root.mkdir(parents=True, exist_ok=True)
        entries = read_index(self.root) if (self.root / INDEX).is_file() else []
        # Snapshots at or after this step belong to a timeline a resume is re-training.
        kept = [e for e in entries if e["step"] < step]
        if len(kept) < len(entries):
            self._write_index(kept)
        listed = {e["dir"] for e in kept}
        for d in self.root.glob("snap_*"):  # the dropped ones, and leftovers of interrupted writes or prunes
            if d.is_dir() and d.name not in listed:
                shutil.rmtree(d)
        tag_dir.mkdir()

    def _agree(self, error: str | None, step: int, tag_dir: Path) -> bool:
        """Collective: True when no rank failed; otherwise every rank warns (its own error, if any) and rank 0
        removes the partial directory (never listed)."""
        if not any_rank(error is not None, self.env.device):
            return True
        why = error or "another rank could not write its part"
        print(
            f"warning: rank {self.env.rank}: post-hoc EMA snapshot of step {step} not written ({why}); skipped, "
            "training goes on",
            file=sys.stderr,
            flush=True,
        )
        if self.env.is_main:
            shutil.rmtree(tag_dir, ignore_errors=True)
        return False

    def _write_index(self, entries: list[dict[str, Any]]) -> None:
        atomic_write_text(self.root / INDEX, json.dumps({"snapshots": entries}, indent=1))


def snapshot_interval(every_steps: int, every_images: int | None, global_batch: int) -> int:
    """The snapshot interval in optimizer steps (an interval in images is rounded to whole steps)."""
    return every_steps if every_images is None else max(1, round(every_images / global_batch))


def disk_cost_line(
    n_params: int, sigma_rels: list[float], every: int, total_steps: int, keep: int, root: Path, global_batch: int
) -> str:
    """One line: bytes per snapshot (float32 shadows of every profile) and for the whole run."""
    per = 4 * n_params * len(sigma_rels)
    count = math.ceil(total_steps / every)  # the last step writes one too
    kept = min(count, keep) if keep else count
    return (
        f"post-hoc EMA: profiles sigma_rel {sigma_rels}, a snapshot every {every} steps "
        f"({every * global_batch} images) into {root}: {per / 2**20:.2f} MiB per snapshot, "
        f"{kept * per / 2**20:.1f} MiB for the run ({kept} of {count} snapshots kept)"
    )
