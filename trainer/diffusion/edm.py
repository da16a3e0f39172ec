"""Karras et al. 2022 ("EDM") samplers driven by an ε-model trained on a discrete ᾱ schedule.

The VP process x_t = √ᾱ x_0 + √(1−ᾱ) ε is rewritten in EDM's variance-exploding form
x = x_t/√ᾱ = x_0 + σ ε with σ = √((1−ᾱ)/ᾱ) (EDM Table 1, "VP" and "iDDPM" columns). The ε-model
becomes the denoiser D(x; σ) = x − σ ε̂(x/√(1+σ²), t(σ)), where t(σ) is the training timestep whose σ
is nearest in log σ. By default the sampler's σ levels are snapped onto the training levels, so
t(σ) is exact, as Karras et al. do for the discrete iDDPM model (EDM Appendix C.3.4).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from .gaussian import GaussianDiffusion, Model, ProgressFn, randn

KARRAS_SIGMA_MAX = 80.0
"""Default σ_max cap (EDM sec. 5): beyond it the data is invisible and steps are wasted."""


def training_sigmas(diffusion: GaussianDiffusion) -> np.ndarray:
    """σ_t = √((1 − ᾱ_t)/ᾱ_t) of every step of ``diffusion`` (float64, increasing in t)."""
    ac = diffusion.alphas_cumprod
    return np.sqrt((1.0 - ac) / ac)


def karras_sigmas(n: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> np.ndarray:
    """n levels from σ_max down to σ_min, σ_i = (σ_max^{1/ρ} + i/(n−1)(σ_min^{1/ρ} − σ_max^{1/ρ}))^ρ
    (EDM eq. 5), without the final σ = 0."""
    if n < 1:
        raise ValueError(f"need at least one sampling step, got {n}")
    if not 0.0 < sigma_min <= sigma_max:
        raise ValueError(f"need 0 < sigma_min <= sigma_max, got {sigma_min}, {sigma_max}")
    if n == 1:
        return np.array([sigma_max], dtype=np.float64)
    ramp = np.linspace(0.0, 1.0, n, dtype=np.float64)
    lo, hi = sigma_min ** (1.0 / rho), sigma_max ** (1.0 / rho)
    return (hi + ramp * (lo - hi)) ** rho


def nearest_timesteps(train_sigmas: np.ndarray, sigmas: Sequence[float] | np.ndarray) -> np.ndarray:
    """Index of the training σ nearest to each σ in log space."""
    log_train = np.log(np.asarray(train_sigmas, dtype=np.float64))
    log_s = np.log(np.asarray(sigmas, dtype=np.float64))
    return np.abs(log_train[None, :] - log_s[:, None]).argmin(axis=1)


class EpsDenoiser:
    """D(x; σ) from a diffusion model (any mean parameterisation; variance channels are ignored).

    ``x`` is in the variance-exploding scaling x = x_0 + σ n. With ``clip_denoised`` the returned
    x̂_0 is clamped to [-1, 1].
    """

    def __init__(
        self,
        model: Model,
        diffusion: GaussianDiffusion,
        model_kwargs: dict[str, Any] | None = None,
        clip_denoised: bool = True,
    ) -> None:
        self.model = model
        self.diffusion = diffusion
        self.model_kwargs = model_kwargs
        self.clip_denoised = clip_denoised
        self.sigmas = training_sigmas(diffusion)

    def timestep(self, sigma: float) -> int:
        """Step of ``diffusion`` (before its timestep map) whose σ is nearest to ``sigma``."""
        return int(nearest_timesteps(self.sigmas, [sigma])[0])

    def snap(self, sigma: float) -> float:
        """The training σ nearest to ``sigma``."""
        return float(self.sigmas[self.timestep(sigma)])

    def __call__(self, x: Tensor, sigma: float) -> Tensor:
        step = self.timestep(sigma)
        t = torch.full((x.shape[0],), step, device=x.device, dtype=torch.long)
        x_vp = x / math.sqrt(1.0 + sigma**2)
        eps = self.diffusion.predict_eps(self.model, x_vp, t, self.model_kwargs)
        denoised = x - sigma * eps
        return denoised.clamp(-1.0, 1.0) if self.clip_denoised else denoised


def edm_sigma_levels(
    diffusion: GaussianDiffusion,
    num_steps: int,
    *,
    sigma_min: float | None = None,
    sigma_max: float | None = None,
    rho: float = 7.0,
    snap: bool = True,
) -> np.ndarray:
    """Descending σ levels (final 0 excluded) for ``num_steps`` EDM steps on ``diffusion``'s schedule.

    Defaults: σ_min = the smallest training σ, σ_max = min(largest training σ, 80). With ``snap``
    every level is replaced by the nearest training σ and duplicates are dropped, so fine grids on a
    short schedule may give fewer steps than asked.
    """
    train = training_sigmas(diffusion)
    lo = float(train[0]) if sigma_min is None else float(sigma_min)
    hi = min(float(train[-1]), KARRAS_SIGMA_MAX) if sigma_max is None else float(sigma_max)
    levels = karras_sigmas(num_steps, lo, hi, rho)
    if snap:
        idx = np.unique(nearest_timesteps(train, levels))[::-1]
        levels = train[idx]
    return levels


@torch.no_grad()
def edm_sample(
    denoiser: EpsDenoiser,
    sigmas: Sequence[float] | np.ndarray,
    shape: Sequence[int],
    *,
    device: torch.device | str | None = None,
    heun: bool = True,
    churn: float = 0.0,
    s_tmin: float = 0.0,
    s_tmax: float = math.inf,
    s_noise: float = 1.0,
    snap_churn: bool = True,
    noise: Tensor | None = None,
    generator: torch.Generator | None = None,
    progress: ProgressFn | None = None,
) -> Tensor:
    """Euler (``heun=False``) or Heun (EDM Algorithm 1) integration of the probability-flow ODE
    dx/dσ = (x − D(x; σ))/σ from σ_0 = sigmas[0] down to 0, with EDM Algorithm 2's optional
    stochastic churn: before step i, noise raises σ_i to σ̂ = σ_i(1 + γ),
    γ = min(churn/N, √2 − 1) for σ_i in [s_tmin, s_tmax] (σ̂ snapped to a training level with
    ``snap_churn``). The last step (to σ = 0) is Euler, so it returns D(x; σ_last).

    The start is the VP prior x_T ~ N(0, I) in VE scaling: x = √(1 + σ_0²)·z. ``noise`` (z) may be
    given; otherwise it is drawn from ``generator``. Returns float32 samples in data space.
    """
    levels = [float(s) for s in sigmas]
    if not levels or any(b >= a for a, b in zip(levels, levels[1:], strict=False)) or levels[-1] <= 0:
        raise ValueError(f"sigmas must be positive and strictly decreasing, got {levels[:4]}...")
    if churn < 0.0:
        raise ValueError(f"churn must be >= 0, got {churn}")
    n = len(levels)
    levels.append(0.0)
    if noise is None:
        noise = randn(shape, device=device, generator=generator)
    x = noise.to(device=device, dtype=torch.float32) * math.sqrt(1.0 + levels[0] ** 2)
    gamma_max = min(churn / n, math.sqrt(2.0) - 1.0)
    for i in range(n):
        sigma, sigma_next = levels[i], levels[i + 1]
        sigma_hat = sigma
        if gamma_max > 0.0 and s_tmin <= sigma <= s_tmax:
            sigma_hat = sigma * (1.0 + gamma_max)
            if snap_churn:
                sigma_hat = max(denoiser.snap(sigma_hat), sigma)
            if sigma_hat > sigma:
                z = randn(x.shape, device=x.device, generator=generator)
                x = x + math.sqrt(sigma_hat**2 - sigma**2) * s_noise * z
        d = (x - denoiser(x, sigma_hat)) / sigma_hat
        x_next = x + (sigma_next - sigma_hat) * d
        if heun and sigma_next > 0.0:
            d_next = (x_next - denoiser(x_next, sigma_next)) / sigma_next
            x_next = x + (sigma_next - sigma_hat) * 0.5 * (d + d_next)
        x = x_next
        if progress is not None:
            progress(i + 1, n)
    return x
