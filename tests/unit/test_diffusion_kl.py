"""Gaussian KL and the discretized Gaussian decoder against independent float64 computations."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from trainer.diffusion.kl import discretized_gaussian_log_likelihood, nats_to_bpd, normal_kl

CENTRES = torch.tensor([-1.0 + 2.0 * k / 255.0 for k in range(256)], dtype=torch.float64)


def _bin_probs_ref(mean: float, std: float) -> np.ndarray:
    """P(bin k) for N(mean, std²) with edge bins to ±∞, by math.erfc in float64 (upper tails
    computed as erfc differences to stay accurate)."""

    def sf(z: float) -> float:  # P(Z > z)
        return 0.5 * math.erfc(z / math.sqrt(2.0))

    probs = []
    for k in range(256):
        lo = -math.inf if k == 0 else (-1.0 + (2 * k - 1) / 255.0 - mean) / std
        hi = math.inf if k == 255 else (-1.0 + (2 * k + 1) / 255.0 - mean) / std
        probs.append(sf(lo) - sf(hi) if lo > -hi else sf(-hi) - sf(-lo))
    return np.array(probs)


def test_normal_kl_zero_for_equal_gaussians() -> None:
    g = torch.Generator().manual_seed(0)
    m, lv = torch.randn(64, generator=g), torch.randn(64, generator=g)
    assert torch.allclose(normal_kl(m, lv, m, lv), torch.zeros(64), atol=1e-7)


def test_normal_kl_closed_form_and_monte_carlo() -> None:
    m1, s1, m2, s2 = 0.3, 0.7, -0.4, 1.3
    ref = math.log(s2 / s1) + (s1**2 + (m1 - m2) ** 2) / (2 * s2**2) - 0.5
    kl = normal_kl(
        torch.tensor(m1, dtype=torch.float64),
        torch.tensor(2 * math.log(s1), dtype=torch.float64),
        torch.tensor(m2, dtype=torch.float64),
        torch.tensor(2 * math.log(s2), dtype=torch.float64),
    )
    assert float(kl) == pytest.approx(ref, rel=1e-12)
    # Monte Carlo E_{x~N1}[log N1(x) − log N2(x)].
    rng = np.random.default_rng(0)
    x = rng.normal(m1, s1, size=400_000)
    log_ratio = -np.log(s1) - 0.5 * ((x - m1) / s1) ** 2 - (-np.log(s2) - 0.5 * ((x - m2) / s2) ** 2)
    se = log_ratio.std() / math.sqrt(x.size)
    assert abs(log_ratio.mean() - float(kl)) < 4 * se


@pytest.mark.parametrize(
    ("mean", "std"),
    [(0.0, 0.1), (0.37, 0.004), (-1.5, 0.2), (0.999, 1e-3), (0.2, 3.0), (1.2, 0.05)],
)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_decoder_probabilities_over_all_bins_sum_to_one(mean: float, std: float, dtype: torch.dtype) -> None:
    x = CENTRES.to(dtype)
    logp = discretized_gaussian_log_likelihood(x, torch.full_like(x, mean), torch.full_like(x, math.log(std))).double()
    tol = 1e-10 if dtype == torch.float64 else 2e-5
    assert float(logp.exp().sum()) == pytest.approx(1.0, abs=tol)
    ref = _bin_probs_ref(mean, std)
    big = ref > 1e-6
    np.testing.assert_allclose(logp.exp().numpy()[big], ref[big], rtol=1e-9 if dtype == torch.float64 else 1e-3)


def test_decoder_upper_tail_is_accurate_in_float32() -> None:
    # Bins 6-12 σ above the mean: Φ(hi) − Φ(lo) in float32 would cancel to 0 (log = −inf).
    mean, std = -0.2, 0.02
    ks = [k for k in range(256) if 6 < (CENTRES[k].item() - mean) / std < 12]
    x = CENTRES[ks].float()
    logp = discretized_gaussian_log_likelihood(x, torch.full_like(x, mean), torch.full_like(x, math.log(std)))
    ref = np.log(_bin_probs_ref(mean, std)[ks])
    np.testing.assert_allclose(logp.double().numpy(), ref, rtol=1e-4)


def test_decoder_gradients_are_finite_everywhere() -> None:
    x = CENTRES.float().repeat(3)
    means = torch.cat([torch.full((256,), -0.9), torch.full((256,), 0.9), torch.zeros(256)])
    log_scales = torch.cat([torch.full((256,), math.log(1e-3)), torch.full((256,), -1.0), torch.zeros(256)])
    means.requires_grad_(True)
    log_scales.requires_grad_(True)
    discretized_gaussian_log_likelihood(x, means, log_scales).sum().backward()
    assert torch.isfinite(means.grad).all() and torch.isfinite(log_scales.grad).all()


def test_nats_to_bpd_is_mean_over_pixels_over_log2() -> None:
    nats = torch.arange(24, dtype=torch.float64).reshape(2, 3, 2, 2)
    expected = torch.tensor([nats[0].mean() / math.log(2), nats[1].mean() / math.log(2)])
    assert torch.allclose(nats_to_bpd(nats), expected)
