"""The export: a self-contained inference file (resolved config, full float32 weights raw and per EMA, and the
facts sampling needs), written next to each checkpoint and read by ``trainer/sample.py`` and
``trainer/evaluate.py`` (:mod:`trainer.evaluation.inference`). Plain tensors and values only: it loads with
``torch.load(..., weights_only=True)``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from trainer.checkpoint import CheckpointError, atomic_torch_save, load_plain

EXPORT_NAME = "export.pt"


def export_state(
    config: dict[str, Any],
    step: int,
    model_state: dict[str, torch.Tensor],
    ema: dict[str, dict],
    meta: dict[str, Any],
) -> dict[str, Any]:
    """A self-contained inference file's contents: resolved config, raw weights, each EMA's weights, and
    ``meta`` (image size, channels, classes, MLflow run id) so sampling needs nothing else."""
    return {"config": config, "step": step, "model": model_state, "ema": ema, "meta": meta}


def export_weights(
    path: Path,
    config: dict[str, Any],
    step: int,
    model_state: dict[str, torch.Tensor],
    ema: dict[str, dict],
    meta: dict[str, Any],
) -> None:
    """Write :func:`export_state` to ``path`` atomically (exports made outside a checkpoint: conversions,
    reconstructed EMAs)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_torch_save(export_state(config, step, model_state, ema, meta), path)


def load_export(path: str | Path) -> dict[str, Any]:
    """An export file, or the newest one under a run's output directory or a checkpoints directory."""
    p = Path(path)
    if p.is_dir():
        candidates = sorted(p.glob(f"**/{EXPORT_NAME}"), key=lambda q: q.stat().st_mtime)
        if not candidates:
            raise CheckpointError(f"{p}: no {EXPORT_NAME} found under it")
        p = candidates[-1]
    if not p.is_file():
        raise CheckpointError(f"{p}: checkpoint not found")
    state = load_plain(p)
    state["path"] = str(p)
    for key in ("config", "model", "ema", "step", "meta"):
        if key not in state:
            raise CheckpointError(f"{p}: not an export file (missing '{key}')")
    return state
