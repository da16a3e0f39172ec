"""Sample images from a trained model.

    python trainer/sample.py runs/quickstart --num-samples 64 --method ddim --steps 50
    python trainer/sample.py runs/x/checkpoints/step_00010000/export.pt --method heun --steps 25 --churn 10

Writes ``samples.npz`` (uint8 NHWC images + labels) and ``grid.png`` and, when the run is known to
MLflow, logs both to it. EMA weights are used unless ``--raw``.
"""

from __future__ import annotations

import os
import sys

if __package__ in (None, ""):
    _here = os.path.dirname(os.path.abspath(__file__))
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _here]

import argparse
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from trainer.checkpoint import CheckpointError
from trainer.config import ConfigError
from trainer.images import grid_png
from trainer.sampling import load_for_inference, sample_images
from trainer.tracking import log_to_run


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="trainer/sample.py", description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoint", help="export.pt, a checkpoint directory, or a run's output directory")
    p.add_argument("--num-samples", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--method", choices=["ddpm", "ddim", "euler", "heun"], default=None)
    p.add_argument("--steps", default=None, help='respacing: "50", "10,20,30", "ddim50", or "" for all T')
    p.add_argument("--eta", type=float, default=None, help="DDIM η")
    p.add_argument("--churn", type=float, default=None, help="EDM stochastic churn")
    p.add_argument("--no-clip", action="store_true", help="do not clip predicted x0 to [-1, 1]")
    p.add_argument("--class-label", type=int, action="append", default=None, help="repeatable; cycles")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--raw", action="store_true", help="use the raw weights instead of the EMA")
    p.add_argument("--ema-rate", type=float, default=None)
    p.add_argument("--out", default=None, help="output directory (default: next to the checkpoint)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--no-mlflow", action="store_true")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    flags = {
        "num_samples": args.num_samples,
        "batch_size": args.batch_size,
        "method": args.method,
        "steps": args.steps,
        "eta": args.eta,
        "churn": args.churn,
        "seed": args.seed,
        "clip_denoised": False if args.no_clip else None,
    }
    try:
        # Flags go in before validation: "--steps ddim7" is checked against the export's diffusion.steps
        # here, in one line, not halfway through sampling.
        cfg, model, meta = load_for_inference(
            args.checkpoint,
            not args.raw,
            args.ema_rate,
            device,
            sample={k: v for k, v in flags.items() if v is not None},
        )
    except (CheckpointError, ConfigError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2

    num_classes = meta["num_classes"]
    labels = None
    if args.class_label:
        if not num_classes:
            print("error: --class-label given but the model is not class-conditional", file=sys.stderr)
            return 2
        bad = [c for c in args.class_label if not 0 <= c < num_classes]
        if bad:
            print(f"error: --class-label {bad[0]} outside 0..{num_classes - 1}", file=sys.stderr)
            return 2
        labels = torch.tensor(args.class_label)[torch.arange(cfg.sample.num_samples) % len(args.class_label)]

    s = cfg.sample
    n_batches = -(-s.num_samples // s.batch_size)
    bar = tqdm(desc=f"{s.method} steps={s.steps or 'all'}", unit="step", dynamic_ncols=True)

    def progress(i: int, n: int) -> None:
        bar.total = n * n_batches  # steps per batch are known once the sampler reports them
        bar.update(1)

    shape = (meta["channels"], meta["image_size"], meta["image_size"])
    t0 = time.perf_counter()
    try:
        arr, ys = sample_images(cfg, model, shape, s.num_samples, num_classes, device, labels=labels, progress=progress)
    except ValueError as err:  # e.g. a respacing the schedule cannot provide
        bar.close()
        print(f"error: {err}", file=sys.stderr)
        return 2
    dt = time.perf_counter() - t0
    bar.close()

    ckpt_path = Path(meta["path"])
    out = (
        Path(args.out)
        if args.out
        else ckpt_path.parent / "samples" / f"{s.method}_{s.steps or 'all'}_{time.strftime('%Y%m%d-%H%M%S')}"
    )
    out.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(out / "samples.npz", images=arr, labels=ys)
    (out / "grid.png").write_bytes(grid_png(arr, scale=max(1, 128 // meta["image_size"])))
    print(
        f"{s.num_samples} samples ({meta['weights']} weights, step {meta['step']}) in {dt:.1f}s "
        f"({dt / s.num_samples * 1000:.1f} ms/image): {out}/samples.npz, {out}/grid.png"
    )
    if not args.no_mlflow and log_to_run(
        meta.get("tracking_uri"),
        meta.get("mlflow_run_id"),
        [out / "samples.npz", out / "grid.png"],
        {f"sample/{s.method}_{s.steps or 'all'}_ms_per_image": dt / s.num_samples * 1000},
        artifact_dir=f"samples/{out.name}",
        step=int(meta["step"]),
    ):
        print(f"logged to MLflow run {meta['mlflow_run_id']}")
    return 0


def cli() -> None:
    sys.exit(main())


if __name__ == "__main__":
    cli()
