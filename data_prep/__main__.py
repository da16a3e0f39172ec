"""``python -m data_prep make ...`` / ``python -m data_prep verify DIR`` (also ``iddpm-data``)."""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from pathlib import Path

from data_prep.images import Resample
from data_prep.make_shards import MakeOptions, make_shards
from data_prep.manifest import ManifestError
from data_prep.sources import DataPrepError, SourceKind
from data_prep.verify import verify_dir


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m data_prep", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    make = sub.add_parser("make", help="build webdataset shards + manifest.json from images")
    make.add_argument(
        "--source",
        type=SourceKind,
        choices=list(SourceKind),
        required=True,
        metavar="{digits,folder,npz}",
        help="built-in digits, an image folder, or a .npz/.npy array",
    )
    make.add_argument("--input", type=Path, help="image folder (flat, or one subfolder per class) or .npz/.npy file")
    make.add_argument("--out", type=Path, required=True, help="output directory")
    make.add_argument("--image-size", type=int, default=32, help="side of the square output images (default 32)")
    make.add_argument("--channels", type=int, default=3, choices=(1, 3), help="1 = grayscale, 3 = RGB (default 3)")
    make.add_argument("--val-fraction", type=float, default=0.0, help="fraction held out for validation")
    make.add_argument("--max-per-shard", type=int, default=10_000, help="samples per shard (default 10000)")
    make.add_argument(
        "--max-shard-bytes",
        type=int,
        default=1 << 30,
        help="close a shard once its image bytes reach this (default 1 GiB)",
    )
    make.add_argument("--seed", type=int, default=0, help="seed for the shuffle and the validation split")
    make.add_argument(
        "--no-shuffle",
        dest="shuffle",
        action="store_false",
        help="keep the input order (the validation split is still a seeded random subset)",
    )
    make.add_argument(
        "--resample",
        type=Resample,
        choices=list(Resample),
        default=Resample.LANCZOS,
        metavar="{lanczos,bicubic}",
        help="resize filter (default lanczos)",
    )
    make.add_argument(
        "--workers",
        type=int,
        default=min(8, os.cpu_count() or 1),
        help="encoding processes (default: CPU count, at most 8)",
    )
    make.add_argument("--images-key", help="array name of the images in a .npz (default: images, x, arr_0, ...)")
    make.add_argument("--labels-key", help="array name of the labels in a .npz (default: labels, y, arr_1, ...)")
    make.add_argument("--class-names", help="comma-separated class names for an array source")
    make.add_argument("--overwrite", action="store_true", help="replace shards made with other settings")
    make.add_argument("--quiet", action="store_true", help="no progress bar or summary")

    verify = sub.add_parser(
        "verify", help="check shards against manifest.json; exit 1 on problems, 2 if the manifest is unusable"
    )
    verify.add_argument("dir", type=Path)
    verify.add_argument("--workers", type=int, default=1, help="shards checked in parallel")
    verify.add_argument("--quick", action="store_true", help="sizes and checksums only, no decoding")
    return parser


def _make(args: argparse.Namespace, argv: list[str]) -> int:
    opts = MakeOptions(
        source=args.source,
        out=args.out,
        input=args.input,
        image_size=args.image_size,
        channels=args.channels,
        val_fraction=args.val_fraction,
        max_per_shard=args.max_per_shard,
        max_shard_bytes=args.max_shard_bytes,
        shuffle=args.shuffle,
        seed=args.seed,
        resample=args.resample,
        workers=args.workers,
        images_key=args.images_key,
        labels_key=args.labels_key,
        class_names=[c.strip() for c in args.class_names.split(",")] if args.class_names else None,
        overwrite=args.overwrite,
        quiet=args.quiet,
        command=shlex.join(["python", "-m", "data_prep", *argv]),
    )
    make_shards(opts)
    return 0


def _verify(args: argparse.Namespace) -> int:
    problems, manifest = verify_dir(args.dir, workers=args.workers, deep=not args.quick)
    for line in problems:
        print(line)
    shards = sum(len(s.shards) for s in manifest.splits.values())
    samples = sum(s.count for s in manifest.splits.values())
    if problems:
        print(f"{args.dir}: {len(problems)} problem(s) in {shards} shards", file=sys.stderr)
        return 1
    print(f"{args.dir}: OK ({shards} shards, {samples} samples)")
    return 0


def cli(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = _parser().parse_args(argv)
    try:
        return _make(args, argv) if args.command == "make" else _verify(args)
    except (DataPrepError, ManifestError) as err:
        # Bad input (arguments, a missing/malformed/empty manifest) is 2; verify's "problems found" is 1.
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: completed shards are kept; re-run the same command to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(cli())
