"""Bits/dim of a model on a split: the full variational bound over all T steps for every image, distributed and
resumable (``trainer/evaluate.py bpd``).

The images are cut into parts of fixed content (``trainer/evaluation/parts.py``) whose noise is seeded per
part, so the result is the same on any number of ranks; a killed run rerun with the same command redoes only
unfinished parts. Writes a JSON report (total, prior, per-timestep L_t) and logs the headline numbers to the
run in MLflow.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from trainer import distributed
from trainer.config import ConfigError
from trainer.data import load_manifest, read_ranges, split_size
from trainer.diffusion import diffusion_from_config
from trainer.evaluation.inference import Loaded, add_weights_arguments, load_for_cli, rank0_bar, run_cli
from trainer.evaluation.parts import PartStore, part_seed, split_range
from trainer.tracking import log_to_run

# ---------------------------------------------------------------------------------------------- bits/dim


def parse_bpd_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="trainer/evaluate.py [bpd]", description="Bits/dim of a model on a split.")
    add_weights_arguments(p)
    p.add_argument("--data-root", default=None, help="shard directory (default: the run's data.root)")
    p.add_argument("--split", default="val")
    p.add_argument("--batch-size", type=int, default=None, help="images per network call (= per part)")
    p.add_argument("--max-images", type=int, default=None, help="evaluate only the first N images of the split")
    p.add_argument("--max-batches", type=int, default=None, help="evaluate only the first N batches")
    p.add_argument("--no-clip", action="store_true", help="do not clip predicted x0 in the decoder term")
    p.add_argument("--out", default=None, help="JSON report path (default: next to the checkpoint)")
    p.add_argument("--seed", type=int, default=0, help="noise seed (bits/dim is a Monte Carlo estimate)")
    p.add_argument("--timeout-min", type=float, default=60.0, help="how long a rank waits for the others")
    p.add_argument("--no-mlflow", action="store_true")
    return p.parse_args(argv)


def bpd_of_part(x: torch.Tensor, y: torch.Tensor, loaded: Loaded, diffusion: Any, clip: bool, seed: int, bar: Any):
    """The bound for one part (its images in split order), with the part's own noise generator."""
    kwargs = {"y": y.to(x.device)} if loaded.num_classes else {}
    gen = torch.Generator(device=x.device).manual_seed(seed)
    n = x.shape[0]

    def progress(i: int, total: int) -> None:
        bar.update(n / total)

    out = diffusion.calc_bpd_loop(
        loaded.model, x, model_kwargs=kwargs, clip_denoised=clip, generator=gen, progress=progress
    )
    return {
        "total_bpd": out["total_bpd"].double().cpu().numpy(),
        "prior_bpd": out["prior_bpd"].double().cpu().numpy(),
        "vb_sum": out["vb"].double().sum(0).cpu().numpy(),
        "mse_sum": out["mse"].double().sum(0).cpu().numpy(),
    }


def run_bpd(args: argparse.Namespace, env: distributed.DistEnv) -> int:
    device = torch.device(args.device) if args.device else env.device
    loaded = load_for_cli(args, device)
    cfg = loaded.cfg
    if args.data_root:
        cfg.data.root = args.data_root
    if args.batch_size:
        cfg.data.batch_size = args.batch_size
    manifest = load_manifest(cfg.data.root)
    if (manifest.image_size, manifest.channels) != (loaded.image_size, loaded.channels):
        raise ConfigError(
            f"{cfg.data.root}: images are {manifest.image_size}px x{manifest.channels}, the model was trained on "
            f"{loaded.image_size}px x{loaded.channels}"
        )
    total = split_size(cfg.data, manifest, args.split)
    B = cfg.data.batch_size
    for limit in (args.max_images, args.max_batches * B if args.max_batches is not None else None):
        if limit is not None:
            total = min(total, limit)
    if total == 0:
        raise ConfigError(f"{cfg.data.root}: split '{args.split}' has no samples")
    ranges = split_range(total, B)
    out = Path(args.out) if args.out else Path(loaded.meta["path"]).parent / f"eval_{args.split}.json"
    plan = {
        "checkpoint": str(Path(loaded.meta["path"]).resolve()),
        "step": int(loaded.meta["step"]),
        "weights": loaded.meta["weights"],
        "data_root": str(Path(cfg.data.root).resolve()),
        "split": args.split,
        "num_images": total,
        "part_size": B,
        "clip_denoised": not args.no_clip,
        "seed": args.seed,
    }
    store = PartStore(out.parent / f"{out.stem}_parts", len(ranges))
    mine = store.assign(plan, env.rank, env.world_size, lambda v: distributed.broadcast_object(v, env.device))
    diffusion = diffusion_from_config(cfg.diffusion)
    todo = sum(hi - lo for lo, hi in (ranges[k] for k in mine))
    bar = rank0_bar(todo, f"bits/dim on {args.split}", env.is_main)
    t0 = time.perf_counter()
    # Chunks arrive in any order (loader workers): gather each part's images by position, then run it.
    pending: dict[int, dict[int, tuple[torch.Tensor, int]]] = {k: {} for k in mine}
    lost = 0

    def run_part(k: int) -> None:
        got = pending.pop(k)
        order = sorted(got)
        x = torch.stack([got[i][0] for i in order]).to(device)
        y = torch.tensor([got[i][1] for i in order], dtype=torch.long)
        store.write(k, **bpd_of_part(x, y, loaded, diffusion, not args.no_clip, part_seed(args.seed, k), bar))

    if mine:
        with torch.no_grad():
            for x, y, pos in read_ranges(cfg.data, manifest, args.split, [ranges[k] for k in mine]):
                for xi, yi, p in zip(x, y.tolist(), pos.tolist(), strict=True):
                    k = p // B
                    pending[k][p] = (xi, yi)
                    lo, hi = ranges[k]
                    if len(pending[k]) == hi - lo:
                        run_part(k)
            for k in sorted(pending):  # parts that lost images to corrupt data: what is left of them
                lo, hi = ranges[k]
                lost += hi - lo - len(pending[k])
                if pending[k]:
                    run_part(k)
                else:
                    pending.pop(k)
                    store.write(
                        k, total_bpd=np.zeros(0), prior_bpd=np.zeros(0), vb_sum=np.zeros(0), mse_sum=np.zeros(0)
                    )
    bar.close()
    counts = torch.tensor([float(todo), float(lost)], dtype=torch.float64, device=env.device)
    if torch.distributed.is_initialized() and env.world_size > 1:
        torch.distributed.all_reduce(counts)  # also waits for every rank's last part
    seconds = time.perf_counter() - t0
    if env.is_main:
        report = merge_bpd(store, plan, diffusion.num_timesteps)
        report.update(
            made_now=int(counts[0].item()) - int(counts[1].item()),
            lost_images=int(counts[1].item()),
            seconds=seconds,
            world_size=env.world_size,
        )
        write_bpd_report(args, loaded, out, report)
    distributed.barrier()
    return 0


def merge_bpd(store: PartStore, plan: dict[str, Any], T: int) -> dict[str, Any]:
    """Sum the parts in index order, in float64: the same numbers whatever the number of ranks."""
    per_image, prior = [], []
    vb_t, mse_t = np.zeros(T), np.zeros(T)
    for _, part in store.read_all():
        per_image.append(part["total_bpd"])
        prior.append(part["prior_bpd"])
        if part["vb_sum"].size:
            vb_t += part["vb_sum"]
            mse_t += part["mse_sum"]
    bpd = np.concatenate(per_image)
    n = len(bpd)
    if n == 0:
        raise ConfigError(f"{plan['data_root']}: no readable image in split '{plan['split']}'")
    return {
        "checkpoint": plan["checkpoint"],
        "step": plan["step"],
        "weights": plan["weights"],
        "split": plan["split"],
        "num_images": n,
        "num_timesteps": T,
        "seed": plan["seed"],
        "bits_per_dim": float(bpd.sum() / n),
        "bits_per_dim_stderr": float(bpd.std(ddof=1) / math.sqrt(n)) if n > 1 else float("nan"),
        "per_image_bpd": bpd.tolist(),  # split order: models evaluated with the same seed compare image by image
        "prior_bpd": float(np.concatenate(prior).sum() / n),
        "vb_per_t": (vb_t / n).tolist(),
        "mse_per_t": (mse_t / n).tolist(),
    }


def write_bpd_report(args: argparse.Namespace, loaded: Loaded, out: Path, report: dict[str, Any]) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1))
    bpd, n, T = report["bits_per_dim"], report["num_images"], report["num_timesteps"]
    vb = np.asarray(report["vb_per_t"])
    rate = report["made_now"] / report["seconds"] if report["seconds"] > 0 else 0.0
    print(
        f"{report['split']}: {bpd:.4f} ± {report['bits_per_dim_stderr']:.4f} bits/dim over {n} images "
        f"({report['made_now']} now on {report['world_size']} rank(s), {rate:.2f} img/s) -> {out}",
        flush=True,
    )
    # The per-term table of the bound: prior L_T, decoder L_0, and the L_t in between by quarter of T.
    rows = [("prior L_T", report["prior_bpd"]), ("decoder L_0", float(vb[0]))]
    quarters = [(1, T // 4), (T // 4, T // 2), (T // 2, 3 * T // 4), (3 * T // 4, T)]
    rows += [(f"L_t, t in [{a}, {b})", float(vb[a:b].sum())) for a, b in quarters if b > a]
    for name, value in rows:
        print(f"  {name:<24} {value:10.4f}")
    if report["lost_images"]:
        print(f"warning: {report['lost_images']} images unreadable (see the data log); not counted", file=sys.stderr)
    if not math.isfinite(bpd):
        print("warning: bits/dim is not finite", file=sys.stderr)
    if not args.no_mlflow:
        split = report["split"]
        log_to_run(
            loaded.meta.get("tracking_uri"),
            loaded.meta.get("mlflow_run_id"),
            [out],
            {f"eval/{split}_bpd": bpd, f"eval/{split}_prior_bpd": report["prior_bpd"]},
            artifact_dir="eval",
            step=int(loaded.meta["step"]),
        )


def main(argv: list[str]) -> int:
    return run_cli(parse_bpd_args(argv), run_bpd)
