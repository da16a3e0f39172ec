"""When the loop does what, besides training: the one place the per-step cadences are decided.

A step that is due for anything is settled at once (its verdict read, :mod:`trainer.step`); every other
step stays in flight for a step so the host never waits for the device.
"""

from __future__ import annotations

from dataclasses import astuple, dataclass

from trainer.config import Config


@dataclass(frozen=True)
class Due:
    """What is due after a kept step."""

    log: bool = False
    """Training metrics to the console and MLflow (``train.log_every``; the last step too)."""
    save: bool = False
    """A checkpoint (``train.ckpt_every``; the last step too)."""
    plot: bool = False
    """The timestep-importance plot (``train.importance_plot_every``, else ``ckpt_every``)."""
    grid: bool = False
    """A sample grid (``train.sample_every``; the last step samples one anyway)."""
    eval: bool = False
    """The periodic evaluation (``train.eval_every``; the last step too)."""
    snapshot: bool = False
    """A post-hoc EMA snapshot (``train.phema``; the last step too)."""
    end: bool = False
    """The run's last step: what follows is the end-of-run work."""

    def __bool__(self) -> bool:
        return any(astuple(self))


class Cadence:
    """``at(step)``: what is due after kept step number ``step`` (1-based)."""

    def __init__(self, cfg: Config, evaluates: bool, snapshot_every: int = 0) -> None:
        self.train = cfg.train
        self.importance = cfg.diffusion.timestep_sampler != "uniform"
        self.evaluates = evaluates
        self.snapshot_every = snapshot_every
        """Steps between post-hoc EMA snapshots; 0: none."""

    def at(self, step: int) -> Due:
        tr = self.train
        end = step == tr.total_steps
        plot_every = tr.importance_plot_every or tr.ckpt_every
        return Due(
            log=step % tr.log_every == 0 or end,
            save=step % tr.ckpt_every == 0 or end,
            plot=self.importance and step % plot_every == 0,
            grid=bool(tr.sample_every) and step % tr.sample_every == 0 and not end,
            eval=self.evaluates and (step % tr.eval_every == 0 or end),
            snapshot=bool(self.snapshot_every) and (step % self.snapshot_every == 0 or end),
            end=end,
        )
