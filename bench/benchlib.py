"""What several benchmarks share: the machine's description and the bare training loop they compare against.

Imported as a sibling module (``from benchlib import ...``): the benchmarks run as scripts from ``bench/``.
"""

from __future__ import annotations

import os
import platform
from collections.abc import Callable
from pathlib import Path
from typing import Any


def cpu_name() -> str:
    """The CPU's model name (``/proc/cpuinfo``), else what ``platform`` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> dict[str, Any]:
    import torch

    return {"cpu": cpu_name(), "cpus": os.cpu_count(), "torch": torch.__version__}


def bare_step(
    cfg: Any, manifest: Any, device: Any, next_batch: Callable[[], Any], bf16: bool = False
) -> Callable[[], None]:
    """One plain PyTorch training step per call on what the trainer would train: the same UNet (same seed), the
    same Improved-DDPM loss, torch's fused AdamW and the same gradient clipping; t uniform. ``next_batch()``
    gives the images (already decoded; on ``device``). ``bf16``: autocast the model, the variance and KL
    arithmetic stays in fp32 as in the trainer."""
    import contextlib

    import torch

    from trainer.diffusion import diffusion_from_config
    from trainer.models.unet import build_model

    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg, manifest.image_size, manifest.channels).to(device).train()
    params = list(model.parameters())
    opt = torch.optim.AdamW(params, lr=cfg.train.lr, weight_decay=cfg.train.weight_decay, fused=True)
    diffusion = diffusion_from_config(cfg.diffusion)

    def call(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        cast = torch.autocast(device_type=device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
        with cast:
            return model(x, t).float()

    def step() -> None:
        x = next_batch()
        t = torch.randint(0, diffusion.num_timesteps, (x.shape[0],), device=device)
        loss = diffusion.training_losses(call, x, t)["loss"].mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.train.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(params, cfg.train.grad_clip)
        opt.step()

    return step
