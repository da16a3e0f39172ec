"""Checkpoints: save, resume, keep-last-N, and export of weights for inference.

Layout under ``<output_dir>/checkpoints``::

    step_00001000/            DeepSpeed's files (model, optimizer, LR scheduler; ZeRO shards)
        trainer/common.pt     step counters, timestep-sampler history, MLflow run id (rank 0)
        trainer/rank_<r>.pt   this rank's RNG states and EMA shadows
        COMPLETE              written last, by rank 0, after every rank finished
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
from typing import Any

import torch

from trainer.distributed import DistEnv, barrier

LATEST = "latest"
COMPLETE = "COMPLETE"
_TAG = re.compile(r"^step_(\d{8,})$")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used, with a one-line reason."""


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


def rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


class CheckpointManager:
    def __init__(self, root: str | Path, keep_last: int, env: DistEnv) -> None:
        self.root = Path(root)
        self.keep_last = keep_last
        self.env = env

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

    # ------------------------------------------------------------------ save / load
    def save(
        self,
        engine: Any,
        step: int,
        common: dict[str, Any],
        per_rank: dict[str, Any],
        before_complete: Callable[[Path], None] | None = None,
    ) -> Path:
        """Collective: every rank must call it. ``before_complete(tag_dir)`` (also collective) writes
        anything else that belongs to the checkpoint before it is marked complete."""
        tag = tag_for(step)
        tag_dir = self.root / tag
        if self.env.is_main:
            if tag_dir.exists():  # a leftover of an interrupted save at this very step
                shutil.rmtree(tag_dir)
            self.root.mkdir(parents=True, exist_ok=True)
        barrier()
        engine.save_checkpoint(str(self.root), tag=tag, save_latest=False)
        own = tag_dir / "trainer"
        own.mkdir(parents=True, exist_ok=True)
        _atomic_torch_save(per_rank, own / f"rank_{self.env.rank}.pt")
        if self.env.is_main:
            _atomic_torch_save(common, own / "common.pt")
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

    def load(self, engine: Any, tag_dir: Path) -> tuple[dict[str, Any], dict[str, Any]]:
        """Collective. Returns (common, per_rank) states; per-rank falls back to rank 0's file when the
        world size changed (EMA shadows are replicated below ZeRO-3)."""
        path, _ = engine.load_checkpoint(
            str(tag_dir.parent), tag=tag_dir.name, load_optimizer_states=True, load_lr_scheduler_states=True
        )
        if path is None:
            raise CheckpointError(f"{tag_dir}: DeepSpeed could not load this checkpoint")
        own = tag_dir / "trainer"
        common = _load_plain(own / "common.pt")
        rank_file = own / f"rank_{self.env.rank}.pt"
        per_rank = _load_plain(rank_file if rank_file.is_file() else own / "rank_0.pt")
        return common, per_rank


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
