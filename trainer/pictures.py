"""The pictures a run logs: sample grids (from the EMA weights), the timestep-importance plot, loss curves.

Sampling a grid draws from the global RNG, which the checkpoint saves for exact resume: it runs inside
``torch.random.fork_rng``, so a run with grids trains bit for bit like one without.
"""

from __future__ import annotations

import io
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from trainer import distributed
from trainer.ckpt_writer import write_file
from trainer.config import Config
from trainer.ema import EMA
from trainer.engine import full_weights
from trainer.evaluation.inference import generate_grid
from trainer.images import curves_png
from trainer.storage import describe, fmt_bytes, free_bytes
from trainer.timesteps import TimestepSampler
from trainer.tracking import Tracker


class Pictures:
    """Draws and logs a run's pictures; the gathers of weights are collective, the drawing is rank 0's."""

    def __init__(
        self,
        cfg: Config,
        env: distributed.DistEnv,
        out: Path,
        engine: Any,
        ema: EMA,
        sampler: TimestepSampler,
        image_size: int,
        channels: int,
        num_classes: int | None,
    ) -> None:
        self.cfg, self.env, self.out, self.engine, self.ema, self.sampler = cfg, env, out, engine, ema, sampler
        self.image_size, self.channels, self.num_classes = image_size, channels, num_classes

    def grid(self, step: int, tracker: Tracker) -> None:
        """A grid of ``sample.num_samples`` images from the EMA weights (``sample.use_ema``), rank 0 samples."""
        cfg = self.cfg
        weights = self.ema.full_state_dict(cfg.sample_ema_rate) if cfg.sample.use_ema else full_weights(self.engine)
        if self.env.is_main:
            t0 = time.perf_counter()
            cuda = [self.env.device] if self.env.device.type == "cuda" else []
            with torch.random.fork_rng(devices=cuda):
                png, arr = generate_grid(
                    cfg, weights, self.image_size, self.channels, self.num_classes, self.env.device
                )
            dt = time.perf_counter() - t0
            samples_dir = self.out / "samples"
            path = samples_dir / f"step_{step:08d}.png"
            tracker.log_metrics({"sample/seconds_per_image": dt / len(arr)}, step=step)
            try:
                samples_dir.mkdir(exist_ok=True)
                write_file(path, lambda f: f.write(png))
            except OSError as err:  # a full disk costs the picture, not the run
                print(
                    f"warning: sample grid {path} not written ({describe(err)}): it needs {fmt_bytes(len(png))}, "
                    f"{fmt_bytes(free_bytes(samples_dir))} free; training goes on",
                    flush=True,
                )
            else:
                tracker.log_artifact_file(path, "samples")
                print(f"sample grid ({cfg.sample.method}, steps={cfg.sample.steps or 'all'}): {path}", flush=True)
        distributed.barrier()

    def importance(self, step: int, tracker: Tracker) -> None:
        """p_t and the history's per-t RMS loss (rank 0)."""
        if self.env.is_main:
            tracker.log_artifact_bytes(
                plot_timestep_importance(self.sampler, step), f"timesteps/importance_step_{step:08d}.png"
            )

    def curves(self, curves: dict[str, list[tuple[int, float]]], tracker: Tracker) -> None:
        """The logged loss curves (rank 0)."""
        if self.env.is_main and curves:
            tracker.log_artifact_bytes(curves_png(dict(curves)), "plots/loss_curves.png")


def plot_timestep_importance(sampler: TimestepSampler, step: int | None = None) -> bytes:
    """PNG bytes: p_t over t (against uniform) and, when there is a history, per-t mean/RMS loss."""
    # The object-oriented API with an Agg canvas touches no global pyplot state or backend choice.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    num_t = sampler.num_timesteps
    ts = np.arange(num_t)
    stats = sampler.history_stats()
    fig = Figure(figsize=(8, 6 if stats is not None else 3.2), dpi=100)
    FigureCanvasAgg(fig)
    axes = fig.subplots(2 if stats is not None else 1, 1, sharex=True, squeeze=False)[:, 0]
    title = f"timestep sampler: {sampler.kind.value}" + (f" (step {step})" if step is not None else "")
    fig.suptitle(title)

    ax = axes[0]
    probs = sampler.probabilities()
    ax.plot(ts, probs, lw=1.0, label="p_t")
    ax.axhline(1.0 / num_t, color="grey", ls="--", lw=0.8, label="uniform 1/T")
    if probs.min() > 0:  # p_t spans orders of magnitude once importance sampling is active
        ax.set_yscale("log")
    ax.set_ylabel("p_t")
    ax.legend(loc="upper right", fontsize=8)

    if stats is not None:
        ax = axes[1]
        ax.plot(ts, stats["rms"], lw=1.0, label="RMS of history (sqrt E[L_t²])")
        ax.plot(ts, stats["mean"], lw=1.0, alpha=0.8, label="mean of history")
        finite = stats["rms"][np.isfinite(stats["rms"])]
        if finite.size and finite.min() > 0:
            ax.set_yscale("log")
        ax.set_ylabel("L_t (bits/dim)")
        needed = getattr(sampler, "history_per_term", 0)
        ax.set_title(
            f"history: {int(stats['count'].min())} to {int(stats['count'].max())} values per t "
            f"({needed} needed before importance sampling starts)",
            fontsize=9,
        )
        ax.legend(loc="upper right", fontsize=8)
    axes[-1].set_xlabel("t")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()
