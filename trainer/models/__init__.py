"""Denoising networks. The trainer builds them with :func:`build_unet` from ``cfg.model``."""

from trainer.models.unet import UNet, build_model, build_unet, count_parameters, describe, estimate_flops_per_image

__all__ = ["UNet", "build_model", "build_unet", "count_parameters", "describe", "estimate_flops_per_image"]
