"""``evaluate.py stats`` and ``evaluate.py quality``: reference statistics of a dataset, and the sample-quality
metrics of a ``samples.npz`` against them (the math is in ``trainer/evaluation/quality.py``, the networks in
``trainer/evaluation/features.py``).

    python trainer/evaluate.py stats --data data/cifar10 --split train --features inception --out cifar_train.npz
    python trainer/evaluate.py quality runs/x/samples/step500000_ddim_50_n50000_seed0 --ref cifar_train.npz

The reference records which feature network made it; ``quality`` refuses a reference made with another one
(FIDs in different feature spaces are not comparable). The Inception-v3 FID weights cannot be downloaded at
run time here: ``--features inception`` finds them in the torch hub cache or says in one line how to get
them; any other network (a TorchScript file, or a classifier saved by ``trainer.evaluation.features``) works the same.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from trainer.config import ConfigError, DataConfig
from trainer.data import load_manifest, read_ranges, split_size
from trainer.evaluation.inference import CLI_ERRORS
from trainer.tracking import log_to_run


def parse_args(command: str, argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog=f"trainer/evaluate.py {command}", description=__doc__.split("\n\n")[0])
    if command == "stats":
        p.add_argument("--data", required=True, help="shard directory (holds manifest.json)")
        p.add_argument("--split", default="train")
        p.add_argument("--max-images", type=int, default=None, help="the first N images of the split")
        p.add_argument("--out", required=True, help="reference statistics .npz to write")
    else:
        p.add_argument("samples", help="samples.npz (arr_0: uint8 NHWC) or the directory holding it")
        p.add_argument("--ref", required=True, help="reference statistics .npz from `evaluate.py stats`")
        p.add_argument("--out", default=None, help="JSON report (default: quality.json next to the samples)")
        p.add_argument("--no-mlflow", action="store_true")
    p.add_argument("--features", default="inception", help="inception, inception:/path.pth, or a .pt/.pth file")
    p.add_argument("--batch-size", type=int, default=100)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return p.parse_args(argv)


def main(command: str, argv: list[str]) -> int:
    from trainer.evaluation.quality import QualityError

    args = parse_args(command, argv)
    try:
        return stats(args) if command == "stats" else quality(args)
    except (*CLI_ERRORS, QualityError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


def read_split_uint8(root: str, split: str, limit: int | None, batch_size: int) -> np.ndarray:
    """The split's images in manifest order as uint8 NHWC (the layout samples are saved in)."""
    cfg = DataConfig(root=root, batch_size=batch_size, num_workers=0, pin_memory=False, random_flip=False)
    info = load_manifest(root)
    n = split_size(cfg, info, split)
    n = min(n, limit) if limit is not None else n
    if n == 0:
        raise ConfigError(f"{root}: split '{split}' has no images")
    out = np.zeros((n, info.image_size, info.image_size, info.channels), dtype=np.uint8)
    seen = np.zeros(n, dtype=bool)
    with tqdm(total=n, desc=f"reading {split}", unit="img", dynamic_ncols=True) as bar:
        for x, _, pos in read_ranges(cfg, info, split, [(0, n)]):
            # The stream maps uint8 v to v/127.5 − 1; this inverts it exactly.
            out[pos.numpy()] = ((x + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
            seen[pos.numpy()] = True
            bar.update(x.shape[0])
    return out[seen]


def stats(args: argparse.Namespace) -> int:
    from trainer.evaluation.features import load_feature_net
    from trainer.evaluation.quality import save_reference

    net = load_feature_net(args.features, args.device)  # a missing network fails before reading any data
    images = read_split_uint8(args.data, args.split, args.max_images, args.batch_size)
    t0 = time.perf_counter()
    with tqdm(total=len(images), desc=f"features ({net.name})", unit="img", dynamic_ncols=True) as bar:
        feats = net.extract(images, batch_size=args.batch_size, device=args.device, progress=bar.update)
    meta = {
        "feature_net": net.name,
        "data": str(Path(args.data).resolve()),
        "split": args.split,
        "image_size": int(images.shape[1]),
        "channels": int(images.shape[3]),
    }
    path = save_reference(args.out, feats, meta)
    seconds = time.perf_counter() - t0
    print(f"reference statistics of {len(images)} {args.split} images ({net.name}, {seconds:.1f}s): {path}")
    return 0


def load_samples(path: Path) -> tuple[np.ndarray, Path]:
    """``arr_0`` (or ``images``) of a samples file, read without unpickling."""
    from trainer.evaluation.quality import QualityError

    npz = path / "samples.npz" if path.is_dir() else path
    try:
        with np.load(npz, allow_pickle=False) as data:
            key = "arr_0" if "arr_0" in data.files else "images"
            images = data[key]
    except (OSError, ValueError, KeyError) as err:
        raise QualityError(f"{npz}: not a readable samples file ({' '.join(str(err).split())})") from None
    if images.dtype != np.uint8 or images.ndim != 4:
        raise QualityError(f"{npz}: expected uint8 NHWC images, got {images.dtype} {images.shape}")
    return images, npz


def _external_rows(ref: Any, meta: dict, net: Any, args: argparse.Namespace) -> Any:
    """A guided-diffusion batch's images through the network in use: the rows precision/recall and KID compare
    (its mu/sigma stay the FID statistics). EDM's fid-refs have no images: FID only."""
    from trainer.evaluation.quality import REFERENCE_SUBSET, Reference, _subset

    images = meta.pop("images", None)
    if images is None:
        return ref
    images = images[np.sort(np.random.default_rng(0).permutation(len(images))[:REFERENCE_SUBSET])]
    with tqdm(total=len(images), desc=f"reference features ({net.name})", unit="img", dynamic_ncols=True) as bar:
        feats = net.extract(images, batch_size=args.batch_size, device=args.device, progress=bar.update)
    return Reference(ref.pool, ref.spatial, _subset(feats.pool, REFERENCE_SUBSET, 0))


def quality(args: argparse.Namespace) -> int:
    from trainer.evaluation.features import load_feature_net
    from trainer.evaluation.quality import OFFICIAL_INCEPTION, compute_all, load_reference

    images, npz = load_samples(Path(args.samples))
    net = load_feature_net(args.features, args.device)
    ref, ref_meta = load_reference(args.ref, expect_feature_net=net.name)
    fmt = ref_meta.get("format")
    if ref_meta.get("assumes"):
        ref = _external_rows(ref, ref_meta, net, args)
        used = "the network it assumes" if net.name == OFFICIAL_INCEPTION else f"{net.name}, not the official weights"
        print(f"reference {args.ref}: {fmt} statistics, computed with {ref_meta['assumes']}; in use: {used}")
    shape = (ref_meta.get("image_size"), ref_meta.get("channels"))
    if None not in shape and shape != (images.shape[1], images.shape[3]):
        print(
            f"warning: samples are {images.shape[1]}px x{images.shape[3]}, the reference images were "
            f"{shape[0]}px x{shape[1]}",
            file=sys.stderr,
        )
    t0 = time.perf_counter()
    with tqdm(total=len(images), desc=f"features ({net.name})", unit="img", dynamic_ncols=True) as bar:
        feats = net.extract(images, batch_size=args.batch_size, device=args.device, progress=bar.update)
    metrics = compute_all(ref, feats)
    report: dict[str, Any] = {
        "samples": str(npz),
        "num_samples": len(images),
        "reference": str(Path(args.ref).resolve()),
        "reference_count": ref_meta.get("count"),
        "reference_format": fmt,
        "feature_net": net.name,
        **metrics,
        "seconds": time.perf_counter() - t0,
    }
    out = Path(args.out) if args.out else npz.parent / "quality.json"
    out.write_text(json.dumps(report, indent=1))
    shown = "  ".join(f"{k} {v:.4g}" for k, v in metrics.items())
    print(
        f"{len(images)} samples vs {ref_meta.get('count')} reference images ({net.name}, {fmt} reference "
        f"{args.ref}): {shown} -> {out}"
    )
    summary = npz.parent / "summary.json"  # written by trainer/sample.py: which run the samples came from
    if not args.no_mlflow and summary.is_file():
        run = json.loads(summary.read_text())
        log_to_run(
            run.get("tracking_uri"),
            run.get("mlflow_run_id"),
            [out],
            {f"quality/{k}": v for k, v in metrics.items()},
            artifact_dir=f"samples/{npz.parent.name}",
            step=int(run.get("step", 0)),
        )
    return 0
