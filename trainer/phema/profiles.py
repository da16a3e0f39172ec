"""The power-function EMA profiles of Karras et al. 2024 (EDM2, "Analyzing and Improving the Training
Dynamics of Diffusion Models", section 3 and appendix C), as pure float64 functions.

A power-function EMA with exponent γ averages the weights θ_1..θ_t of kept optimizer steps with
β_t = (1 - 1/t)^(γ+1) (EDM2 eq. 3): θ̂_t = β_t·θ̂_{t-1} + (1 - β_t)·θ_t. Unrolled, step τ gets the weight
w_t(τ) = (τ^(γ+1) - (τ-1)^(γ+1)) / t^(γ+1) (the products of β telescope), whose continuous limit is the
profile p_t(τ) = (γ+1)·τ^γ / t^(γ+1) on [0, t]. Its width is σ_rel = std(p_t)/t (EDM2 eq. 2):
σ_rel² = (γ+1) / ((γ+2)²·(γ+3)).

Reconstruction (EDM2 appendix C.3): the snapshots hold profiles p_i (time t_i, exponent γ_i); the profile
wanted, p_r, is approximated by Σ x_i·p_i with x minimising ∫(p_r - Σ x_i p_i)² dτ, i.e. A·x = b with
A_ij = <p_i, p_j>, b_i = <p_i, p_r>; the coefficients are then scaled to sum to 1 so the result is an
average of weights (the profile integrates to 1).
"""

from __future__ import annotations

import math

import numpy as np

SIGMA_REL_MAX = math.sqrt(1.0 / 12.0)
"""σ_rel of γ = 0 (the uniform average of every step so far): wider profiles need γ < 0, whose first step
gets a weight that does not vanish as t grows; we do not offer them."""


def sigma_rel_to_gamma(sigma_rel: float) -> float:
    """γ of the profile of width ``sigma_rel`` in (0, SIGMA_REL_MAX]: the largest real root of
    γ³ + 7γ² + (16 - 1/σ²)γ + (12 - 1/σ²) = 0 (EDM2 eq. 2 multiplied out), found by bisection on the
    monotone branch γ >= 0."""
    if not 0.0 < sigma_rel <= SIGMA_REL_MAX:
        raise ValueError(f"sigma_rel {sigma_rel} outside (0, {SIGMA_REL_MAX:.4f}]")
    target = sigma_rel * sigma_rel
    lo, hi = 0.0, 1.0
    while gamma_to_sigma_rel(hi) ** 2 > target:  # σ_rel decreases in γ for γ >= 0
        hi *= 2.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if gamma_to_sigma_rel(mid) ** 2 > target:
            lo = mid
        else:
            hi = mid
        if hi - lo <= 1e-15 * max(1.0, hi):
            break
    return 0.5 * (lo + hi)


def gamma_to_sigma_rel(gamma: float) -> float:
    """EDM2 eq. 2: the relative standard deviation of the profile of exponent ``gamma`` (> -1)."""
    return math.sqrt((gamma + 1.0) / ((gamma + 2.0) ** 2 * (gamma + 3.0)))


def beta(t: float, gamma: float) -> float:
    """EDM2 eq. 3: the decay applied at kept step ``t`` (1-based); 0 at t = 1 (the EMA starts at θ_1)."""
    return (1.0 - 1.0 / t) ** (gamma + 1.0)


def sigma_rel_of_decay(decay: float, t: float) -> float:
    """The σ_rel of a classical EMA with per-step ``decay`` seen at step ``t``, matching standard deviations:
    its profile is (close to) exponential with rate λ = -ln(decay) per step, std 1/λ (when 1/λ << t)."""
    if not 0.0 < decay < 1.0:
        raise ValueError(f"decay {decay} outside (0, 1)")
    return 1.0 / (-math.log(decay) * t)


def sigma_rel_of_half_life(half_life: float, length: float) -> float:
    """σ_rel of an exponential EMA whose weights halve every ``half_life`` (images, say) after a training
    of ``length`` (same unit): std = half_life / ln 2."""
    if half_life <= 0:
        raise ValueError(f"half-life {half_life} must be > 0")
    return half_life / (math.log(2.0) * length)


def profile_dot(t_a: np.ndarray, gamma_a: np.ndarray, t_b: np.ndarray, gamma_b: np.ndarray) -> np.ndarray:
    """<p_a, p_b> = ∫_0^min(t_a,t_b) p_a(τ)·p_b(τ) dτ for continuous profiles, broadcast over the inputs.

    = (γ_a+1)(γ_b+1)·m^(γ_a+γ_b+1) / ((γ_a+γ_b+1)·t_a^(γ_a+1)·t_b^(γ_b+1)), m = min(t_a, t_b)
    = (γ_a+1)(γ_b+1)·(m/M)^γ_long / ((γ_a+γ_b+1)·M), M = max(t_a, t_b), γ_long the exponent of the profile
    of time M: the ratio m/M <= 1 keeps it from overflowing for large t or γ."""
    t_a, g_a, t_b, g_b = (np.asarray(v, dtype=np.float64) for v in (t_a, gamma_a, t_b, gamma_b))
    a_shorter = t_a < t_b
    ratio = np.where(a_shorter, t_a / t_b, t_b / t_a)
    exponent = np.where(a_shorter, g_b, g_a)
    return (g_a + 1.0) * (g_b + 1.0) * ratio**exponent / ((g_a + g_b + 1.0) * np.maximum(t_a, t_b))


def solve_coefficients(
    snap_t: np.ndarray, snap_gamma: np.ndarray, out_t: np.ndarray, out_gamma: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Least-squares coefficients (one column per wanted profile, each summing to 1) that combine the
    snapshot profiles into the wanted ones, and each combination's relative L2 error
    ||p_r - Σ x_i p_i|| / ||p_r|| (after the normalisation), from the closed-form inner products."""
    st, sg = np.asarray(snap_t, np.float64)[:, None], np.asarray(snap_gamma, np.float64)[:, None]
    ot, og = np.asarray(out_t, np.float64)[None, :], np.asarray(out_gamma, np.float64)[None, :]
    a = profile_dot(st, sg, st.T, sg.T)
    b = profile_dot(st, sg, ot, og)
    x = np.linalg.lstsq(a, b, rcond=None)[0]
    x = x / x.sum(axis=0, keepdims=True)
    own = profile_dot(ot, og, ot, og)[0]
    err2 = own - 2.0 * np.einsum("ij,ij->j", x, b) + np.einsum("ij,ik,kj->j", x, a, x)
    return x, np.sqrt(np.maximum(err2, 0.0) / own)
