"""Time each sampler × step count per image for a model callable.

    python bench/bench_samplers.py                       # a small random conv net stand-in, CPU
    python bench/bench_samplers.py --factory pkg.mod:fn  # fn() -> (model, diffusion, (C, H, W))
    python bench/bench_samplers.py --device cuda --batch 64 --configs ddpm:50,ddim:25,heun:25

Writes bench/results/samplers.json and bench/results/samplers.md (or --out-stem). The stand-in net
measures sampler overhead plus a fixed per-call model cost; pass the real model through --factory
for numbers that matter. NFE counts model calls per sample.
"""

from __future__ import annotations

import argparse
import importlib
import json
import platform
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from trainer.diffusion import GaussianDiffusion, create_diffusion
from trainer.diffusion.samplers import generate

DEFAULT_CONFIGS = "ddpm:50,ddpm:250,ddim:25,ddim:50,euler:50,heun:25"
RESULTS = Path(__file__).resolve().parent / "results"


class _StandIn(nn.Module):
    """Two 3×3 convs with a timestep bias: a fixed, cheap per-call cost."""

    def __init__(self, channels: int, out_channels: int, width: int = 64, steps: int = 4000) -> None:
        super().__init__()
        self.inp = nn.Conv2d(channels, width, 3, padding=1)
        self.emb = nn.Embedding(steps, width)
        self.out = nn.Conv2d(width, out_channels, 3, padding=1)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        h = torch.nn.functional.silu(self.inp(x) + self.emb(t)[:, :, None, None])
        return self.out(h)


def default_factory() -> tuple[Callable[..., torch.Tensor], GaussianDiffusion, tuple[int, int, int]]:
    diff = create_diffusion(steps=4000, schedule="cosine", var_type="learned_range", loss="hybrid")
    torch.manual_seed(0)
    return _StandIn(3, 6).eval(), diff, (3, 32, 32)


def _load_factory(spec: str) -> Callable[[], Any]:
    module, _, name = spec.partition(":")
    if not name:
        raise SystemExit(f"--factory {spec!r}: expected 'package.module:function'")
    return getattr(importlib.import_module(module), name)


def run_bench(
    model: Callable[..., torch.Tensor],
    diffusion: GaussianDiffusion,
    image_shape: tuple[int, int, int],
    configs: list[tuple[str, str]],
    *,
    batch: int,
    device: str,
    repeats: int = 1,
) -> list[dict[str, Any]]:
    calls = [0]

    def counted(x: torch.Tensor, t: torch.Tensor, **kw: Any) -> torch.Tensor:
        calls[0] += 1
        return model(x, t, **kw)

    shape = (batch, *image_shape)
    generate(counted, diffusion, "ddim", "2", shape, device=device)  # warm-up
    rows = []
    for method, steps in configs:
        times = []
        for r in range(repeats):
            calls[0] = 0
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            start = time.perf_counter()
            generate(
                counted,
                diffusion,
                method,
                steps,
                shape,
                device=device,
                generator=torch.Generator().manual_seed(r),
            )
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
        best = min(times)
        rows.append(
            {
                "method": method,
                "steps": steps,
                "nfe": calls[0],
                "batch": batch,
                "seconds_per_batch": round(best, 4),
                "ms_per_image": round(1000 * best / batch, 3),
            }
        )
        print(f"{method:>5} {steps:>6}  NFE {calls[0]:>4}  {1000 * best / batch:9.2f} ms/image")
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--factory", default=None, help="module:function returning (model, diffusion, (C, H, W))")
    ap.add_argument("--configs", default=DEFAULT_CONFIGS, help="comma list of method:steps")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--out-stem", default=str(RESULTS / "samplers"))
    args = ap.parse_args(argv)

    factory = _load_factory(args.factory) if args.factory else default_factory
    model, diffusion, image_shape = factory()
    if isinstance(model, nn.Module):
        model = model.to(args.device)
    configs = [tuple(c.split(":", 1)) for c in args.configs.split(",")]
    with torch.no_grad():
        rows = run_bench(
            model,
            diffusion,
            tuple(image_shape),
            configs,
            batch=args.batch,
            device=args.device,
            repeats=args.repeats,
        )
    meta = {
        "model": args.factory or "stand-in conv net (3->64->6 channels, 32x32)",
        "device": args.device,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "machine": platform.machine(),
        "T": diffusion.num_timesteps,
    }
    stem = Path(args.out_stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    stem.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    lines = [
        f"# Sampler timings ({meta['model']}, {args.device}, batch {args.batch}, T = {meta['T']})",
        "",
        "| method | steps | NFE | ms / image |",
        "|---|---|---|---|",
        *[f"| {r['method']} | {r['steps']} | {r['nfe']} | {r['ms_per_image']} |" for r in rows],
        "",
    ]
    stem.with_suffix(".md").write_text("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
