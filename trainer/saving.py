"""Saving this run at the steps the loop asks for, and resuming it: what the run adds to the generic
checkpoint manager (:mod:`trainer.checkpoint`).

- A checkpoint is never written with non-finite weights (every rank checks its own; all agree).
- Replicated weights are compared across ranks at each save (a SHA-256 of each rank's bytes) and a
  divergence is warned about.
- Each checkpoint carries an export (:mod:`trainer.export`): full float32 weights, raw and per EMA rate.
- Resume: rank 0 picks the checkpoint and tells the others (on a network filesystem ranks can see
  different directory listings); a load that fails on any rank stops every rank with one line.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import torch

from trainer import distributed
from trainer.checkpoint import CheckpointError, CheckpointManager
from trainer.config import Config
from trainer.console import say, warn
from trainer.ema import EMA
from trainer.engine import full_weights
from trainer.export import EXPORT_NAME, export_weights
from trainer.identity import RunIdentity
from trainer.state import TrainState
from trainer.step import TrainStep
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
        """The step of the newest checkpoint of this run (written or resumed from)."""

    def _weights_finite_everywhere(self) -> bool:
        tensors = [getattr(p, "ds_tensor", p) for p in self.engine.module.parameters()]
        tensors += [s for shadows in self.ema.shadows.values() for s in shadows]
        local = all(bool(torch.isfinite(t.detach()).all()) for t in tensors)
        return not distributed.any_rank(not local, self.env.device)

    def save(self) -> Path | None:
        """A checkpoint of the current step; None when the weights are not finite (then nothing is written)."""
        st, env = self.state, self.env
        self.step.quiesce()  # the history exchange in flight becomes part of the state (collective)
        if not self._weights_finite_everywhere():
            say(env.is_main, f"warning: step {st.step}: weights not finite, checkpoint NOT written")
            return None
        digest = param_digest(self.engine.module)
        digests = [None] * env.world_size
        if torch.distributed.is_initialized() and env.world_size > 1:
            torch.distributed.all_gather_object(digests, digest)
            if len(set(digests)) > 1:
                warn(f"warning: rank {env.rank}: model replicas differ across ranks at step {st.step}")
        tag_dir = self.ckpt.save(st.step, before_complete=lambda d: self.export(d / EXPORT_NAME))
        self.identity.record()
        self.last_saved = st.step
        say(env.is_main, f"checkpoint saved: {tag_dir}")
        return tag_dir

    def export(self, path: Path) -> None:
        """Inference weights (raw and EMA, full float32). Collective (gathers under ZeRO-3)."""
        model_state = full_weights(self.engine)
        ema = {str(r): self.ema.full_state_dict(r) for r in self.ema.rates}
        if self.env.is_main:
            meta = {
                **self.meta,
                "mlflow_run_id": self.identity.run_id,
                "tracking_uri": resolve_uri(self.cfg.tracking.uri),
            }
            export_weights(path, self.cfg.model_dump(mode="json"), self.state.step, model_state, ema, meta)
        distributed.barrier()

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
        self.last_saved = self.state.step
        return tag_dir
