"""Small building blocks shared by the UNet: float32 GroupNorm, zero-init, timestep sinusoids."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class GroupNorm32(nn.GroupNorm):
    """GroupNorm whose statistics are always computed in float32.

    The variance of a bf16 activation map loses most of its precision (8-bit mantissa), so the
    input, weight and bias are promoted to float32 and the result is cast back to the input's dtype.
    This holds both when the module's parameters are bf16 (DeepSpeed bf16) and under autocast.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight.float() if self.weight is not None else None
        bias = self.bias.float() if self.bias is not None else None
        # Under autocast group_norm is a float32 op, so these float32 inputs pass through unchanged.
        out = F.group_norm(x.float(), self.num_groups, weight, bias, self.eps)
        return out.to(x.dtype)


def zero_module(module: nn.Module) -> nn.Module:
    """Zero every parameter of ``module`` (in place) and return it.

    Used for the last convolution of each residual branch and of the output head, so that a fresh
    network is the identity on every residual path and predicts exactly zero (Ho et al. 2020's
    released code; Nichol & Dhariwal 2021 keep it).
    """
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10_000.0) -> torch.Tensor:
    """Sinusoidal embedding of timesteps, float32, shape ``[N, dim]``.

    The frequencies follow the Transformer position encoding (Vaswani et al. 2017), used by
    Ho et al. 2020: ``freq_i = max_period^(-i/half)`` for ``i < half = dim // 2``; the embedding is
    ``[cos(t·freq), sin(t·freq)]`` (zero-padded when ``dim`` is odd). ``t`` holds the *original*
    timestep values (respaced samplers pass them unchanged), integers or floats.
    """
    if t.ndim != 1:
        raise ValueError(f"timesteps must be a 1-D tensor, got shape {tuple(t.shape)}")
    half = dim // 2
    # (−log P · i)/half in this order, as improved-diffusion computes it: (i/half) first differs by an ulp,
    # which at t ~ 1000 moves the sinusoid of an imported checkpoint by ~1e-5.
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.to(torch.float32)[:, None] * freqs[None, :]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=1)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb
