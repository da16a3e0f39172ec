"""Resumable work cut into numbered parts over ranks: what sampling and bits/dim have in common.

A job (50,000 samples, or bits/dim over 10,000 test images) is cut into parts of fixed content that do
not depend on the number of ranks: part ``k`` always covers the same samples or images and draws its
noise from a generator seeded by ``(seed, k)``. Each rank computes the pending parts assigned to it and
writes each one as ``parts/part_<k>.npz`` (temporary name, then rename), so a killed job rerun with the
same command redoes only the parts that were never written, on any number of ranks. Rank 0 then merges
the parts in index order, so the result is the same bit for bit whatever the world size.

``plan.json`` records the settings the parts were made with; rerunning into the same directory with
different settings is refused in one line rather than mixing two jobs' parts.
"""

from __future__ import annotations

import json
import os
import tempfile
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from trainer.storage import describe, fmt_bytes, free_bytes

PLAN_NAME = "plan.json"


class PartsError(ValueError):
    """The output directory belongs to another job, or a part file is unreadable; one line."""


def part_seed(seed: int, index: int) -> int:
    """A 63-bit seed for part ``index`` of a job seeded ``seed``: independent streams per part, the same
    on every rank and every rerun (SeedSequence mixes the pair; adjacent seeds do not give related streams)."""
    return int(np.random.SeedSequence([seed, index]).generate_state(1, dtype=np.uint64)[0] >> np.uint64(1))


def split_range(total: int, part_size: int) -> list[tuple[int, int]]:
    """``[lo, hi)`` of every part: ``part_size`` items each, the last one shorter."""
    if total < 0 or part_size <= 0:
        raise ValueError(f"cannot split {total} items into parts of {part_size}")
    return [(lo, min(total, lo + part_size)) for lo in range(0, total, part_size)]


@dataclass
class PartStore:
    """The part files of one job in ``root``."""

    root: Path
    num_parts: int

    @property
    def parts_dir(self) -> Path:
        return self.root / "parts"

    def path(self, index: int) -> Path:
        return self.parts_dir / f"part_{index:06d}.npz"

    def claim(self, plan: dict[str, Any]) -> None:
        """Create the directory for ``plan`` or check that it already holds this plan's parts (rank 0)."""
        self.parts_dir.mkdir(parents=True, exist_ok=True)
        plan_path = self.root / PLAN_NAME
        if plan_path.exists():
            try:
                old = json.loads(plan_path.read_text())
            except (OSError, ValueError) as err:
                raise PartsError(f"{plan_path}: unreadable ({err})") from None
            changed = sorted(k for k in set(old) | set(plan) if old.get(k) != plan.get(k))
            if changed:
                k = changed[0]
                raise PartsError(
                    f"{self.root} holds parts of another job ({k}: {old.get(k)!r} there, {plan.get(k)!r} now); "
                    "pass another --out or delete it"
                )
            return
        _atomic_write(plan_path, json.dumps(plan, indent=1, sort_keys=True).encode())

    def done(self) -> set[int]:
        """Parts already written (a part file exists only once complete: it is renamed into place)."""
        found = set()
        for p in self.parts_dir.glob("part_*.npz"):
            stem = p.stem.removeprefix("part_")
            if stem.isdigit() and int(stem) < self.num_parts:
                found.add(int(stem))
        return found

    def assign(
        self, plan: dict[str, Any], rank: int, world_size: int, broadcast: Callable[[Any], Any] = lambda v: v
    ) -> list[int]:
        """This rank's share of the pending parts (every ``world_size``-th one).

        Rank 0 claims the directory and lists what is done; ``broadcast`` (rank 0's value to every rank)
        hands its decision to all ranks, since ranks listing the directory themselves could see different
        parts written, and a refusal reaches every rank as the same one line."""
        decision: tuple[str | None, list[int]] = (None, [])
        if rank == 0:
            try:
                self.claim(plan)
                done = self.done()
                decision = (None, [k for k in range(self.num_parts) if k not in done])
            except (PartsError, OSError) as err:
                decision = (str(err), [])
        problem, pending = broadcast(decision)
        if problem:
            raise PartsError(problem)
        if rank == 0 and len(pending) < self.num_parts:
            print(f"resuming: {self.num_parts - len(pending)} of {self.num_parts} parts already in {self.parts_dir}")
        return pending[rank::world_size]

    def write(self, index: int, **arrays: np.ndarray) -> Path:
        """Write part ``index`` atomically: a kill leaves either no file or the whole one."""
        target = self.path(index)
        tmp = None
        try:
            fd, tmp = tempfile.mkstemp(dir=self.parts_dir, prefix=f".part_{index:06d}.", suffix=".npz")
            with os.fdopen(fd, "wb") as f:
                np.savez(f, **arrays)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, target)
        except OSError as err:  # a full disk or a quota: one line, the parts written so far are kept
            if tmp is not None:
                Path(tmp).unlink(missing_ok=True)
            need = sum(a.nbytes for a in arrays.values())
            raise PartsError(
                f"{target}: not written ({describe(err)}): it needs about {fmt_bytes(need)}, "
                f"{fmt_bytes(free_bytes(self.parts_dir))} free; free space and rerun the same command to continue"
            ) from None
        except BaseException:
            if tmp is not None:
                Path(tmp).unlink(missing_ok=True)
            raise
        return target

    def read(self, index: int) -> dict[str, np.ndarray]:
        path = self.path(index)
        try:
            with np.load(path, allow_pickle=False) as data:
                return {k: data[k] for k in data.files}
        except (OSError, ValueError, zipfile.BadZipFile, EOFError) as err:
            raise PartsError(f"{path}: unreadable part ({err}); delete it and rerun to redo it") from None

    def read_all(self) -> Iterator[tuple[int, dict[str, np.ndarray]]]:
        """Every part in index order; a missing one is an error (call after all ranks finished)."""
        missing = [k for k in range(self.num_parts) if not self.path(k).exists()]
        if missing:
            raise PartsError(f"{self.parts_dir}: {len(missing)} part(s) missing, e.g. part {missing[0]}")
        for k in range(self.num_parts):
            yield k, self.read(k)


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)
