"""Checkpoints: atomic saves and restores of a named set of :class:`~trainer.state.Stateful` parts.

Every part of a run that has state implements the state protocol (:mod:`trainer.state`), and the
:class:`CheckpointManager` saves and restores a *named set* of them, as torchtitan's
``CheckpointManager(states=...)`` does. Two scopes:

- ``shared``: identical on every rank (step counters, curves, the timestep history); rank 0 writes them.
- ``per_rank``: each rank its own (its part of the EMA, RNG streams, data-stream position, the
  metric window); every rank writes its own file. Restored in the order given, so put the RNG last.

A per-rank part that can continue at another world size implements
``load_state_dict_resharded(states)``, receiving the states every old rank saved, in rank order; a
part that cannot makes an elastic resume stop with one line naming it. The DeepSpeed engine (model,
optimizer, LR schedule) is a part of its own kind (:class:`EnginePart`: DeepSpeed produces its files for
the checkpoint directory); :class:`trainer.elastic.EngineCheckpoint` is it, and loads at any world size.

Layout under ``<output_dir>/checkpoints``::

    step_00001000/            DeepSpeed's files (model, optimizer, LR scheduler; ZeRO shards)
        trainer/common.pt     the shared states (rank 0)
        trainer/rank_<r>.pt   this rank's states (its slice of the EMA, data position, RNG, ...)
        export.pt             inference weights (trainer/export.py; rank 0)
        .done_rank<r>         rank r > 0 has its files on disk (empty; .failed_rank<r> if it could not)
        COMPLETE              written last, by rank 0, after every rank finished: {"step", "world_size"}
    latest                    name of the newest complete checkpoint, replaced atomically

A save is a snapshot (:meth:`CheckpointManager.begin`, collective) whose files a
:class:`trainer.ckpt_writer.Writer` writes at once or in the background; rank 0 finalizes it (``COMPLETE``,
``latest``, pruning) once every rank's files are on disk, or removes it when a rank failed. A crash mid-save
leaves a directory without ``COMPLETE`` that ``latest`` never points to; the next start removes it. Our own
files hold only tensors and plain values and are read with ``weights_only=True``.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import torch

from trainer.ckpt_writer import SaveJob, Writer, fsync_dir, write_file
from trainer.distributed import DistEnv, barrier, broadcast_object, gather_object
from trainer.state import Reshardable, Stateful

LATEST = "latest"
COMPLETE = "COMPLETE"
_TAG = re.compile(r"^step_(\d{8,})$")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used, with a one-line reason."""


class EnginePart(Protocol):
    """A part whose files a library writes into the checkpoint directory itself (the DeepSpeed engine): it
    hands them to ``sink`` (:class:`trainer.ckpt_writer.SaveJob`) instead of writing them."""

    def save(self, root: Path, tag: str, sink: SaveJob) -> None: ...

    def load(self, tag_dir: Path, saved_world_size: int) -> None: ...


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def atomic_torch_save(obj: Any, path: Path) -> None:
    """``torch.save`` to a temporary name, fsync, rename (exports, snapshots, converted checkpoints)."""
    write_file(path, lambda f: torch.save(obj, f))


def _fsync_tree(path: Path) -> None:
    """The directory entries under ``path`` (the files were fsynced as they were written)."""
    for root, _, _ in os.walk(path):
        fsync_dir(Path(root))


class CheckpointManager:
    """Saves and restores the engine plus named :class:`Stateful` parts (see the module docstring)."""

    def __init__(
        self,
        root: str | Path,
        keep_last: int,
        env: DistEnv,
        engine: EnginePart | None = None,
        shared: dict[str, Stateful] | None = None,
        per_rank: dict[str, Stateful] | None = None,
    ) -> None:
        self.root = Path(root)
        self.keep_last = keep_last
        self.env = env
        self.engine = engine
        self.shared = dict(shared or {})
        self.per_rank = dict(per_rank or {})
        self.on_complete: Callable[[SaveJob], None] | None = None
        """Rank 0, after a checkpoint became complete (on the writer thread when asynchronous)."""
        self.writer = Writer(
            env.rank,
            env.world_size,
            self._finalize,
            self._discard,
            gather_object,
            lambda value: broadcast_object(value, env.device),
        )

    # ------------------------------------------------------------------ discovery
    def complete_tags(self) -> list[str]:
        if not self.root.is_dir():
            return []
        tags = [p.name for p in self.root.iterdir() if _TAG.match(p.name) and (p / COMPLETE).is_file()]
        return sorted(tags)

    def latest(self) -> Path | None:
        pointer = self.root / LATEST
        if pointer.is_file():
            tag = pointer.read_text().strip()
            if (self.root / tag / COMPLETE).is_file():
                return self.root / tag
        tags = self.complete_tags()  # pointer missing or stale: fall back to the newest complete one
        return self.root / tags[-1] if tags else None

    def resolve(self, resume: str | None) -> Path | None:
        """``auto`` → newest complete checkpoint or None; ``none``/None → None; else a checkpoint dir."""
        if resume is None or resume == "none":
            return None
        if resume == "auto":
            return self.latest()
        path = Path(resume)
        if (path / LATEST).is_file():  # a checkpoints root was given
            found = CheckpointManager(path, self.keep_last, self.env).latest()
            if found is None:
                raise CheckpointError(f"--resume {resume}: no complete checkpoint under it")
            return found
        if not path.exists():
            raise CheckpointError(f"--resume {resume}: checkpoint not found")
        if not (path / COMPLETE).is_file():
            raise CheckpointError(f"--resume {resume}: incomplete checkpoint (no {COMPLETE} marker)")
        return path

    # ------------------------------------------------------------------ save
    def begin(self, step: int, background: bool) -> SaveJob:
        """Collective: the snapshot of every part for a checkpoint at ``step``, handed to a
        :class:`~trainer.ckpt_writer.SaveJob` (written at once, or by :attr:`writer` in the background once
        :meth:`Writer.submit` is called). The caller may ``add`` more files (the export) before submitting."""
        tag = tag_for(step)
        tag_dir = self.root / tag
        if self.env.is_main:
            if tag_dir.exists():  # a leftover of an interrupted save at this very step
                shutil.rmtree(tag_dir)
            self.root.mkdir(parents=True, exist_ok=True)
        barrier()
        job = self.writer.new_job(tag_dir, step, background)
        job.makedirs(tag_dir / "trainer")
        if self.engine is not None:
            self.engine.save(self.root, tag, job)
        own = tag_dir / "trainer"
        job.add(own / f"rank_{self.env.rank}.pt", {k: v.state_dict() for k, v in self.per_rank.items()})
        if self.env.is_main:
            job.add(own / "common.pt", {k: v.state_dict() for k, v in self.shared.items()})
        return job

    def _finalize(self, job: SaveJob) -> None:
        """Rank 0, once every rank's files are on disk: COMPLETE, then ``latest``, then pruning."""
        _fsync_tree(job.tag_dir)
        meta = {"step": job.step, "world_size": self.env.world_size}
        atomic_write_text(job.tag_dir / COMPLETE, json.dumps(meta))
        atomic_write_text(self.root / LATEST, job.tag_dir.name)
        # From here the checkpoint is complete and named by `latest`: nothing that follows may undo it (a
        # failure raised out of here discards the save, and the older checkpoints may be pruned already).
        try:
            self._prune(keep=job.tag_dir.name)
            if self.on_complete is not None:
                self.on_complete(job)  # prints: stdout on a full disk or a closed pipe raises OSError
        except Exception as err:  # noqa: BLE001 - reported; the checkpoint stands
            with contextlib.suppress(OSError):
                print(f"warning: after completing {job.tag_dir}: {type(err).__name__}: {err}", file=sys.stderr)

    def _discard(self, job: SaveJob) -> None:
        """Rank 0: a save that failed on some rank leaves nothing behind (its space is what a retry needs)."""
        shutil.rmtree(job.tag_dir, ignore_errors=True)

    def remove_incomplete(self) -> list[str]:
        """Rank 0, at start: remove what interrupted saves left (they hold space and are never resumed)."""
        if not self.root.is_dir():
            return []
        gone = [p.name for p in self.root.iterdir() if _TAG.match(p.name) and not (p / COMPLETE).is_file()]
        for name in gone:
            shutil.rmtree(self.root / name, ignore_errors=True)
        return gone

    def _prune(self, keep: str) -> None:
        complete = self.complete_tags()
        for tag in complete[: max(0, len(complete) - self.keep_last)]:
            if tag != keep:
                shutil.rmtree(self.root / tag, ignore_errors=True)
        for p in self.root.iterdir():  # interrupted saves
            if _TAG.match(p.name) and not (p / COMPLETE).is_file() and p.name != keep:
                shutil.rmtree(p, ignore_errors=True)

    # ------------------------------------------------------------------ load
    @staticmethod
    def saved_world_size(tag_dir: Path) -> int:
        try:
            return int(json.loads((tag_dir / COMPLETE).read_text())["world_size"])
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise CheckpointError(f"{tag_dir / COMPLETE}: unreadable ({type(err).__name__}: {err})") from None

    def load(self, tag_dir: Path) -> None:
        """Collective. Restores the engine, then the per-rank parts in order, then the shared ones. A checkpoint
        saved by another number of ranks is resharded: every per-rank part must be :class:`Reshardable`."""
        saved_world, world = self.saved_world_size(tag_dir), self.env.world_size
        own = tag_dir / "trainer"
        if self.engine is not None:
            self.engine.load(tag_dir, saved_world)
        if saved_world == world:
            mine = load_plain(own / f"rank_{self.env.rank}.pt")
            for name, part in self.per_rank.items():
                part.load_state_dict(_part(mine, name, own / f"rank_{self.env.rank}.pt"))
        else:
            saved = [load_plain(own / f"rank_{r}.pt") for r in range(saved_world)]
            for name, part in self.per_rank.items():
                if not isinstance(part, Reshardable):
                    raise CheckpointError(
                        f"{tag_dir}: saved by {saved_world} ranks, resumed on {world}: its '{name}' state "
                        "cannot change world size; resume on the same number of ranks"
                    )
                part.load_state_dict_resharded([_part(s, name, own / f"rank_{r}.pt") for r, s in enumerate(saved)])
        common = load_plain(own / "common.pt")
        for name, part in self.shared.items():
            part.load_state_dict(_part(common, name, own / "common.pt"))


OPTIONAL_PARTS = {
    "phema": "train.phema was turned on after this run started; a run keeps its post-hoc EMA setting (start a new "
    "run with train.init_from, or resume with train.phema.enabled=false)",
}
"""Parts that exist only with a setting on: why a checkpoint may lack one."""


def _part(states: dict[str, Any], name: str, path: Path) -> dict[str, Any]:
    if name not in states:
        if name in OPTIONAL_PARTS:
            raise CheckpointError(f"{path}: has no '{name}' state: {OPTIONAL_PARTS[name]}")
        raise CheckpointError(f"{path}: has no '{name}' state (saved by another version of the trainer?)")
    return states[name]


def load_plain(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise CheckpointError(f"{path}: missing (checkpoint incomplete or from another tool)")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unpickling failure is a corrupt file to the user
        raise CheckpointError(f"{path}: unreadable ({type(err).__name__}: {err})") from None
