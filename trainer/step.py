"""One optimizer step as one component: :class:`TrainStep`.

A step is: forward/backward over its micro-batches (each sample's own random numbers,
:mod:`trainer.per_sample`: timestep, flip, label dropout, noise; the Improved-DDPM losses; the finiteness
checks of the loss and of every gradient); the verdict on it (a non-finite value on any
rank: skip the step whole on every rank; a stop signal on any rank: every rank stops after the same step),
agreed by one MAX all-reduce that stays on the device; the optimizer step, gated on the device by that
verdict (torch's fused AdamW skips it via ``found_inf``: weights, moments and its step count untouched);
the EMA update, scaled by the verdict; and the start of the timestep-history exchange. Nothing in
:meth:`TrainStep.run` makes the host wait for the device.

The host reads a step's verdict one step late, or at once when the loop asks (:meth:`TrainStep.settle`:
a log, checkpoint or stop step). What a late "skip" undoes is undone then: the LR step (the scheduler
advanced on the host, blind to the verdict) is rewound, the step's loss statistics are dropped, and its
timestep pairs are rejected before they reach the history.

Timeline of two overlapping steps n and n+1: host calls on the left, the work they queue on the device on
the right. The host waits only at ⧖, and then only for work queued a whole step earlier::

    run(batch n)
      forward/backward, every micro-batch ────────────▶ [fwd/bwd n, loss and gradient checks]
      verdict v_n = MAX over ranks (non-finite, stop) ─▶ [all-reduce v_n]
      ⧖ settle n-1: read v_{n-1}                          (its copy was queued during run(n-1))
          bad → rewind the LR step, drop n-1's metrics, reject n-1's timestep pairs
      fold the pairs exchanged so far (through n-1) into the history
      optimizer step, found_inf = v_n ────────────────▶ [AdamW n: a no-op on the device if v_n is bad]
      EMA update × (1 - v_n) ─────────────────────────▶ [EMA n]
      start the exchange of n's timestep pairs ───────▶ [all-gather pairs n]
      queue the host copy of v_n ─────────────────────▶ [copy v_n → pinned host memory]
      → returns n-1's outcome
    run(batch n+1)
      forward/backward ───────────────────────────────▶ [fwd/bwd n+1]
      verdict v_{n+1} ────────────────────────────────▶ [all-reduce v_{n+1}]
      ⧖ settle n: read v_n (waits for [copy v_n], not for [fwd/bwd n+1])
      ...
    settle()   the loop needs n+1's verdict now (log/checkpoint/stop step): ⧖ read v_{n+1}

The order rules, all kept here:

1. A step's verdict is read only after the next step's forward/backward is queued (the device stays
   busy), and before the next optimizer step (an LR rewind must precede the next LR step).
2. A step's timestep pairs are folded into the history only after its verdict is known, so a skipped
   step never reaches it; every rank folds the same pairs at the same point, so t of step n is drawn
   from the history through step n-2, identically on every rank.
3. The state may be saved only with no step in flight: :meth:`settle`, then :meth:`quiesce`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from trainer import distributed
from trainer.data import MicroBatch
from trainer.diffusion import GaussianDiffusion
from trainer.ema import EMA
from trainer.engine import StepGate, model_fn
from trainer.guidance import drop_labels
from trainer.metrics import LossWindow
from trainer.nonfinite import NonFiniteGuard
from trainer.per_sample import SampleRandomness, flip_images
from trainer.timesteps import TimestepSampler

Batch = Sequence[MicroBatch]
"""One optimizer step's micro-batches for this rank (:class:`trainer.data.MicroBatch`)."""


@dataclass(frozen=True)
class Outcome:
    """The settled verdict on one optimizer step, the same on every rank."""

    kept: bool
    """False: a non-finite loss or gradient on some rank; the step was skipped whole."""
    stop: bool
    """A stop signal reached some rank: every rank stops after this step."""


@dataclass
class _InFlight:
    verdict: distributed.HostCopy  # the agreed [non-finite count, stop] of the launched step
    ds_skipped: bool  # DeepSpeed skipped the step itself (bf16/ZeRO overflow; known on the host at once)


class TrainStep:
    """Runs optimizer steps and owns the one whose verdict is not read yet (see the module docstring).

    ``history_term``: which per-sample term feeds the timestep history (``diffusion.history_term``);
    ``randomness``: each sample's own random numbers; ``random_flip``: flip half the images left-right;
    ``label_dropout`` / ``num_classes``: classifier-free-guidance training of class-conditional models;
    ``stop_requested``: polled once per step (the preemption flag); ``phema``: the power-function EMA
    (post-hoc EMA, ``train.phema``), updated with the EMA."""

    def __init__(
        self,
        engine: Any,
        gate: StepGate,
        diffusion: GaussianDiffusion,
        sampler: TimestepSampler,
        ema: EMA,
        window: LossWindow,
        device: torch.device,
        history_term: str,
        randomness: SampleRandomness,
        random_flip: bool = False,
        label_dropout: float = 0.0,
        num_classes: int | None = None,
        stop_requested: Callable[[], bool] = lambda: False,
        phema: EMA | None = None,
    ) -> None:
        self.engine, self.gate, self.diffusion = engine, gate, diffusion
        self.sampler, self.ema, self.window, self.device = sampler, ema, window, device
        self.history_term, self.label_dropout, self.num_classes = history_term, label_dropout, num_classes
        self.randomness, self.random_flip = randomness, random_flip
        self.stop_requested = stop_requested
        self.phema = phema  # the power-function EMA (trainer/phema), masked by the verdict like the EMA
        self.call = model_fn(engine)
        # ZeRO-0 without bf16 leaves the gradients in .grad: one fused check after backward; otherwise
        # DeepSpeed moves them into its own buffers during backward, so each is checked as it is produced.
        in_grad = engine.zero_optimization_stage() == 0 and not engine.bfloat16_enabled()
        self.guard = NonFiniteGuard(engine.module, device, hooks=not in_grad)
        self._stop_flag = torch.zeros((), dtype=torch.float32, device=device)
        self._inflight: _InFlight | None = None

    @property
    def in_flight(self) -> bool:
        """A step was launched whose verdict has not been read."""
        return self._inflight is not None

    def run(self, batch: Batch) -> Outcome | None:
        """Launch one optimizer step on ``batch``. Returns the outcome of the step that was in flight (now
        settled, see the timeline), or None when there was none."""
        self.guard.reset()
        self.window.begin_step()
        for micro in batch:
            self._forward_backward(micro)
        self.guard.check_grads()  # a no-op where hooks checked each gradient during backward
        # fill_ passes the flag as a kernel argument: torch.tensor(flag, device=cuda) would be a blocking copy.
        self._stop_flag.fill_(float(self.stop_requested()))
        verdict = distributed.all_max(torch.stack([self.guard.flag, self._stop_flag]))
        earlier = self.settle() if self._inflight is not None else None  # rule 1
        self.sampler.finish_sync()  # rule 2: fold what was exchanged for settled steps
        found_inf = (verdict[0] > 0).float()
        self.gate.found_inf = found_inf
        skipped_before = getattr(self.engine, "skipped_steps", 0)
        self.engine.step()
        self.gate.found_inf = None
        # DeepSpeed's own overflow check (bf16, ZeRO) may skip a step too, decided on the host.
        ds_skipped = getattr(self.engine, "skipped_steps", 0) != skipped_before
        if not ds_skipped:
            self.ema.update(keep=1.0 - found_inf)
            if self.phema is not None:
                self.phema.update(keep=1.0 - found_inf)
        self.sampler.start_sync()  # this step's pairs travel during the next step
        self._inflight = _InFlight(distributed.HostCopy(verdict), ds_skipped)
        return earlier

    def _forward_backward(self, micro: MicroBatch) -> None:
        x = micro.x.to(self.device, non_blocking=True)
        # The sample's place in the run, not its rank, decides every random number it gets (trainer/per_sample.py).
        draws = self.randomness.draw(micro.batch, micro.index, tuple(x.shape[1:]))
        if self.random_flip:
            x = flip_images(x, draws.flip)
        kwargs: dict[str, torch.Tensor] = {}
        if self.num_classes:
            # Label dropout trains the null class (unconditional and guided sampling).
            y = micro.y.to(self.device, non_blocking=True)
            kwargs["y"] = drop_labels(y, self.label_dropout, self.num_classes, uniform=draws.drop)
        t, weights = self.sampler.draw(draws.timestep)
        terms = self.diffusion.training_losses(self.call, x, t, model_kwargs=kwargs, noise=draws.noise)
        loss = (terms["loss"] * weights).mean()
        self.guard.check_loss(loss)
        self.engine.backward(loss)
        # The history tracks an unweighted per-sample term: "vb", the L_vlb term the paper's importance
        # sampling targets, or "loss", the per-sample loss being optimised (diffusion.history_term).
        self.sampler.record(t, terms[self.history_term].detach())
        self.window.add(loss, terms, t, weights)

    def settle(self) -> Outcome:
        """Read the verdict on the step in flight (waiting for it if needed) and finish it: its metrics are
        counted or dropped, its timestep pairs kept or rejected, and the LR step that followed a
        device-skipped step rewound."""
        pending, self._inflight = self._inflight, None
        if pending is None:
            raise RuntimeError("TrainStep.settle() without a step in flight")
        nonfinite, stop = (v > 0 for v in pending.verdict.get().tolist())
        bad = nonfinite or pending.ds_skipped
        self.window.settle(keep=not bad)
        if bad:
            self.sampler.reject_inflight()
            if not pending.ds_skipped:  # DeepSpeed did not step the scheduler when it skipped itself
                self.engine.lr_scheduler.rewind()
        return Outcome(kept=not bad, stop=stop)

    def quiesce(self) -> None:
        """Make the state complete for a checkpoint (rule 3): the exchange in flight becomes part of the
        timestep sampler's state. Collective; call with no step in flight."""
        if self._inflight is not None:
            raise RuntimeError("TrainStep.quiesce() with a step in flight: settle() it first")
        self.sampler.collect()
