"""Gaussian diffusion core: schedules, q/p, hybrid losses, bits/dim, respacing and samplers.

Pure PyTorch (+ numpy for float64 tables); knows nothing of DeepSpeed, tracking or files.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .gaussian import GaussianDiffusion, LossType, ModelMeanType, ModelVarType, parse_enum
from .respace import respace, space_timesteps
from .schedules import ScheduleType, get_betas

if TYPE_CHECKING:
    from trainer.config import DiffusionConfig


def create_diffusion(
    steps: int = 4000,
    schedule: str | ScheduleType = "cosine",
    mean_type: str | ModelMeanType = "epsilon",
    var_type: str | ModelVarType = "learned_range",
    loss: str | LossType = "hybrid",
    vlb_weight: float = 0.001,
    respacing: str = "",
) -> GaussianDiffusion:
    """The diffusion of a config: ``steps`` training steps on ``schedule``; ``respacing`` ("" for
    none, "K", "a,b,c" or "ddimK") returns the respaced process whose model calls use the original
    timesteps."""
    base = GaussianDiffusion(
        get_betas(schedule, steps),
        mean_type=parse_enum(ModelMeanType, mean_type, "mean_type"),
        var_type=parse_enum(ModelVarType, var_type, "var_type"),
        loss_type=parse_enum(LossType, loss, "loss"),
        vlb_weight=vlb_weight,
    )
    return respace(base, respacing) if respacing else base


def diffusion_from_config(d: DiffusionConfig) -> GaussianDiffusion:
    """The (unrespaced) diffusion a ``diffusion:`` config section describes: training, bits/dim, sampling."""
    return create_diffusion(
        steps=d.steps,
        schedule=d.schedule,
        mean_type=d.mean_type,
        var_type=d.var_type,
        loss=d.loss,
        vlb_weight=d.vlb_weight,
    )


__all__ = [
    "GaussianDiffusion",
    "LossType",
    "ModelMeanType",
    "ModelVarType",
    "ScheduleType",
    "create_diffusion",
    "diffusion_from_config",
    "get_betas",
    "respace",
    "space_timesteps",
]
