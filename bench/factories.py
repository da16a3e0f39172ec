"""Model factories for bench/bench_samplers.py: ``python bench/bench_samplers.py --factory factories:quickstart``."""

from __future__ import annotations

import torch

from trainer.diffusion import GaussianDiffusion, diffusion_from_config
from trainer.evaluation.inference import load_for_inference

QUICKSTART_RUN = "runs/quickstart"


def quickstart() -> tuple[torch.nn.Module, GaussianDiffusion, tuple[int, int, int]]:
    """The EMA model of the newest ``make quickstart`` run (run that first)."""
    cfg, model, meta = load_for_inference(QUICKSTART_RUN, use_ema=True, ema_rate=None, device=torch.device("cpu"))
    return model, diffusion_from_config(cfg.diffusion), (meta["channels"], meta["image_size"], meta["image_size"])
