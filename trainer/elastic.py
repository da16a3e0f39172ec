"""The DeepSpeed engine as a checkpoint part, and its elastic resume: a checkpoint written by N ranks loads on M.

:class:`EngineCheckpoint` is what :class:`trainer.checkpoint.CheckpointManager` saves and loads the engine
(model, optimizer, LR schedule) through: DeepSpeed writes its own files, and every load, at the same or
another world size, goes through :func:`load_engine_state` (one load path). This module depends on
:mod:`trainer.checkpoint`, never the reverse.

What each ZeRO stage keeps, and how it is resumed on another world size (DeepSpeed 0.19):

- ZeRO-0 (with or without bf16): the optimizer state, including bf16's fp32 master weights, is
  replicated and rank 0 writes all of it to ``mp_rank_00_model_states.pt``; nothing in the files
  depends on the world size, so the plain ``engine.load_checkpoint`` loads it on any number of ranks.
  (A universal checkpoint would not even work here: DeepSpeed's universal load restores weights only
  through the ZeRO optimizer, so a stage-0 engine would keep its initial weights.)
- ZeRO-1/2/3: the fp32 master weights and Adam moments are flat per-rank partitions whose layout
  depends on the world size, and ``load_checkpoint`` refuses another size (ZeRORuntimeException for
  1/2). We use DeepSpeed's own answer, the *universal checkpoint*: ``deepspeed.checkpoint.
  ds_to_universal`` rewrites the partitions as one folder per parameter (full fp32 weight, exp_avg,
  exp_avg_sq, step), and an engine whose config has ``checkpoint.load_universal`` slices its own
  partitions out of those. The flag is read live from ``engine._config`` by ``load_checkpoint`` (and
  nowhere at construction), so we set it only around the load instead of asking for it in the config:
  the next same-size resume then uses the cheaper native path again.

The conversion runs in-process (its ``main(args)`` with one worker, so no process pool is forked from a
rank holding a process group), on rank 0 only, into ``<tag>/.universal.tmp`` which is renamed to
``<tag>/universal`` once complete: a crash mid-conversion leaves only the temporary name, which the
next attempt deletes, and a second elastic resume of the same checkpoint reuses the finished folder.
DeepSpeed's conversion reads its own pickles with ``weights_only=False``; those files are the ones our
own ranks wrote. The LR scheduler state (``last_epoch``) and DeepSpeed's step counters come from the
copied model-states file either way; Adam's ``step`` comes from the universal ``step`` entries.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import shutil
from pathlib import Path
from typing import Any

import torch

from trainer.capture import capture_deepspeed_save
from trainer.checkpoint import CheckpointError
from trainer.ckpt_writer import SaveJob
from trainer.distributed import barrier, broadcast_object

UNIVERSAL = "universal"
_TMP = ".universal.tmp"


def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split())
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


def _fail(tag_dir: Path, saved: int, current: int, reason: str) -> CheckpointError:
    return CheckpointError(f"{tag_dir}: cannot resume (saved by {saved} ranks, now {current}): {reason}")


def load_engine_state(engine: Any, tag_dir: Path, saved_world_size: int, world_size: int, is_main: bool) -> None:
    """Load weights, optimizer and LR-scheduler state from the DeepSpeed checkpoint ``tag_dir``.

    Collective: every rank calls it. ``tag_dir`` was written by
    ``engine.save_checkpoint(str(tag_dir.parent), tag=tag_dir.name)`` on ``saved_world_size`` ranks.
    Raises :class:`CheckpointError` (one line) when the checkpoint cannot be resumed here.
    """
    tag_dir = Path(tag_dir)
    if saved_world_size == world_size or not engine.zero_optimization():
        # Same layout, or ZeRO-0 whose state is replicated (see the module docstring).
        _load(engine, tag_dir.parent, tag_dir.name, tag_dir, saved_world_size, world_size)
        return
    universal = _ensure_universal(tag_dir, saved_world_size, world_size, is_main)
    previous = engine._config.load_universal_checkpoint
    engine._config.load_universal_checkpoint = True
    try:
        _load(engine, tag_dir, universal.name, tag_dir, saved_world_size, world_size)
    finally:
        engine._config.load_universal_checkpoint = previous


def _load(engine: Any, load_dir: Path, tag: str, tag_dir: Path, saved: int, current: int) -> None:
    try:
        path, _ = engine.load_checkpoint(
            str(load_dir), tag=tag, load_optimizer_states=True, load_lr_scheduler_states=True
        )
    except Exception as err:  # noqa: BLE001 - DeepSpeed raises many types; the user needs one line
        raise _fail(tag_dir, saved, current, _one_line(err)) from err
    if path is None:
        raise _fail(tag_dir, saved, current, "DeepSpeed found no model states in it")


def _ensure_universal(tag_dir: Path, saved: int, current: int, is_main: bool) -> Path:
    """Rank 0 converts ``tag_dir`` to the universal layout once; every rank gets the folder or the error."""
    final = tag_dir / UNIVERSAL
    error: str | None = None
    if is_main and not final.is_dir():  # only a finished conversion ever has the final name
        try:
            _convert(tag_dir, final)
        except Exception as err:  # noqa: BLE001 - reported on every rank below, not only here
            error = _one_line(err)
    # Every rank must learn the outcome, or the others would wait forever in load_checkpoint's collectives.
    from deepspeed.accelerator import get_accelerator

    error = broadcast_object(error, torch.device(get_accelerator().current_device_name()))
    barrier()
    if error is not None:
        raise _fail(tag_dir, saved, current, f"universal checkpoint conversion failed: {error}")
    if not final.is_dir():
        raise _fail(tag_dir, saved, current, f"{final} is not visible on this rank (checkpoints need a shared disk)")
    return final


def _convert(tag_dir: Path, final: Path) -> None:
    from deepspeed.checkpoint import ds_to_universal

    if not any(tag_dir.glob("*_optim_states.pt")):
        raise FileNotFoundError(f"no ZeRO optimizer partitions (*_optim_states.pt) in {tag_dir}")
    tmp = tag_dir / _TMP
    if tmp.exists():  # left by a conversion that crashed
        shutil.rmtree(tmp)
    args = argparse.Namespace(
        input_folder=str(tag_dir),
        output_folder=str(tmp),
        num_extract_workers=1,  # in-process: no fork of a process that holds a process group
        num_merge_workers=1,
        keep_temp_folder=False,
        strict=True,
        # Our module does not declare tensor-parallel metadata; the conversion wants the (empty) record.
        inject_missing_state=True,
    )
    log = io.StringIO()
    try:
        # The conversion prints progress and tqdm bars per parameter; keep the training log readable.
        with contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
            ds_to_universal.main(args)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        # main() also points <tag>/latest_universal at the temporary name; we always load by explicit tag.
        (tag_dir / "latest_universal").unlink(missing_ok=True)
    os.sync()  # the converted files must be on disk before the name that says "complete" exists
    os.replace(tmp, final)


class EngineCheckpoint:
    """The DeepSpeed engine as a :class:`trainer.checkpoint.EnginePart`: its files, in DeepSpeed's layout,
    inside the checkpoint directory; loaded at any world size (collective)."""

    def __init__(self, engine: Any, world_size: int, is_main: bool) -> None:
        self.engine, self.world_size, self.is_main = engine, world_size, is_main

    def save(self, root: Path, tag: str, sink: SaveJob) -> None:
        capture_deepspeed_save(self.engine, root, tag, sink)

    def load(self, tag_dir: Path, saved_world_size: int) -> None:
        load_engine_state(self.engine, tag_dir, saved_world_size, self.world_size, self.is_main)
