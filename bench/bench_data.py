"""Shard-building speed and training-stream throughput on this machine.

Build: images/s of ``data_prep make`` for the 1797 digits (RGB, 32 and 64 px) and for a folder of
synthetic 320x240 JPEG photos (decode + LANCZOS resize + PNG encode), with 1 and 2 worker processes.
Stream: images/s delivered by ``build_train_stream`` (the canonical data order: 64 partitions read
sequentially, decode, per-partition shuffle buffers, [-1, 1] float batches of 64; flips are drawn per sample
on the training device since the canonical order, so not here) with 0 and 2 DataLoader workers at 32x32 and
64x64 RGB. Start-up (worker launch plus filling the shuffle buffers) is timed apart from the steady state.

    python bench/bench_data.py            # writes bench/results/data.{json,md}
    python bench/bench_data.py --seconds 2

Hook for the training-step comparison: :func:`stream_images_per_s` measures one configuration and
every result row carries ``images_per_s``; a consumer's rate (images/s per rank of the training step)
above the stream's means the GPUs would wait for data.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from data_prep.make_shards import MakeOptions, make_shards
from data_prep.sources import SourceKind
from trainer.config import DataConfig
from trainer.data import build_train_stream, load_manifest

RESULTS = Path(__file__).resolve().parent / "results"


def build_images_per_s(opts: MakeOptions) -> dict[str, Any]:
    t0 = time.perf_counter()
    result = make_shards(opts)
    seconds = time.perf_counter() - t0
    n = result.manifest.split("train").count + result.manifest.split("val").count
    return {"images": n, "seconds": seconds, "images_per_s": n / seconds}


def stream_images_per_s(root: Path, workers: int, batch_size: int = 64, seconds: float = 3.0) -> dict[str, Any]:
    """Steady-state images/s of the training stream for one configuration (rank 0 of 1)."""
    cfg = DataConfig(root=str(root), batch_size=batch_size, num_workers=workers, shuffle_buffer=1000)
    info = load_manifest(root)
    stream = build_train_stream(cfg, info, rank=0, world_size=1)
    t0 = time.perf_counter()
    next(stream)
    startup = time.perf_counter() - t0
    n, t1 = 0, time.perf_counter()
    while time.perf_counter() - t1 < seconds:
        n += next(stream).x.shape[0]
    elapsed = time.perf_counter() - t1
    stats = stream.stats()
    stream.close()
    return {
        "images_per_s": n / elapsed,
        "startup_s": startup,
        "measured_images": n,
        "wait_fraction": stats["wait_s"] / (time.perf_counter() - t0),
        "skipped": stats["skipped"],
    }


def _photo_folder(root: Path, n: int) -> Path:
    """Smooth gradients plus noise, JPEG quality 90: decodes and resizes like a photo."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:240, 0:320]
    for i in range(n):
        base = np.stack([(xx * (i % 7 + 1)) % 256, (yy * (i % 5 + 1)) % 256, (xx + yy) % 256], -1)
        img = np.clip(base + rng.normal(0, 20, base.shape), 0, 255).astype(np.uint8)
        d = root / f"class{i % 4}"
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(d / f"{i:05d}.jpg", quality=90)
    return root


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seconds", type=float, default=3.0, help="steady-state time per stream configuration")
    p.add_argument("--photos", type=int, default=400, help="synthetic JPEGs for the folder build")
    p.add_argument("--out-stem", default=str(RESULTS / "data"))
    p.add_argument("--stream-only", action="store_true", help="skip the shard-building timings")
    args = p.parse_args()
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    rows_build: list[dict[str, Any]] = []
    rows_stream: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp_str:
        tmp = Path(tmp_str)
        photos = _photo_folder(tmp / "photos", args.photos)
        # Warm-up: imports (webdataset pulls in torch; digits pull in scikit-learn) stay out of the timings.
        make_shards(MakeOptions(source=SourceKind.DIGITS, out=tmp / "warm", image_size=8, workers=1, quiet=True))
        for size in (32, 64):
            for workers in (1, 2):
                for source, inp in ((SourceKind.DIGITS, None), (SourceKind.FOLDER, photos)):
                    if args.stream_only and (source is SourceKind.FOLDER or workers != 1):
                        continue
                    out = tmp / f"{source.value}{size}_w{workers}"
                    opts = MakeOptions(
                        source=source,
                        input=inp,
                        out=out,
                        image_size=size,
                        channels=3,
                        val_fraction=0.0,
                        max_per_shard=256,
                        workers=workers,
                        quiet=True,
                    )
                    row = {
                        "source": source.value,
                        "image_size": size,
                        "workers": workers,
                        **build_images_per_s(opts),
                    }
                    rows_build.append(row)
                    print(f"build  {source.value:6s} {size:2d}px workers={workers}: {row['images_per_s']:7.0f} img/s")
        for size in (32, 64):
            for workers in (0, 2):
                row = {
                    "image_size": size,
                    "workers": workers,
                    "batch_size": 64,
                    **stream_images_per_s(tmp / f"digits{size}_w1", workers, seconds=args.seconds),
                }
                rows_stream.append(row)
                print(
                    f"stream {size:2d}px workers={workers}: {row['images_per_s']:7.0f} img/s "
                    f"(start-up {row['startup_s']:.2f} s)"
                )
    result = {
        "machine": {
            "cpus": os.cpu_count(),
            "load_avg_1m_at_start": load,
            "python": platform.python_version(),
            "note": "shared, loaded 2-core machine: treat as lower bounds",
        },
        "build": rows_build,
        "stream": rows_stream,
    }
    stem = Path(args.out_stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    stem.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [
        "# Data pipeline throughput",
        "",
        f"{os.cpu_count()} CPUs, 1-min load average {load:.1f} at start (shared machine: lower bounds).",
        "",
        "## Shard building (`data_prep make`, RGB, PNG output)",
        "",
        "| source | size | workers | images | images/s |",
        "|---|---|---|---|---|",
        *[
            f"| {r['source']} | {r['image_size']} | {r['workers']} | {r['images']} | {r['images_per_s']:.0f} |"
            for r in rows_build
        ],
        "",
        "## Training stream (`build_train_stream`, batch 64, canonical order: 64 partitions, shuffle buffer 1000)",
        "",
        "Digits shards at the given size, RGB. Wait fraction = time blocked in `next()` / wall time; it is ~1",
        "here by construction (the loop does no work between batches): in training it shows data starvation.",
        "",
        "| size | DataLoader workers | images/s | start-up s | wait fraction |",
        "|---|---|---|---|---|",
        *[
            f"| {r['image_size']} | {r['workers']} | {r['images_per_s']:.0f} | {r['startup_s']:.2f} | "
            f"{r['wait_fraction']:.2f} |"
            for r in rows_stream
        ],
        "",
    ]
    # The hand-written comparison with the training step's consumption (figures from other benches) is kept.
    old = stem.with_suffix(".md").read_text() if stem.with_suffix(".md").exists() else ""
    kept = old[old.index("## Loader vs. training consumption") :] if "## Loader vs. training consumption" in old else ""
    stem.with_suffix(".md").write_text("\n".join(lines) + ("\n" + kept if kept else ""))
    print(f"wrote {stem.with_suffix('.json')} and {stem.with_suffix('.md')}")


if __name__ == "__main__":
    main()
