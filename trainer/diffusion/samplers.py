"""Sampling loops: DDPM / Improved-DDPM ancestral, DDIM (+ inversion), Euler and Heun (EDM), reverse VP SDE
(Euler–Maruyama) and predictor–corrector (Song et al. 2021).

All samplers call the model through ``GaussianDiffusion.model_output`` (original timesteps, output cast
to float32), take an optional ``torch.Generator`` for fixed-seed runs and a ``progress(done, total)``
callback.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from enum import Enum
from typing import Any

import torch
from torch import Tensor

from .edm import EpsDenoiser, edm_sample, edm_sigma_levels
from .gaussian import GaussianDiffusion, Model, ProgressFn, fp32_math, parse_enum, randn
from .respace import respace, space_timesteps


class SamplerMethod(str, Enum):
    DDPM = "ddpm"
    """Ancestral sampling; uses the learned variance when the diffusion has one (Improved DDPM)."""
    DDIM = "ddim"
    """DDIM with η (η = 0: deterministic)."""
    EULER = "euler"
    """Euler on the probability-flow ODE in σ (EDM)."""
    HEUN = "heun"
    """Heun's second-order method on the probability-flow ODE in σ (EDM Algorithm 1/2)."""
    SDE = "sde"
    """Euler–Maruyama on the reverse-time VP SDE (Song et al. 2021, eqs. 6 and 11)."""
    PC = "pc"
    """Predictor–corrector: a Langevin corrector step at signal-to-noise ratio ``snr``, then the Euler–Maruyama
    predictor, at every step (Song et al. 2021, Algorithm 5 for the VP SDE)."""


class SigmaSchedule(str, Enum):
    KARRAS = "karras"
    """EDM's ρ = 7 spacing between σ_min and σ_max, snapped onto the training levels."""
    TIMESTEPS = "timesteps"
    """The σ of the timesteps kept by the respacing spec."""


def _timestep_batch(step: int, n: int, device: torch.device) -> Tensor:
    return torch.full((n,), step, device=device, dtype=torch.long)


def _initial_noise(
    shape: Sequence[int], device: Any, noise: Tensor | None, generator: torch.Generator | None
) -> Tensor:
    if noise is not None:
        if tuple(noise.shape) != tuple(shape):
            raise ValueError(f"noise has shape {tuple(noise.shape)}, expected {tuple(shape)}")
        return noise.to(device=device, dtype=torch.float32)
    return randn(shape, device=device, generator=generator)


@torch.no_grad()
def ddpm_sample_loop(
    model: Model,
    diffusion: GaussianDiffusion,
    shape: Sequence[int],
    *,
    device: torch.device | str | None = None,
    noise: Tensor | None = None,
    clip_denoised: bool = True,
    model_kwargs: dict[str, Any] | None = None,
    generator: torch.Generator | None = None,
    progress: ProgressFn | None = None,
) -> Tensor:
    """Ancestral sampling x_{T-1} ~ N(0, I) → x_0 → sample (DDPM Algorithm 2) over every step of
    ``diffusion`` (respace it first for fewer steps)."""
    x = _initial_noise(shape, device, noise, generator)
    T = diffusion.num_timesteps
    for i, step in enumerate(range(T - 1, -1, -1)):
        t = _timestep_batch(step, x.shape[0], x.device)
        x = diffusion.p_sample(
            model, x, t, clip_denoised=clip_denoised, model_kwargs=model_kwargs, generator=generator
        )["sample"]
        if progress is not None:
            progress(i + 1, T)
    return x


def ddim_sigma(diffusion: GaussianDiffusion, t: Tensor, eta: float, like: Tensor) -> Tensor:
    """σ_t(η) = η·√((1 − ᾱ_{t-1})/(1 − ᾱ_t))·√(1 − ᾱ_t/ᾱ_{t-1}) (DDIM eq. 16); η = 1 gives β̃_t."""
    ac = diffusion.extract("alphas_cumprod", t, like)
    ac_prev = diffusion.extract("alphas_cumprod_prev", t, like)
    return eta * torch.sqrt((1.0 - ac_prev) / (1.0 - ac)) * torch.sqrt(1.0 - ac / ac_prev)


def ddim_step(
    model: Model,
    diffusion: GaussianDiffusion,
    x: Tensor,
    t: Tensor,
    *,
    eta: float = 0.0,
    clip_denoised: bool = True,
    model_kwargs: dict[str, Any] | None = None,
    noise: Tensor | None = None,
    generator: torch.Generator | None = None,
) -> dict[str, Tensor]:
    """One DDIM step x_t → x_{t-1} (DDIM eq. 12):
    x_{t-1} = √ᾱ_{t-1} x̂_0 + √(1 − ᾱ_{t-1} − σ_t²) ε̂ + σ_t z, with ε̂ re-derived from the
    (possibly clipped) x̂_0. Returns sample, pred_xstart, mean and std (σ_t)."""
    out = diffusion.p_mean_variance(model, x, t, clip_denoised=clip_denoised, model_kwargs=model_kwargs)
    x0, eps = out["pred_xstart"], out["eps"]
    with fp32_math(x.device):
        sigma = ddim_sigma(diffusion, t, eta, x0)
        ac_prev = diffusion.extract("alphas_cumprod_prev", t, x0)
        mean = torch.sqrt(ac_prev) * x0 + torch.sqrt((1.0 - ac_prev - sigma**2).clamp_min(0.0)) * eps
        if noise is None:
            noise = randn(x.shape, device=x.device, generator=generator, dtype=x0.dtype)
        sample = mean + sigma * noise  # σ_0 = 0: the last step adds no noise
    return {"sample": sample, "pred_xstart": x0, "mean": mean, "std": sigma.expand_as(mean)}


@torch.no_grad()
def ddim_sample_loop(
    model: Model,
    diffusion: GaussianDiffusion,
    shape: Sequence[int],
    *,
    eta: float = 0.0,
    device: torch.device | str | None = None,
    noise: Tensor | None = None,
    clip_denoised: bool = True,
    model_kwargs: dict[str, Any] | None = None,
    generator: torch.Generator | None = None,
    progress: ProgressFn | None = None,
) -> Tensor:
    """DDIM sampling over every step of ``diffusion`` (respace it first for fewer steps)."""
    if eta < 0.0:
        raise ValueError(f"eta must be >= 0, got {eta}")
    x = _initial_noise(shape, device, noise, generator)
    T = diffusion.num_timesteps
    for i, step in enumerate(range(T - 1, -1, -1)):
        t = _timestep_batch(step, x.shape[0], x.device)
        x = ddim_step(
            model,
            diffusion,
            x,
            t,
            eta=eta,
            clip_denoised=clip_denoised,
            model_kwargs=model_kwargs,
            generator=generator,
        )["sample"]
        if progress is not None:
            progress(i + 1, T)
    return x


def vp_score(
    model: Model,
    diffusion: GaussianDiffusion,
    x: Tensor,
    t: Tensor,
    clip_denoised: bool,
    model_kwargs: dict[str, Any] | None,
) -> Tensor:
    """∇ log p_t(x) ≈ −ε̂/√(1 − ᾱ_t) (Song et al. 2021, the VP SDE's score of a noise-prediction model), with ε̂
    re-derived from the (possibly clipped) x̂_0 as DDIM does."""
    eps = diffusion.p_mean_variance(model, x, t, clip_denoised=clip_denoised, model_kwargs=model_kwargs)["eps"]
    with fp32_math(x.device):
        return -eps / diffusion.extract("sqrt_one_minus_alphas_cumprod", t, eps)


def sde_step(
    model: Model,
    diffusion: GaussianDiffusion,
    x: Tensor,
    t: Tensor,
    *,
    clip_denoised: bool = True,
    model_kwargs: dict[str, Any] | None = None,
    noise: Tensor | None = None,
    generator: torch.Generator | None = None,
) -> dict[str, Tensor]:
    """One Euler–Maruyama step of the reverse-time VP SDE dx = [f − g² ∇log p_t] dt + g dw̄, f = −½β(t)x,
    g = √β(t) (Song et al. 2021, eqs. 6, 11), over the interval of step t of ``diffusion`` (respaced or not):
    β(t)·Δt is taken as that step's β_t = 1 − ᾱ_t/ᾱ_{t−1}, so

        x_{t−1} = x_t + ½β_t x_t + β_t ∇log p_t(x_t) + √β_t z,

    and the last step (t = 0) adds no noise (Song et al.'s final "denoise"). Returns sample and mean."""
    score = vp_score(model, diffusion, x, t, clip_denoised, model_kwargs)
    with fp32_math(x.device):
        x = x.to(score.dtype)
        beta = diffusion.extract("betas", t, x)
        mean = x + 0.5 * beta * x + beta * score
        if noise is None:
            noise = randn(x.shape, device=x.device, generator=generator, dtype=x.dtype)
        nonzero = (t != 0).to(x.dtype).reshape(-1, *([1] * (x.ndim - 1)))
        return {"sample": mean + nonzero * torch.sqrt(beta) * noise, "mean": mean}


def langevin_step(
    model: Model,
    diffusion: GaussianDiffusion,
    x: Tensor,
    t: Tensor,
    *,
    snr: float,
    clip_denoised: bool = True,
    model_kwargs: dict[str, Any] | None = None,
    noise: Tensor | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """One Langevin corrector step at the noise level of step t (Song et al. 2021, Algorithm 5, VP SDE):
    x ← x + ε s + √(2ε) z with s = ∇log p_t(x) and ε = 2 α_t (snr·‖z‖/‖s‖)², α_t = 1 − β_t.

    The norms are per sample; Song et al.'s code averages them over the batch, which would make a sample depend on
    the others of its batch (and so on the batch size and the number of ranks)."""
    if snr <= 0.0:
        raise ValueError(f"snr must be > 0, got {snr}")
    score = vp_score(model, diffusion, x, t, clip_denoised, model_kwargs)
    with fp32_math(x.device):
        x = x.to(score.dtype)
        if noise is None:
            noise = randn(x.shape, device=x.device, generator=generator, dtype=x.dtype)
        alpha = 1.0 - diffusion.extract("betas", t, x)
        norm = lambda v: v.flatten(1).norm(dim=1).reshape(-1, *([1] * (x.ndim - 1)))  # noqa: E731
        step = 2.0 * alpha * (snr * norm(noise) / norm(score).clamp_min(1e-12)) ** 2
        return x + step * score + torch.sqrt(2.0 * step) * noise


@torch.no_grad()
def sde_sample_loop(
    model: Model,
    diffusion: GaussianDiffusion,
    shape: Sequence[int],
    *,
    corrector: bool = False,
    snr: float = 0.16,
    corrector_steps: int = 1,
    device: torch.device | str | None = None,
    noise: Tensor | None = None,
    clip_denoised: bool = True,
    model_kwargs: dict[str, Any] | None = None,
    generator: torch.Generator | None = None,
    progress: ProgressFn | None = None,
) -> Tensor:
    """Reverse VP SDE sampling over every step of ``diffusion`` (respace it first for fewer steps): Euler–Maruyama
    alone, or with ``corrector`` ``corrector_steps`` Langevin steps at ``snr`` before each predictor step."""
    x = _initial_noise(shape, device, noise, generator)
    T = diffusion.num_timesteps
    common = {"clip_denoised": clip_denoised, "model_kwargs": model_kwargs, "generator": generator}
    for i, step in enumerate(range(T - 1, -1, -1)):
        t = _timestep_batch(step, x.shape[0], x.device)
        if corrector:
            for _ in range(corrector_steps):
                x = langevin_step(model, diffusion, x, t, snr=snr, **common)
        x = sde_step(model, diffusion, x, t, **common)["sample"]
        if progress is not None:
            progress(i + 1, T)
    return x


@torch.no_grad()
def ddim_invert(
    model: Model,
    diffusion: GaussianDiffusion,
    x_start: Tensor,
    respacing: str = "",
    *,
    clip_denoised: bool = False,
    model_kwargs: dict[str, Any] | None = None,
    progress: ProgressFn | None = None,
    refine: int = 0,
) -> Tensor:
    """Deterministic DDIM inversion x_0 → x_{T-1}: the η = 0 DDIM steps run backwards.

    Sampling maps x_k → x_{k-1} = √ᾱ_{k-1} x̂_0 + √(1 − ᾱ_{k-1}) ε̂(x_k, k). Inversion solves that for
    x_k with ε̂ evaluated at the known x_{k-1} (the usual first-order approximation, DDIM sec. 4.3):
    x̂_0 = (x_{k-1} − √(1 − ᾱ_{k-1}) ε̂)/√ᾱ_{k-1}, x_k = √ᾱ_k x̂_0 + √(1 − ᾱ_k) ε̂, starting from
    x_{-1} = x_0 (ᾱ_{-1} = 1). Sampling ``ddim`` with the same respacing and η = 0 from the result
    returns to ≈ x_0. Clipping x̂_0 breaks invertibility, hence off by default.

    ``refine`` > 0 adds fixed-point iterations that re-evaluate ε̂ at the current estimate of x_k, so
    x_k solves the sampling step's equation itself (each costs one more model call per step) and the
    round trip becomes exact up to the iteration's convergence.
    """
    if refine < 0:
        raise ValueError(f"refine must be >= 0, got {refine}")
    diff = respace(diffusion, respacing)
    x = x_start.to(torch.float64 if x_start.dtype == torch.float64 else torch.float32)
    T = diff.num_timesteps
    for step in range(T):
        t = _timestep_batch(step, x.shape[0], x.device)
        ac_prev = diff.extract("alphas_cumprod_prev", t, x)
        ac = diff.extract("alphas_cumprod", t, x)
        x_next = x
        for _ in range(1 + refine):
            eps = diff.predict_eps(model, x_next, t, model_kwargs)
            with fp32_math(x.device):
                x0 = (x - torch.sqrt(1.0 - ac_prev) * eps) / torch.sqrt(ac_prev)
                if clip_denoised:
                    x0 = x0.clamp(-1.0, 1.0)
                x_next = torch.sqrt(ac) * x0 + torch.sqrt(1.0 - ac) * eps
        x = x_next
        if progress is not None:
            progress(step + 1, T)
    return x


@torch.no_grad()
def generate(
    model: Model,
    diffusion: GaussianDiffusion,
    method: SamplerMethod | str = SamplerMethod.DDPM,
    respacing: str = "",
    shape: Sequence[int] = (1, 3, 32, 32),
    device: torch.device | str | None = None,
    model_kwargs: dict[str, Any] | None = None,
    generator: torch.Generator | None = None,
    clip_denoised: bool = True,
    eta: float = 0.0,
    churn: float = 0.0,
    progress: ProgressFn | None = None,
    *,
    noise: Tensor | None = None,
    sigma_schedule: SigmaSchedule | str = SigmaSchedule.KARRAS,
    sigma_min: float | None = None,
    sigma_max: float | None = None,
    rho: float = 7.0,
    s_tmin: float = 0.0,
    s_tmax: float = math.inf,
    s_noise: float = 1.0,
    snr: float = 0.16,
    corrector_steps: int = 1,
) -> Tensor:
    """Draw samples of ``shape`` with one of the samplers; returns float32 images (clamped to
    [-1, 1] when ``clip_denoised``).

    ``respacing`` (see ``space_timesteps``) sets the steps: for ddpm/ddim the kept timesteps; for
    euler/heun the number of σ levels K (Heun costs 2K − 1 model calls), placed by
    ``sigma_schedule``. ``eta`` is DDIM's η; ``churn`` is EDM's S_churn (with s_tmin, s_tmax,
    s_noise) for euler/heun. ``snr`` and ``corrector_steps`` set pc's Langevin corrector (sde and pc take the
    kept timesteps like ddpm). ``noise`` fixes x_T; otherwise it is drawn from ``generator``.
    """
    kind = parse_enum(SamplerMethod, method, "sampling method")
    shape = tuple(int(s) for s in shape)
    if kind in (SamplerMethod.DDPM, SamplerMethod.DDIM):
        diff = respace(diffusion, respacing)
        common = {
            "device": device,
            "noise": noise,
            "clip_denoised": clip_denoised,
            "model_kwargs": model_kwargs,
            "generator": generator,
            "progress": progress,
        }
        if kind is SamplerMethod.DDPM:
            x = ddpm_sample_loop(model, diff, shape, **common)
        else:
            x = ddim_sample_loop(model, diff, shape, eta=eta, **common)
    elif kind in (SamplerMethod.SDE, SamplerMethod.PC):
        diff = respace(diffusion, respacing)
        x = sde_sample_loop(
            model,
            diff,
            shape,
            corrector=kind is SamplerMethod.PC,
            snr=snr,
            corrector_steps=corrector_steps,
            device=device,
            noise=noise,
            clip_denoised=clip_denoised,
            model_kwargs=model_kwargs,
            generator=generator,
            progress=progress,
        )
    else:
        schedule = parse_enum(SigmaSchedule, sigma_schedule, "sigma_schedule")
        kept = space_timesteps(diffusion.num_timesteps, respacing)
        denoiser = EpsDenoiser(model, diffusion, model_kwargs, clip_denoised)
        if schedule is SigmaSchedule.KARRAS:
            levels = edm_sigma_levels(diffusion, len(kept), sigma_min=sigma_min, sigma_max=sigma_max, rho=rho)
        else:
            levels = denoiser.sigmas[kept[::-1]]
        x = edm_sample(
            denoiser,
            levels,
            shape,
            device=device,
            heun=kind is SamplerMethod.HEUN,
            churn=churn,
            s_tmin=s_tmin,
            s_tmax=s_tmax,
            s_noise=s_noise,
            noise=noise,
            generator=generator,
            progress=progress,
        )
    x = x.float()
    return x.clamp(-1.0, 1.0) if clip_denoised else x
