"""Classifier-free guidance (Ho & Salimans 2022): label dropout in training, guided predictions at sampling.

Training replaces a fraction of the labels by the null class (:func:`drop_labels`, index
``num_classes`` of the UNet's class embedding), so one network learns both the conditional model
ε(x_t, y) and the unconditional one ε(x_t) = ε(x_t, null). Sampling then combines the two
(:class:`ClassifierFreeGuidance`)::

    ε̃ = ε_uncond + s · (ε_cond − ε_uncond)

This module's ``guidance_scale`` ``s`` is the paper's ``1 + w`` (``w = s − 1``): ``s = 1`` is the plain
conditional model, ``s = 0`` the unconditional one, ``s > 1`` strengthens the condition (the paper's
``w > 0``). The wrapper is an ordinary ``model(x, t, y)`` callable, so every sampler in
``trainer.diffusion.samplers`` (ddpm, ddim, euler, heun) uses it unchanged.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn


def drop_labels(
    y: Tensor,
    p: float,
    null_class: int,
    generator: torch.Generator | None = None,
    uniform: Tensor | None = None,
) -> Tensor:
    """``y`` with each label independently replaced by ``null_class`` with probability ``p``.

    The decision for label ``i`` is ``uniform[i] < p`` when ``uniform`` is given (the trainer passes each
    sample's own uniform, ``trainer/per_sample.py``), else a draw on ``y``'s device from ``generator`` (the
    global torch RNG when None). ``p == 0`` returns ``y`` itself and draws nothing."""
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"label dropout probability must lie in [0, 1], got {p}")
    if p == 0.0:
        return y
    if uniform is None:
        uniform = torch.rand(y.shape, device=y.device, generator=generator)
    return y.masked_fill(uniform < p, null_class)


class ClassifierFreeGuidance(nn.Module):
    """``model`` with classifier-free guidance: ``forward(x, t, y)`` returns the guided prediction.

    ``guidance_scale`` is ``s`` in ``ε̃ = ε_uncond + s·(ε_cond − ε_uncond)`` (``w = s − 1`` in Ho &
    Salimans 2022): 1 is the conditional model (then the model is called once, unchanged), 0 the
    unconditional one. ``null_class`` is the label of the unconditional model, ``num_classes`` for
    :class:`trainer.models.unet.UNet`; it must have been trained (``model.label_dropout > 0``).

    Each call is one model call on the doubled batch ``[x, x]``, ``[t, t]``, ``[y, null]``. The first
    ``C = x.shape[1]`` output channels are guided; with a learned variance (``2·C`` output channels,
    ``var_type: learned_range``) the other ``C`` are the conditional prediction's, unchanged. The same
    combination of x_0 predictions (``mean_type: x0``) is the same guidance, since x_0 is affine in ε for
    a given x_t. ``y=None`` means unconditional: the model is called once with the null class. The
    guided combination is computed in at least float32.
    """

    def __init__(self, model: nn.Module, guidance_scale: float, null_class: int) -> None:
        super().__init__()
        scale = float(guidance_scale)
        if not math.isfinite(scale) or scale < 0:
            raise ValueError(
                f"guidance_scale must be a finite number >= 0 (1: conditional, 0: unconditional), got {guidance_scale}"
            )
        if getattr(model, "class_embed", True) is None:
            raise ValueError("classifier-free guidance needs a class-conditional model (model.class_cond)")
        model_null = getattr(model, "num_classes", None)
        if model_null is not None and null_class != model_null:
            raise ValueError(f"null_class {null_class} is not the model's null class {model_null}")
        self.model = model
        self.guidance_scale = scale
        self.null_class = int(null_class)

    def forward(self, x: Tensor, t: Tensor, y: Tensor | None = None) -> Tensor:
        if y is None:
            return self.model(x, t, torch.full((x.shape[0],), self.null_class, dtype=torch.long, device=x.device))
        if self.guidance_scale == 1.0:
            return self.model(x, t, y)
        out = self.model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, torch.full_like(y, self.null_class)]))
        cond, uncond = out.chunk(2)
        c = x.shape[1]
        if cond.shape[1] not in (c, 2 * c):
            raise ValueError(f"model output has {cond.shape[1]} channels, expected {c} or {2 * c} (learned variance)")
        dtype = torch.promote_types(out.dtype, torch.float32)
        eps_c, eps_u = cond[:, :c].to(dtype), uncond[:, :c].to(dtype)
        guided = eps_u + self.guidance_scale * (eps_c - eps_u)
        if cond.shape[1] == c:
            return guided
        return torch.cat([guided, cond[:, c:].to(dtype)], dim=1)
