"""Sampling from a set of weights: shared by the trainer's end-of-run grid and ``trainer/sample.py``."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from trainer.config import Config
from trainer.diffusion import GaussianDiffusion, create_diffusion
from trainer.diffusion.samplers import generate
from trainer.images import grid_png, to_uint8
from trainer.models.unet import build_unet


def build_inference_model(
    cfg: Config,
    weights: dict[str, torch.Tensor],
    image_size: int,
    channels: int,
    num_classes: int | None,
    device: torch.device,
) -> torch.nn.Module:
    model = build_unet(
        cfg.model,
        image_size=image_size,
        in_channels=channels,
        learn_sigma=cfg.diffusion.var_type == "learned_range",
        num_classes=num_classes,
    )
    model.load_state_dict(weights)
    return model.to(device).eval()


def base_diffusion(cfg: Config) -> GaussianDiffusion:
    d = cfg.diffusion
    return create_diffusion(
        steps=d.steps,
        schedule=d.schedule,
        mean_type=d.mean_type,
        var_type=d.var_type,
        loss=d.loss,
        vlb_weight=d.vlb_weight,
        respacing="",
    )


@torch.no_grad()
def sample_images(
    cfg: Config,
    model: torch.nn.Module,
    shape: tuple[int, int, int],
    num_samples: int,
    num_classes: int | None,
    device: torch.device,
    labels: torch.Tensor | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """``num_samples`` images as uint8 NHWC, in batches of ``cfg.sample.batch_size``, plus their labels.

    Class-conditional models get ``labels`` (or labels cycling through the classes)."""
    s = cfg.sample
    diffusion = base_diffusion(cfg)
    gen = torch.Generator(device=device).manual_seed(s.seed)
    if num_classes and labels is None:
        labels = torch.arange(num_samples) % num_classes
    out, ys = [], []
    for start in range(0, num_samples, s.batch_size):
        n = min(s.batch_size, num_samples - start)
        kwargs = {}
        if num_classes and labels is not None:
            y = labels[start : start + n].to(device)
            kwargs["y"] = y
            ys.append(y.cpu())
        x = generate(
            model,
            diffusion,
            method=s.method,
            respacing=s.steps,
            shape=(n, *shape),
            device=device,
            model_kwargs=kwargs,
            generator=gen,
            clip_denoised=s.clip_denoised,
            eta=s.eta,
            churn=s.churn,
            progress=progress,
        )
        out.append(to_uint8(x))
    arr = np.concatenate(out)
    lab = torch.cat(ys).numpy() if ys else np.zeros(len(arr), dtype=np.int64)
    return arr, lab


def generate_grid(
    cfg: Config,
    weights: dict[str, torch.Tensor],
    image_size: int,
    channels: int,
    num_classes: int | None,
    device: torch.device,
) -> tuple[bytes, np.ndarray]:
    model = build_inference_model(cfg, weights, image_size, channels, num_classes, device)
    arr, _ = sample_images(cfg, model, (channels, image_size, image_size), cfg.sample.num_samples, num_classes, device)
    scale = max(1, 128 // image_size)  # small images are enlarged so the grid is viewable
    return grid_png(arr, scale=scale), arr


def load_for_inference(
    path: str, use_ema: bool, ema_rate: float | None, device: torch.device
) -> tuple[Config, torch.nn.Module, dict]:
    """Model and config from an export file (or the newest one under a run directory)."""
    from trainer.checkpoint import CheckpointError, load_export
    from trainer.config import config_from_dict

    state = load_export(path)
    cfg = config_from_dict(state["config"], source=state["path"])
    meta = dict(state["meta"], step=state["step"], path=state["path"])
    if use_ema:
        rate = str(ema_rate if ema_rate is not None else cfg.sample_ema_rate)
        if rate not in state["ema"]:
            raise CheckpointError(f"{state['path']}: no EMA at rate {rate} (has {', '.join(state['ema'])})")
        weights = state["ema"][rate]
        meta["weights"] = f"ema {rate}"
    else:
        weights = state["model"]
        meta["weights"] = "raw"
    model = build_inference_model(cfg, weights, meta["image_size"], meta["channels"], meta["num_classes"], device)
    return cfg, model, meta
