"""Saving this run at the steps the loop asks for, and resuming it: what the run adds to the generic
checkpoint manager (:mod:`trainer.checkpoint`).

- A checkpoint is never written with non-finite weights (every rank checks its own; all agree).
- Replicated weights are compared across ranks at each save (a SHA-256 of each rank's bytes) and a
  divergence is warned about.
- Each checkpoint carries an export (:mod:`trainer.export`): full float32 weights, raw and per EMA rate,
  written once, by rank 0 (4 bytes × parameters × (1 + EMA rates), whatever the world size).
- Checkpoints are written in the background (``train.async_checkpoint``, :mod:`trainer.ckpt_writer`): the
  loop pays for a host copy of the state; the save before is settled (waited for, agreed on) first.
- A failed save (full disk, quota, I/O error) leaves no partial directory and keeps ``latest``; one line
  names the directory, the bytes it needed and the bytes free. Up to ``train.ckpt_failures_allowed`` in a
  row the run goes on and retries at the next checkpoint step; one more, or a failed save with no checkpoint
  step after it (stop signal, end of run), stops it (:class:`StorageError`, exit status 5).
- Resume: rank 0 picks the checkpoint and tells the others (on a network filesystem ranks can see
  different directory listings); a load that fails on any rank stops every rank with one line.
"""

from __future__ import annotations

import hashlib
import time
from pathlib import Path
from typing import Any

import torch

from trainer import distributed
from trainer.checkpoint import CheckpointError, CheckpointManager
from trainer.ckpt_writer import SaveJob
from trainer.config import Config
from trainer.console import say, warn
from trainer.ema import EMA
from trainer.engine import full_weights
from trainer.export import EXPORT_NAME, export_state
from trainer.identity import RunIdentity
from trainer.state import TrainState
from trainer.step import TrainStep
from trainer.storage import estimate_checkpoint_bytes, fmt_bytes, free_bytes, space_warning, tree_bytes
from trainer.tracking import resolve_uri


def param_digest(module: torch.nn.Module) -> str | None:
    """SHA-256 of this rank's parameter bytes: equal on every rank when replicas agree (None under ZeRO-3,
    where each rank holds a different shard)."""
    params = list(module.parameters())
    if any(hasattr(p, "ds_tensor") for p in params):
        return None
    h = hashlib.sha256()
    for p in params:
        h.update(p.detach().float().cpu().numpy().tobytes())
    return h.hexdigest()


EXIT_STORAGE = 5
"""Exit status of a run stopped because its checkpoints could not be written (train.ckpt_failures_allowed)."""


class StorageError(RuntimeError):
    """Checkpoints cannot be written and the policy says stop; the message is the one line to print."""


class Saver:
    """Writes the run's checkpoints (with their export) and restores the run from one. Collective."""

    def __init__(
        self,
        cfg: Config,
        ckpt: CheckpointManager,
        engine: Any,
        ema: EMA,
        step: TrainStep,
        state: TrainState,
        identity: RunIdentity,
        meta: dict[str, Any],
    ) -> None:
        self.cfg, self.ckpt, self.engine, self.ema = cfg, ckpt, engine, ema
        self.step, self.state, self.identity, self.env = step, state, identity, ckpt.env
        self.meta = meta
        """image_size, channels, num_classes: what the export needs besides the weights."""
        self.last_saved: int | None = None
        """The step of the newest checkpoint of this run (written, being written, or resumed from)."""
        self.failures = 0
        """Failed saves in a row (``train.ckpt_failures_allowed``)."""
        self.stall_s = 0.0
        """Seconds the loop spent in the last save() (the snapshot, or the whole write when synchronous)."""
        self._measured = False
        ckpt.on_complete = self._on_complete

    def _weights_finite_everywhere(self) -> bool:
        tensors = [getattr(p, "ds_tensor", p) for p in self.engine.module.parameters()]
        tensors += [s for shadows in self.ema.shadows.values() for s in shadows]
        local = all(bool(torch.isfinite(t.detach()).all()) for t in tensors)
        return not distributed.any_rank(not local, self.env.device)

    def save(self, final: bool = False) -> Path | None:
        """Start a checkpoint of the current step (collective); None when the weights are not finite (then
        nothing is written). Asynchronous (``train.async_checkpoint``): returns once the state is copied to host
        memory; the files follow in the background. Settles the save before it first (at most one in flight),
        which raises :class:`StorageError` when the failure policy says stop. ``final``: no checkpoint step
        follows this one (see :meth:`settle`)."""
        st, env = self.state, self.env
        self.step.quiesce()  # the history exchange in flight becomes part of the state (collective)
        self.settle()
        if not self._weights_finite_everywhere():
            say(env.is_main, f"warning: step {st.step}: weights not finite, checkpoint NOT written")
            return None
        digest = param_digest(self.engine.module)
        digests = [None] * env.world_size
        if torch.distributed.is_initialized() and env.world_size > 1:
            torch.distributed.all_gather_object(digests, digest)
            if len(set(digests)) > 1:
                warn(f"warning: rank {env.rank}: model replicas differ across ranks at step {st.step}")
        background = self.cfg.train.async_checkpoint
        t0 = time.perf_counter()
        job = self.ckpt.begin(st.step, background)
        self.export(job, job.tag_dir / EXPORT_NAME)
        self.ckpt.writer.submit(job)
        self.stall_s = time.perf_counter() - t0
        self.identity.record()
        self.last_saved = st.step
        if not background:
            self.settle(final=final)
        return job.tag_dir

    def export(self, sink: SaveJob, path: Path) -> None:
        """Inference weights (raw and EMA, full float32), written once, by rank 0. Collective: the weights are
        gathered under ZeRO-3 and the EMA's slices always (one all-gather)."""
        model_state = full_weights(self.engine)
        ema = self.ema.full_state_dicts()
        if self.env.is_main:
            meta = {
                **self.meta,
                "mlflow_run_id": self.identity.run_id,
                "tracking_uri": resolve_uri(self.cfg.tracking.uri),
            }
            state = export_state(self.cfg.model_dump(mode="json"), self.state.step, model_state, ema, meta)
            sink.add(path, state, owned=True)  # gathered into fresh host tensors: nothing else holds them

    def settle(self, final: bool = False) -> None:
        """Wait for the save in flight, if any, and apply the failure policy to it (collective). ``final``: no
        checkpoint step follows (stop signal, end of run), so a failure stops the run whatever the policy."""
        result = self.ckpt.writer.settle()
        if result is None:
            return
        if result.ok:
            self.failures = 0
            return
        self.failures += 1
        self.last_saved = None  # nothing of that step is on disk: a stop at this step saves again
        allowed = self.cfg.train.ckpt_failures_allowed
        stop = final or self.failures > allowed
        line: str | None = None
        if self.env.is_main:
            root = self.ckpt.root
            latest = self.ckpt.latest()
            gone = "could not be removed (the next start removes it)" if result.tag_dir.exists() else "was removed"
            line = (
                f"checkpoint {result.tag_dir} not saved ({result.error}): it needs about "
                f"{fmt_bytes(result.planned_bytes)}, {fmt_bytes(free_bytes(root))} free on {root}; the partial "
                f"directory {gone}, latest is still {latest.name if latest else 'none (no checkpoint yet)'}"
            )
            if self.failures > allowed:
                line += (
                    f"; {self.failures} failed saves in a row, more than train.ckpt_failures_allowed={allowed}: "
                    f"stopping (exit {EXIT_STORAGE})"
                )
            elif final:
                line += f"; no checkpoint step follows: stopping (exit {EXIT_STORAGE})"
            else:
                line += (
                    f"; failure {self.failures} in a row, train.ckpt_failures_allowed={allowed}: training goes on "
                    "and the next checkpoint step retries"
                )
        line = distributed.broadcast_object(line, self.env.device)
        if stop:
            raise StorageError(str(line))
        say(self.env.is_main, f"warning: {line}")

    def close(self) -> None:
        """A run ending on an error: let the save in flight finish if every rank's files can (not collective)."""
        self.ckpt.writer.close()

    def _on_complete(self, job: SaveJob) -> None:
        """Rank 0, once a checkpoint is complete (on the writer thread when asynchronous)."""
        print(f"checkpoint saved: {job.tag_dir}", flush=True)
        if not self._measured:
            self._measured = True
            size = tree_bytes(job.tag_dir)
            line = space_warning(self.ckpt.root, size, self.ckpt.keep_last, 1, "measured on the first one")
            if line:
                print(line, flush=True)

    def check_space(self, n_params: int) -> None:
        """At start (rank 0 prints): warn when the output directory cannot hold the checkpoints this run keeps
        at once, from a size estimated from the model and optimizer."""
        if not self.env.is_main:
            return
        params = list(self.engine.module.parameters())
        param_bytes = params[0].element_size() if params else 4
        stage, bf16 = (
            getattr(self.engine, "zero_optimization_stage", int)(),
            getattr(self.engine, "bfloat16_enabled", bool)(),
        )
        separate = bool(stage or bf16)  # the optimizer keeps float32 masters apart from the module's weights
        each = estimate_checkpoint_bytes(n_params, param_bytes, separate, len(self.ema.rates))
        existing = len(self.ckpt.complete_tags())
        how = "estimated from the model and optimizer"
        line = space_warning(self.ckpt.root, each, self.ckpt.keep_last, existing, how)
        if line:
            print(line, flush=True)

    def resume(self, resume: str | None) -> Path | None:
        """Load the checkpoint ``--resume`` names (``auto``: the newest, if any; ``none``: nothing, and refuse
        an output directory that holds checkpoints; else a path). Returns the checkpoint loaded, if any."""
        env = self.env
        choice: tuple[str | None, str | None] = (None, None)
        if env.is_main:
            try:
                found = self.ckpt.resolve(resume)
                newest = self.ckpt.latest()
                if found is None and resume == "none" and newest is not None:
                    raise CheckpointError(
                        f"{self.ckpt.root} already holds checkpoints (newest {newest.name}): use --resume auto to "
                        "continue that run, or set another train.output_dir"
                    )
                choice = (str(found) if found else None, None)
            except CheckpointError as err:
                choice = (None, str(err))
        path, error = distributed.broadcast_object(choice, env.device)
        if error:
            raise CheckpointError(error)
        if path is None:
            if resume == "auto":
                say(env.is_main, f"no checkpoint in {self.ckpt.root}: starting from scratch")
            return None
        tag_dir = Path(path)
        if env.is_main:
            for name in self.ckpt.remove_incomplete():
                print(f"removed {self.ckpt.root / name}: an interrupted save (no COMPLETE marker)", flush=True)
        failure: str | None = None
        try:
            self.ckpt.load(tag_dir)
        except CheckpointError as err:
            failure = str(err)
        except (KeyError, ValueError, RuntimeError, AssertionError) as err:
            failure = f"{tag_dir}: cannot restore this run from it ({type(err).__name__}: {err})"
        # A file missing on one rank must stop every rank, not leave the others waiting in a collective.
        if distributed.any_rank(failure is not None, env.device):
            raise CheckpointError(failure or f"{tag_dir}: another rank could not load this checkpoint")
        saved_world = self.ckpt.saved_world_size(tag_dir)
        where = f" (saved by {saved_world} ranks, now {env.world_size})" if saved_world != env.world_size else ""
        say(env.is_main, f"resumed from {tag_dir} at step {self.state.step}{where}")
        self._measured = True  # an existing checkpoint was measured by the run that wrote it
        self.last_saved = self.state.step
        return tag_dir
