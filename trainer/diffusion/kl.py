"""Likelihood pieces of L_vlb: Gaussian KL, discretized Gaussian decoder log-likelihood, bits/dim.

All functions are elementwise (broadcasting) and return nats unless the name says bits.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

LN2 = math.log(2.0)


def normal_kl(mean1: Tensor, logvar1: Tensor, mean2: Tensor, logvar2: Tensor) -> Tensor:
    """KL(N(mean1, e^logvar1) ‖ N(mean2, e^logvar2)) elementwise, in nats (Ho et al. 2020, eq. 5 terms)."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def discretized_gaussian_log_likelihood(x: Tensor, means: Tensor, log_scales: Tensor, num_bins: int = 256) -> Tensor:
    """log p(x) of the discretized Gaussian decoder (Ho et al. 2020, eq. 13), elementwise, nats.

    x holds pixel values on the grid of ``num_bins`` levels spread over [-1, 1] (bins 2/(num_bins-1)
    wide); each bin is the Gaussian mass over [x − w/2, x + w/2], with the first bin extended to −∞
    and the last to +∞ so that the probabilities over all bins sum to 1. ``log_scales`` is log σ
    (half the log-variance).

    Numerics: naive Φ(hi) − Φ(lo) cancels to 0 in float32 a few σ into the upper tail. The bin is
    mirrored into the lower tail (Φ(hi) − Φ(lo) = Φ(−lo) − Φ(−hi)), where log Φ is accurate, and the
    difference is taken in log space. The edge bins reuse the same two log Φ values: the complement
    needed there is of a probability ≤ 1/2, so log1p(−Φ) stays accurate.
    """
    half = 1.0 / (num_bins - 1)
    centered = x - means
    inv_std = torch.exp(-log_scales)
    lo = (centered - half) * inv_std
    hi = (centered + half) * inv_std
    flip = (lo + hi) > 0
    log_a = torch.special.log_ndtr(torch.where(flip, -hi, lo))  # the smaller mirrored bound
    log_b = torch.special.log_ndtr(torch.where(flip, -lo, hi))  # the larger one
    # −expm1(log_a − log_b) = 1 − Φ(a)/Φ(b); the floor keeps log (and its gradient) finite when the
    # bin is numerically empty.
    log_mid = log_b + torch.log(torch.clamp_min(-torch.expm1(log_a - log_b), 1e-30))
    log_rest = torch.log1p(-torch.exp(log_a))  # log(1 − Φ(a)), Φ(a) ≤ 1/2
    log_cdf_hi = torch.where(flip, log_rest, log_b)  # lowest bin: log P(X < x + w/2)
    log_sf_lo = torch.where(flip, log_b, log_rest)  # highest bin: log P(X > x − w/2)
    edge = 1.0 - half  # halfway between the outermost bin centre and its neighbour's centre
    return torch.where(x < -edge, log_cdf_hi, torch.where(x > edge, log_sf_lo, log_mid))


def mean_flat(x: Tensor) -> Tensor:
    """Mean over every dimension except the first (batch)."""
    return x.reshape(x.shape[0], -1).mean(dim=1)


def nats_to_bpd(nats: Tensor) -> Tensor:
    """Per-sample bits/dim from elementwise nats: mean over pixel dims divided by log 2."""
    return mean_flat(nats) / LN2
