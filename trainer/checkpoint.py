"""Checkpoints: one state protocol, atomic saves, resume (also at another world size), export.

Every part of a run that has state implements :class:`Stateful` (``state_dict`` / ``load_state_dict``),
and the :class:`CheckpointManager` saves and restores a *named set* of them, as torchtitan's
``CheckpointManager(states=...)`` does. Two scopes:

- ``shared``: identical on every rank (step counters, curves, the timestep history); rank 0 writes them.
- ``per_rank``: each rank its own (EMA shards under ZeRO-3, RNG streams, data-stream position, the
  metric window); every rank writes its own file. Restored in the order given, so put the RNG last.

A per-rank part that can continue at another world size implements
``load_state_dict_resharded(states)``, receiving the states every old rank saved, in rank order; a
part that cannot makes an elastic resume stop with one line naming it. The DeepSpeed engine (model,
optimizer, LR schedule) is saved by DeepSpeed itself and, at another world size, restored through
:mod:`trainer.elastic`.

Layout under ``<output_dir>/checkpoints``::

    step_00001000/            DeepSpeed's files (model, optimizer, LR scheduler; ZeRO shards)
        trainer/common.pt     the shared states (rank 0)
        trainer/rank_<r>.pt   this rank's states
        export.pt             inference weights (written before COMPLETE)
        COMPLETE              written last, by rank 0, after every rank finished: {"step", "world_size"}
    latest                    name of the newest complete checkpoint, replaced atomically

A crash mid-save leaves a directory without ``COMPLETE`` that ``latest`` never points to; the next
save removes it. Our own files hold only tensors and plain values and are read with
``weights_only=True``.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch

from trainer.distributed import DistEnv, barrier

LATEST = "latest"
COMPLETE = "COMPLETE"
_TAG = re.compile(r"^step_(\d{8,})$")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used, with a one-line reason."""


@runtime_checkable
class Stateful(Protocol):
    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _atomic_torch_save(obj: Any, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class RNGState:
    """The process's torch RNG streams (CPU, and CUDA where present) as a :class:`Stateful`.

    At another world size there is no saved stream for the new ranks: ``reseed()`` gives each rank a
    fresh, deterministic one instead."""

    def __init__(self, reseed: Callable[[], None]) -> None:
        self._reseed = reseed

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {"torch": torch.get_rng_state()}
        if torch.cuda.is_available():
            state["cuda"] = torch.cuda.get_rng_state()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        torch.set_rng_state(state["torch"])
        if "cuda" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state(state["cuda"])

    def load_state_dict_resharded(self, states: list[dict[str, Any]]) -> None:
        self._reseed()


class CheckpointManager:
    """Saves and restores the engine plus named :class:`Stateful` parts (see the module docstring)."""

    def __init__(
        self,
        root: str | Path,
        keep_last: int,
        env: DistEnv,
        engine: Any = None,
        shared: dict[str, Stateful] | None = None,
        per_rank: dict[str, Stateful] | None = None,
    ) -> None:
        self.root = Path(root)
        self.keep_last = keep_last
        self.env = env
        self.engine = engine
        self.shared = dict(shared or {})
        self.per_rank = dict(per_rank or {})

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
    def save(self, step: int, before_complete: Callable[[Path], None] | None = None) -> Path:
        """Collective: every rank must call it. ``before_complete(tag_dir)`` (also collective) writes
        anything else that belongs to the checkpoint before it is marked complete."""
        tag = tag_for(step)
        tag_dir = self.root / tag
        if self.env.is_main:
            if tag_dir.exists():  # a leftover of an interrupted save at this very step
                shutil.rmtree(tag_dir)
            self.root.mkdir(parents=True, exist_ok=True)
        barrier()
        self.engine.save_checkpoint(str(self.root), tag=tag, save_latest=False)
        own = tag_dir / "trainer"
        own.mkdir(parents=True, exist_ok=True)
        _atomic_torch_save({k: v.state_dict() for k, v in self.per_rank.items()}, own / f"rank_{self.env.rank}.pt")
        if self.env.is_main:
            _atomic_torch_save({k: v.state_dict() for k, v in self.shared.items()}, own / "common.pt")
        if before_complete is not None:
            before_complete(tag_dir)
        os.sync()  # DeepSpeed's files too must be on disk before COMPLETE can be
        barrier()
        if self.env.is_main:
            meta = {"step": step, "world_size": self.env.world_size}
            _atomic_write_text(tag_dir / COMPLETE, json.dumps(meta))
            _atomic_write_text(self.root / LATEST, tag)
            self._prune(keep=tag)
        barrier()
        return tag_dir

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
        """Collective. Restores the engine, then the per-rank parts in order, then the shared ones."""
        saved_world, world = self.saved_world_size(tag_dir), self.env.world_size
        own = tag_dir / "trainer"
        if saved_world == world:
            path, _ = self.engine.load_checkpoint(
                str(tag_dir.parent), tag=tag_dir.name, load_optimizer_states=True, load_lr_scheduler_states=True
            )
            if path is None:
                raise CheckpointError(f"{tag_dir}: DeepSpeed could not load this checkpoint")
            mine = _load_plain(own / f"rank_{self.env.rank}.pt")
            for name, part in self.per_rank.items():
                part.load_state_dict(_part(mine, name, own / f"rank_{self.env.rank}.pt"))
        else:
            from trainer.elastic import load_engine_state

            load_engine_state(self.engine, tag_dir, saved_world, world, self.env.is_main)
            saved = [_load_plain(own / f"rank_{r}.pt") for r in range(saved_world)]
            for name, part in self.per_rank.items():
                reshard = getattr(part, "load_state_dict_resharded", None)
                if reshard is None:
                    raise CheckpointError(
                        f"{tag_dir}: saved by {saved_world} ranks, resumed on {world}: its '{name}' state "
                        "cannot change world size; resume on the same number of ranks"
                    )
                reshard([_part(s, name, own / f"rank_{r}.pt") for r, s in enumerate(saved)])
        common = _load_plain(own / "common.pt")
        for name, part in self.shared.items():
            part.load_state_dict(_part(common, name, own / "common.pt"))


def _part(states: dict[str, Any], name: str, path: Path) -> dict[str, Any]:
    if name not in states:
        raise CheckpointError(f"{path}: has no '{name}' state (saved by another version of the trainer?)")
    return states[name]


def _load_plain(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise CheckpointError(f"{path}: missing (checkpoint incomplete or from another tool)")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unpickling failure is a corrupt file to the user
        raise CheckpointError(f"{path}: unreadable ({type(err).__name__}: {err})") from None


# ---------------------------------------------------------------------- export for inference

EXPORT_NAME = "export.pt"


def export_weights(
    path: Path,
    config: dict[str, Any],
    step: int,
    model_state: dict[str, torch.Tensor],
    ema: dict[str, dict],
    meta: dict[str, Any],
) -> None:
    """Write a self-contained inference file: resolved config, raw weights, each EMA's weights, and
    ``meta`` (image size, channels, classes, MLflow run id) so sampling needs nothing else."""
    path.parent.mkdir(parents=True, exist_ok=True)
    _atomic_torch_save({"config": config, "step": step, "model": model_state, "ema": ema, "meta": meta}, path)


def load_export(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    if p.is_dir():
        # A run's output dir or a checkpoints dir: take the newest export in it.
        candidates = sorted(p.glob(f"**/{EXPORT_NAME}"), key=lambda q: q.stat().st_mtime)
        if not candidates:
            raise CheckpointError(f"{p}: no {EXPORT_NAME} found under it")
        p = candidates[-1]
    if not p.is_file():
        raise CheckpointError(f"{p}: checkpoint not found")
    state = _load_plain(p)
    state["path"] = str(p)
    for key in ("config", "model", "ema", "step", "meta"):
        if key not in state:
            raise CheckpointError(f"{p}: not an export file (missing '{key}')")
    return state
