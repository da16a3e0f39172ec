"""Sampling images from a trained model, on one process or many, resumable after a kill (the library
behind ``trainer/sample.py``, whose docstring shows the commands).

The N samples are cut into parts of ``--part-size`` (``trainer/evaluation/parts.py``); part k's noise and labels come
from a generator seeded by (seed, k), so the samples do not depend on the number of ranks. Each rank writes
its parts as it finishes them; rerunning the same command after a kill redoes only the missing ones. Rank 0
merges them into ``samples.npz`` (``arr_0``: uint8 NHWC images, ``arr_1``: labels of a class-conditional
model; the layout guided-diffusion's evaluator reads) and ``grid.png``, and logs to the training run in
MLflow. EMA weights are used unless ``--raw``.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from trainer import distributed
from trainer.diffusion import diffusion_from_config
from trainer.evaluation.inference import (
    CLI_ERRORS,
    Loaded,
    add_weights_arguments,
    generate_uint8,
    load_for_cli,
    rank0_bar,
    run_cli,
)
from trainer.evaluation.parts import PartStore, part_seed, split_range
from trainer.images import grid_png
from trainer.tracking import log_to_run

MAX_LOGGED_NPZ = 64 * 2**20
"""samples.npz goes to MLflow only up to this size; 50,000 CIFAR samples (150 MB) stay on disk."""


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="trainer/sample.py", description="Sample images from a trained model (resumable, any number of ranks)."
    )
    add_weights_arguments(p)
    p.add_argument("--num-samples", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=None, help="images per network call, per rank")
    p.add_argument("--part-size", type=int, default=None, help="images per resumable part (default: batch size)")
    p.add_argument("--method", choices=["ddpm", "ddim", "euler", "heun", "sde", "pc"], default=None)
    p.add_argument("--steps", default=None, help='respacing: "50", "10,20,30", "ddim50", or "" for all T')
    p.add_argument("--eta", type=float, default=None, help="DDIM η")
    p.add_argument("--churn", type=float, default=None, help="EDM stochastic churn")
    p.add_argument("--snr", type=float, default=None, help="pc: the Langevin corrector's signal-to-noise ratio")
    p.add_argument("--corrector-steps", type=int, default=None, help="pc: Langevin steps per predictor step")
    p.add_argument("--no-clip", action="store_true", help="do not clip predicted x0 to [-1, 1]")
    g = p.add_argument_group("class-conditional models (default: classes drawn uniformly)")
    g.add_argument("--class-label", type=int, action="append", default=None, help="repeatable; cycles")
    g.add_argument("--unconditional", action="store_true", help="sample the null class (needs label dropout)")
    g.add_argument(
        "--guidance-scale",
        type=float,
        default=1.0,
        help="classifier-free guidance s: eps_null + s·(eps_class − eps_null); 1 = none, 0 = unconditional",
    )
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--out", default=None, help="output directory (default: under the run's samples/)")
    p.add_argument("--timeout-min", type=float, default=60.0, help="how long a rank waits for the others")
    p.add_argument("--no-mlflow", action="store_true")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    return run_cli(parse_args(argv), run, (*CLI_ERRORS, SampleError))


class SampleError(ValueError):
    """A flag that does not fit the model; one line."""


def run(args: argparse.Namespace, env: distributed.DistEnv) -> int:
    device = torch.device(args.device) if args.device else env.device
    flags = {
        "num_samples": args.num_samples,
        "batch_size": args.batch_size,
        "method": args.method,
        "steps": args.steps,
        "eta": args.eta,
        "churn": args.churn,
        "snr": args.snr,
        "corrector_steps": args.corrector_steps,
        "seed": args.seed,
        "clip_denoised": False if args.no_clip else None,
    }
    loaded = load_for_cli(args, device, sample={k: v for k, v in flags.items() if v is not None})
    conditioning = Conditioning.from_args(args, loaded.num_classes)
    s = loaded.cfg.sample
    ranges = split_range(s.num_samples, args.part_size or s.batch_size)
    plan = {
        "checkpoint": str(Path(loaded.meta["path"]).resolve()),
        "step": int(loaded.meta["step"]),
        "weights": loaded.meta["weights"],
        "num_samples": s.num_samples,
        "part_size": ranges[0][1] - ranges[0][0],
        "batch_size": s.batch_size,
        "method": s.method,
        "steps": s.steps,
        "eta": s.eta,
        "churn": s.churn,
        "clip_denoised": s.clip_denoised,
        "seed": s.seed,
        **conditioning.plan(),
    }
    if s.method == "pc":
        plan.update(snr=s.snr, corrector_steps=s.corrector_steps)
    out = Path(args.out) if args.out else default_out(loaded, plan)
    store = PartStore(out, len(ranges))
    mine = store.assign(plan, env.rank, env.world_size, lambda v: distributed.broadcast_object(v, env.device))

    model = conditioning.wrap(loaded.model)
    diffusion = diffusion_from_config(loaded.cfg.diffusion)
    shape = (loaded.channels, loaded.image_size, loaded.image_size)
    todo = sum(ranges[k][1] - ranges[k][0] for k in mine)
    bar = rank0_bar(todo, f"{s.method} steps={s.steps or 'all'}", env.is_main)
    t0 = time.perf_counter()
    for k in mine:
        lo, hi = ranges[k]
        gen = torch.Generator(device=device).manual_seed(part_seed(s.seed, k))
        labels = conditioning.labels(lo, hi, part_seed(s.seed, k))
        images = []
        for start in range(lo, hi, s.batch_size):
            n = min(s.batch_size, hi - start)
            kwargs = {} if labels is None else {"y": torch.from_numpy(labels[start - lo : start - lo + n]).to(device)}

            def progress(i: int, total: int, n: int = n) -> None:
                bar.update(n / total)  # per network step, so a 4000-step batch still moves the bar

            images.append(generate_uint8(model, diffusion, s, (n, *shape), device, kwargs, gen, progress))
        arrays = {"images": np.concatenate(images)}
        if labels is not None:
            arrays["labels"] = labels
        store.write(k, **arrays)
    bar.close()
    made = torch.tensor([float(todo)], dtype=torch.float64, device=env.device)
    if torch.distributed.is_initialized() and env.world_size > 1:
        torch.distributed.all_reduce(made)  # also waits for every rank's last part
    seconds = time.perf_counter() - t0
    if env.is_main:
        finish(args, loaded, store, plan, int(made.item()), seconds, env.world_size)
    distributed.barrier()
    return 0


def default_out(loaded: Loaded, plan: dict[str, Any]) -> Path:
    """A name fixed by the settings, so rerunning the same command finds its parts."""
    tag = f"{plan['method']}_{plan['steps'] or 'all'}_n{plan['num_samples']}_seed{plan['seed']}"
    if plan.get("guidance_scale", 1.0) != 1.0:
        tag += f"_g{plan['guidance_scale']:g}"
    if plan.get("classes") not in (None, "uniform"):
        tag += "_" + "-".join(str(c) for c in plan["classes"]) if isinstance(plan["classes"], list) else "_null"
    if plan["weights"] == "raw":
        tag += "_raw"
    export = Path(loaded.meta["path"])
    if export.parent.parent.name == "checkpoints":  # runs/<name>/checkpoints/step_N/export.pt
        return export.parent.parent.parent / "samples" / f"step{plan['step']}_{tag}"
    return export.parent / "samples" / tag


class Conditioning:
    """Which labels a class-conditional model gets, and classifier-free guidance."""

    def __init__(self, num_classes: int | None, classes: list[int] | None, null: bool, scale: float) -> None:
        self.num_classes, self.classes, self.null, self.scale = num_classes, classes, null, scale

    @classmethod
    def from_args(cls, args: argparse.Namespace, num_classes: int | None) -> Conditioning:
        wants = args.class_label or args.unconditional or args.guidance_scale != 1.0
        if wants and not num_classes:
            raise SampleError(
                "--class-label / --unconditional / --guidance-scale need a class-conditional model "
                "(model.class_cond: true)"
            )
        if args.class_label:
            bad = [c for c in args.class_label if not 0 <= c < num_classes]
            if bad:
                raise SampleError(f"--class-label {bad[0]} outside 0..{num_classes - 1}")
        if args.unconditional and (args.class_label or args.guidance_scale != 1.0):
            raise SampleError("--unconditional samples the null class: it takes no --class-label or --guidance-scale")
        return cls(num_classes, args.class_label, args.unconditional, args.guidance_scale)

    def plan(self) -> dict[str, Any]:
        if not self.num_classes:
            return {}
        classes: Any = "null" if self.null else (self.classes or "uniform")
        return {"classes": classes, "guidance_scale": self.scale}

    def labels(self, lo: int, hi: int, seed: int) -> np.ndarray | None:
        """Labels of samples [lo, hi): given classes cycle over the global index; otherwise uniform draws
        from the part's own generator (so they do not depend on the number of ranks)."""
        if not self.num_classes:
            return None
        if self.null:
            return np.full(hi - lo, self.num_classes, dtype=np.int64)
        if self.classes:
            return np.asarray(self.classes, dtype=np.int64)[np.arange(lo, hi) % len(self.classes)]
        gen = torch.Generator().manual_seed(seed)
        return torch.randint(0, self.num_classes, (hi - lo,), generator=gen).numpy()

    def wrap(self, model: torch.nn.Module) -> torch.nn.Module:
        if not self.num_classes or self.scale == 1.0:
            return model
        from trainer.guidance import ClassifierFreeGuidance

        return ClassifierFreeGuidance(model, self.scale, null_class=self.num_classes)


def finish(
    args: argparse.Namespace,
    loaded: Loaded,
    store: PartStore,
    plan: dict[str, Any],
    made: int,
    seconds: float,
    world_size: int,
) -> None:
    """Merge the parts in index order into samples.npz and grid.png; report and log them."""
    images, labels = [], []
    for _, part in store.read_all():
        images.append(part["images"])
        if "labels" in part:
            labels.append(part["labels"])
    arr = np.concatenate(images)
    arrays = {"arr_0": arr} | ({"arr_1": np.concatenate(labels)} if labels else {})
    npz = store.root / "samples.npz"
    tmp = store.root / ".samples.npz.tmp"
    with open(tmp, "wb") as f:
        np.savez(f, **arrays)
    os.replace(tmp, npz)
    grid = store.root / "grid.png"
    grid.write_bytes(grid_png(arr[:64], scale=max(1, 128 // loaded.image_size)))
    rate = made / seconds if made and seconds > 0 else 0.0
    summary = {
        **plan,
        "made_now": made,
        "seconds": seconds,
        "images_per_s": rate,
        "images_per_s_per_rank": rate / world_size,
        "world_size": world_size,
        "tracking_uri": loaded.meta.get("tracking_uri"),
        "mlflow_run_id": loaded.meta.get("mlflow_run_id"),
    }
    (store.root / "summary.json").write_text(json.dumps(summary, indent=1))
    print(
        f"{len(arr)} samples ({loaded.meta['weights']} weights, step {loaded.meta['step']}; {made} made now on "
        f"{world_size} rank(s) in {seconds:.1f}s, {rate:.2f} img/s): {npz}, {grid}",
        flush=True,
    )
    if args.no_mlflow:
        return
    files = [grid, store.root / "summary.json"] + ([npz] if npz.stat().st_size <= MAX_LOGGED_NPZ else [])
    tag = f"{plan['method']}_{plan['steps'] or 'all'}"
    metrics = {f"sample/{tag}_images_per_s": rate} if made else {}
    if log_to_run(
        loaded.meta.get("tracking_uri"),
        loaded.meta.get("mlflow_run_id"),
        files,
        metrics,
        artifact_dir=f"samples/{store.root.name}",
        step=int(loaded.meta["step"]),
    ):
        print(f"logged to MLflow run {loaded.meta['mlflow_run_id']}")
