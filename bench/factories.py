"""Model factories for bench/bench_samplers.py: ``python bench/bench_samplers.py --factory factories:quickstart``."""

from __future__ import annotations

import torch

from trainer.diffusion import GaussianDiffusion
from trainer.inference import base_diffusion, load_for_inference

QUICKSTART_RUN = "runs/quickstart"


def quickstart() -> tuple[torch.nn.Module, GaussianDiffusion, tuple[int, int, int]]:
    """The EMA model of the newest ``make quickstart`` run (run that first)."""
    cfg, model, meta = load_for_inference(QUICKSTART_RUN, use_ema=True, ema_rate=None, device=torch.device("cpu"))
    return model, base_diffusion(cfg), (meta["channels"], meta["image_size"], meta["image_size"])
