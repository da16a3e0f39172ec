"""Noise schedules against independent float64 formulas (Ho et al. 2020; Nichol & Dhariwal 2021)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from trainer.diffusion import create_diffusion
from trainer.diffusion.schedules import get_betas


def _cosine_f(u: float, s: float = 0.008) -> float:
    return math.cos((u + s) / (1 + s) * math.pi / 2) ** 2


@pytest.mark.parametrize("T", [50, 1000, 4000])
def test_linear_schedule_scaled_by_1000_over_T(T: int) -> None:
    betas = get_betas("linear", T)
    assert betas.dtype == np.float64 and betas.shape == (T,)
    lo, hi = 1e-4 * 1000 / T, 0.02 * 1000 / T
    expected = [lo + (hi - lo) * i / (T - 1) for i in range(T)]
    np.testing.assert_allclose(betas, expected, rtol=1e-12, atol=0)


@pytest.mark.parametrize("T", [50, 200, 4000])
def test_cosine_schedule_matches_alpha_bar_ratio_and_clip(T: int) -> None:
    betas = get_betas("cosine", T)
    assert betas.dtype == np.float64
    expected = [min(1 - _cosine_f((i + 1) / T) / _cosine_f(i / T), 0.999) for i in range(T)]
    np.testing.assert_allclose(betas, expected, rtol=1e-12, atol=0)
    # f(1) = 0, so the last step is the clipped one.
    assert betas[-1] == 0.999
    # Away from the clip, ᾱ_t = f(t+1)/f(0) (0-indexed: ᾱ after step t).
    diff = create_diffusion(steps=T, schedule="cosine", var_type="fixed_small", loss="mse")
    unclipped = [i for i in range(T) if 1 - _cosine_f((i + 1) / T) / _cosine_f(i / T) < 0.999]
    upto = unclipped[-1] + 1
    ref = np.array([_cosine_f((i + 1) / T) / _cosine_f(0.0) for i in range(upto)])
    np.testing.assert_allclose(diff.alphas_cumprod[:upto], ref, rtol=1e-10)


def test_paper_values_T4000_cosine() -> None:
    betas = get_betas("cosine", 4000)
    # β_0 = 1 − f(1/T)/f(0), hand-evaluated: θ_i = (i/T + s)/(1 + s)·π/2.
    th0 = 0.008 / 1.008 * math.pi / 2
    th1 = (0.00025 + 0.008) / 1.008 * math.pi / 2
    assert betas[0] == pytest.approx(1 - (math.cos(th1) / math.cos(th0)) ** 2, rel=1e-12)
    assert np.all(np.diff(betas) > 0)  # monotone noise increase


def test_bad_schedule_inputs_raise_clear_errors() -> None:
    with pytest.raises(ValueError, match="unknown noise schedule 'quadratic'"):
        get_betas("quadratic", 100)
    with pytest.raises(ValueError, match="integer >= 2"):
        get_betas("cosine", 1)
    with pytest.raises(ValueError, match="more than 20 steps"):
        get_betas("linear", 20)
