"""Noise schedules β_0..β_{T-1} as float64 numpy tables.

Timesteps are 0-indexed: β_0 is the first noising step (paper t = 1).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from enum import Enum

import numpy as np


class ScheduleType(str, Enum):
    LINEAR = "linear"
    COSINE = "cosine"


COSINE_OFFSET = 0.008
"""s in the cosine schedule (Nichol & Dhariwal 2021, eq. 17): keeps β_0 from vanishing."""
MAX_BETA = 0.999
"""β clip of the cosine schedule: avoids the singularity of ᾱ → 0 near t = T."""


def linear_betas(num_timesteps: int) -> np.ndarray:
    """Ho et al. 2020 linear schedule (1e-4 → 0.02 at T = 1000), rescaled by 1000/T so any T gives
    the same ᾱ_T shape (Nichol & Dhariwal 2021, sec. 3.2)."""
    _check_steps(num_timesteps)
    scale = 1000.0 / num_timesteps
    if scale * 0.02 >= 1.0:
        raise ValueError(f"linear schedule needs more than 20 steps (β_T = 20/T < 1), got {num_timesteps}")
    return np.linspace(scale * 1e-4, scale * 0.02, num_timesteps, dtype=np.float64)


def betas_from_alpha_bar(
    num_timesteps: int, alpha_bar: Callable[[float], float], max_beta: float = MAX_BETA
) -> np.ndarray:
    """β_t = min(1 − ᾱ(t+1)/ᾱ(t), max_beta) for a continuous ᾱ on [0, 1] (t/T as argument)."""
    _check_steps(num_timesteps)
    betas = np.empty(num_timesteps, dtype=np.float64)
    for i in range(num_timesteps):
        a0 = alpha_bar(i / num_timesteps)
        a1 = alpha_bar((i + 1) / num_timesteps)
        betas[i] = min(1.0 - a1 / a0, max_beta)
    return betas


def cosine_alpha_bar(frac: float, s: float = COSINE_OFFSET) -> float:
    """Unnormalised f(t) = cos²(((t/T) + s)/(1 + s) · π/2) (Nichol & Dhariwal 2021, eq. 17)."""
    return math.cos((frac + s) / (1.0 + s) * math.pi / 2.0) ** 2


def cosine_betas(num_timesteps: int) -> np.ndarray:
    """Cosine schedule: ᾱ_t = f(t)/f(0); β clipped at 0.999 (Nichol & Dhariwal 2021, sec. 3.2)."""
    return betas_from_alpha_bar(num_timesteps, cosine_alpha_bar, MAX_BETA)


def get_betas(schedule: str | ScheduleType, num_timesteps: int) -> np.ndarray:
    """β table (float64, shape [T]) of a named schedule."""
    try:
        kind = ScheduleType(schedule)
    except ValueError:
        names = ", ".join(repr(s.value) for s in ScheduleType)
        raise ValueError(f"unknown noise schedule {schedule!r}; expected one of {names}") from None
    if kind is ScheduleType.LINEAR:
        return linear_betas(num_timesteps)
    return cosine_betas(num_timesteps)


def _check_steps(num_timesteps: int) -> None:
    if int(num_timesteps) != num_timesteps or num_timesteps < 2:
        raise ValueError(f"diffusion steps must be an integer >= 2, got {num_timesteps!r}")
