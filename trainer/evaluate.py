"""Bits/dim of a trained model on held-out shards (the full variational bound over all T steps).

    python trainer/evaluate.py runs/quickstart --split val
    python trainer/evaluate.py runs/x/checkpoints/step_00010000/export.pt --data-root /data/shards --max-batches 4

Writes a JSON report (total, prior and per-timestep terms) and logs the headline numbers to MLflow.
"""

from __future__ import annotations

import os
import sys

if __package__ in (None, ""):
    _here = os.path.dirname(os.path.abspath(__file__))
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _here]

import argparse
import json
import math
import time
from pathlib import Path

import torch
from tqdm import tqdm

from data_prep.manifest import ManifestError
from trainer.checkpoint import CheckpointError
from trainer.config import ConfigError
from trainer.data import DataError, build_eval_stream, load_manifest
from trainer.sampling import base_diffusion, load_for_inference
from trainer.tracking import log_to_run


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="trainer/evaluate.py", description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoint", help="export.pt, a checkpoint directory, or a run's output directory")
    p.add_argument("--data-root", default=None, help="shard directory (default: the run's data.root)")
    p.add_argument("--split", default="val")
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--max-batches", type=int, default=None, help="evaluate only the first N batches")
    p.add_argument("--raw", action="store_true", help="use the raw weights instead of the EMA")
    p.add_argument("--ema-rate", type=float, default=None)
    p.add_argument("--no-clip", action="store_true", help="do not clip predicted x0 in the decoder term")
    p.add_argument("--out", default=None, help="JSON report path (default: next to the checkpoint)")
    p.add_argument("--seed", type=int, default=0, help="noise seed (bits/dim is a Monte Carlo estimate)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--no-mlflow", action="store_true")
    return p.parse_args(argv)


@torch.no_grad()
def evaluate(args: argparse.Namespace) -> dict:
    device = torch.device(args.device)
    cfg, model, meta = load_for_inference(args.checkpoint, not args.raw, args.ema_rate, device)
    if args.data_root:
        cfg.data.root = args.data_root
    if args.batch_size:
        cfg.data.batch_size = args.batch_size
    manifest = load_manifest(cfg.data.root)
    if (manifest.image_size, manifest.channels) != (meta["image_size"], meta["channels"]):
        raise ConfigError(
            f"{cfg.data.root}: images are {manifest.image_size}px x{manifest.channels}, the model was trained on "
            f"{meta['image_size']}px x{meta['channels']}"
        )
    diffusion = base_diffusion(cfg)
    stream = build_eval_stream(cfg.data, manifest, rank=0, world_size=1, split=args.split)
    T = diffusion.num_timesteps
    sums = {"total_bpd": 0.0, "prior_bpd": 0.0}
    vb_t = torch.zeros(T, dtype=torch.float64)
    mse_t = torch.zeros(T, dtype=torch.float64)
    n = 0
    gen = torch.Generator(device=device).manual_seed(args.seed)
    t0 = time.perf_counter()
    bar = tqdm(desc=f"bits/dim on {args.split}", unit="img", dynamic_ncols=True)
    for i, (x, y) in enumerate(stream):
        if args.max_batches is not None and i >= args.max_batches:
            break
        x = x.to(device)
        kwargs = {"y": y.to(device)} if meta["num_classes"] else {}
        if x.shape[0] == 0:
            continue
        out = diffusion.calc_bpd_loop(model, x, model_kwargs=kwargs, clip_denoised=not args.no_clip, generator=gen)
        sums["total_bpd"] += out["total_bpd"].double().sum().item()
        sums["prior_bpd"] += out["prior_bpd"].double().sum().item()
        vb_t += out["vb"].double().sum(0).cpu()
        mse_t += out["mse"].double().sum(0).cpu()
        n += x.shape[0]
        bar.update(x.shape[0])
        bar.set_postfix(bpd=f"{sums['total_bpd'] / n:.4f}")
    bar.close()
    if n == 0:
        raise ConfigError(f"{cfg.data.root}: split '{args.split}' has no samples")
    return {
        "checkpoint": meta["path"],
        "step": meta["step"],
        "weights": meta["weights"],
        "split": args.split,
        "num_images": n,
        "num_timesteps": T,
        "bits_per_dim": sums["total_bpd"] / n,
        "prior_bpd": sums["prior_bpd"] / n,
        "vb_per_t": (vb_t / n).tolist(),
        "mse_per_t": (mse_t / n).tolist(),
        "seconds": time.perf_counter() - t0,
        "_meta": meta,
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        report = evaluate(args)
    except (CheckpointError, ConfigError, ManifestError, DataError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    meta = report.pop("_meta")
    out = Path(args.out) if args.out else Path(meta["path"]).parent / f"eval_{args.split}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1))
    bpd = report["bits_per_dim"]
    print(
        f"{args.split}: {bpd:.4f} bits/dim over {report['num_images']} images "
        f"(prior {report['prior_bpd']:.2e}, {report['seconds']:.1f}s) -> {out}"
    )
    if not math.isfinite(bpd):
        print("warning: bits/dim is not finite", file=sys.stderr)
    if not args.no_mlflow:
        log_to_run(
            meta.get("tracking_uri"),
            meta.get("mlflow_run_id"),
            [out],
            {f"eval/{args.split}_bpd": bpd, f"eval/{args.split}_prior_bpd": report["prior_bpd"]},
            artifact_dir="eval",
            step=int(meta["step"]),
        )
    return 0


def cli() -> None:
    sys.exit(main())


if __name__ == "__main__":
    cli()
