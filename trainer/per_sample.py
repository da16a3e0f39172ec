"""Per-sample randomness: every random number drawn for a training sample is a function of (seed, batch, index).

``batch`` is the global batch's number in the run (every optimizer-step attempt consumes one, on every rank)
and ``index`` the sample's place in it (:mod:`trainer.data.canonical`). Neither depends on the world size,
the rank or the loader workers, so neither do a sample's timestep, diffusion noise, label-dropout decision
or flip: a run on N ranks draws what the run on M ranks draws. Each sample gets its own torch generator on
the training device, seeded from the key by :func:`sample_seeds`, and draws, in this order: three uniforms
(timestep, flip, label dropout), then its noise. (Model dropout masks are drawn inside the network from each
rank's own stream and are not covered; see the README.)

The host computes the seeds (a few integer mixes per sample, vectorised) and never reads a device value.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


def _mix(x: np.ndarray) -> np.ndarray:
    """SplitMix64's finalizer: a bijection of uint64 whose output bits all depend on every input bit."""
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def sample_seeds(seed: int, batch: int, index: np.ndarray | torch.Tensor) -> np.ndarray:
    """One 63-bit seed per sample from (seed, batch, index in the batch) alone. uint64 arithmetic wraps by design."""
    idx = np.asarray(index.cpu() if isinstance(index, torch.Tensor) else index, dtype=np.uint64)
    with np.errstate(over="ignore"):
        k = _mix(np.asarray(seed % 2**64, dtype=np.uint64) + np.uint64(0x9E3779B97F4A7C15))
        k = _mix(k ^ (np.asarray(batch % 2**64, dtype=np.uint64) * np.uint64(0xD1B54A32D192ED03)))
        out = _mix(k ^ (idx * np.uint64(0x9E3779B97F4A7C15)))
    return (out >> np.uint64(1)).astype(np.int64)


@dataclass(frozen=True)
class Draws:
    """What a micro-batch's samples draw, each from its own generator."""

    uniform: torch.Tensor
    """[n, 3] float64 in [0, 1): timestep, flip, label dropout."""
    noise: torch.Tensor
    """[n, *shape] float32 standard normal: the ε of q(x_t | x_0)."""

    @property
    def timestep(self) -> torch.Tensor:
        return self.uniform[:, 0]

    @property
    def flip(self) -> torch.Tensor:
        return self.uniform[:, 1]

    @property
    def drop(self) -> torch.Tensor:
        return self.uniform[:, 2]


class SampleRandomness:
    """Draws :class:`Draws` for a micro-batch on ``device``; keeps a pool of generators, re-seeded per sample."""

    def __init__(self, seed: int, device: torch.device) -> None:
        self.seed, self.device = seed, device
        self._pool: list[torch.Generator] = []

    def draw(self, batch: int, index: torch.Tensor | np.ndarray, shape: tuple[int, ...]) -> Draws:
        seeds = sample_seeds(self.seed, batch, index).tolist()
        while len(self._pool) < len(seeds):
            self._pool.append(torch.Generator(device=self.device))
        uniform, noise = [], []
        for gen, s in zip(self._pool, seeds, strict=False):
            gen.manual_seed(s)
            uniform.append(torch.rand(3, generator=gen, device=self.device, dtype=torch.float64))
            noise.append(torch.randn(shape, generator=gen, device=self.device))
        return Draws(torch.stack(uniform), torch.stack(noise))


def flip_images(x: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Mirror image ``i`` left-right where ``u[i] < 1/2`` (its flip uniform)."""
    return torch.where((u < 0.5)[:, None, None, None], x.flip(3), x)
