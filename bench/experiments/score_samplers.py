"""Score-based samplers (reverse VP SDE by Euler–Maruyama, predictor–corrector) against ancestral sampling on the
quickstart digits model, at several step counts (issue 19).

    python bench/experiments/score_samplers.py --out /tmp/score_samplers          # ~30 min on a loaded 2-core CPU

Trains the quickstart model (``configs/quickstart.yaml``, one process, ZeRO-0) unless its export exists, a small digit
classifier as the feature network (``trainer.evaluation.features.train_classifier``: a FID in its feature space,
not comparable to Inception FIDs), and reference statistics of the train split; then draws ``--samples`` images
with each method and step count from the same seed (the same start noise) and scores them: FID, precision,
recall. Writes ``bench/results/score_samplers.{json,md}``. Reruns reuse the data, the run and the classifier.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import torch  # noqa: E402

METHODS = ("ddpm", "sde", "pc")


def _run(cmd: list[str]) -> None:
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"failed: {' '.join(cmd)}\n{(proc.stdout + proc.stderr)[-3000:]}")


def prepare(out: Path, train_steps: int) -> tuple[Path, Path]:
    data = out / "digits16"
    if not (data / "manifest.json").is_file():
        _run(
            [sys.executable, "-m", "data_prep", "make", "--source", "digits", "--out", str(data), "--image-size", "16"]
            + ["--channels", "1", "--val-fraction", "0.1", "--max-per-shard", "256", "--quiet"]
        )
    run = out / "run"
    if not list(run.glob("checkpoints/*/export.pt")):
        _run(
            [sys.executable, "trainer/main.py", "--config", "configs/quickstart.yaml", f"data.root={data}"]
            + [f"train.output_dir={run}", f"train.total_steps={train_steps}", "train.zero_stage=0"]
            + ["tracking.enabled=false", "sample.num_samples=4", "train.precision=fp32"]
        )
    return data, run


def main() -> None:
    from trainer.config import DataConfig
    from trainer.data import load_manifest, read_ranges
    from trainer.diffusion import diffusion_from_config
    from trainer.evaluation.features import ClassifierFeatures, train_classifier
    from trainer.evaluation.inference import generate_uint8, load_for_inference
    from trainer.evaluation.quality import compute_all, reference_from_features
    from trainer.evaluation.scoring import read_split_uint8

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=Path("/tmp/score_samplers"))
    p.add_argument("--samples", type=int, default=200)
    p.add_argument("--steps", default="50,100,250")
    p.add_argument("--train-steps", type=int, default=400)
    p.add_argument("--snr", type=float, default=0.16)
    p.add_argument("--results", type=Path, default=REPO / "bench" / "results" / "score_samplers")
    args = p.parse_args()
    torch.set_num_threads(1)
    args.out.mkdir(parents=True, exist_ok=True)
    data, run = prepare(args.out, args.train_steps)

    train = read_split_uint8(str(data), "train", None, 256)
    clf_path = args.out / "classifier.pt"
    if clf_path.is_file():
        net = ClassifierFeatures.load(clf_path)
    else:
        cfg = DataConfig(root=str(data), batch_size=256, num_workers=0, pin_memory=False, random_flip=False)
        labels = np.zeros(len(train), dtype=np.int64)
        for _, y, pos in read_ranges(cfg, load_manifest(str(data)), "train", [(0, len(train))]):
            labels[pos.numpy()] = y.numpy()
        net = train_classifier(train, labels, load_manifest(str(data)).num_classes, epochs=5, seed=0)
        net.save(clf_path)
    ref = reference_from_features(net.extract(train, batch_size=256))

    cfg, model, meta = load_for_inference(str(run), True, None, torch.device("cpu"))
    diffusion = diffusion_from_config(cfg.diffusion)
    shape = (meta["channels"], meta["image_size"], meta["image_size"])
    rows = []
    for steps in args.steps.split(","):
        for method in METHODS:
            s = cfg.sample.model_copy(update={"method": method, "steps": steps, "snr": args.snr})
            gen = torch.Generator().manual_seed(0)  # the same start noise for every method at a step count
            t0 = time.perf_counter()
            images = np.concatenate(
                [
                    generate_uint8(
                        model, diffusion, s, (min(100, args.samples - i), *shape), torch.device("cpu"), {}, gen
                    )
                    for i in range(0, args.samples, 100)
                ]
            )
            seconds = time.perf_counter() - t0
            m = compute_all(ref, net.extract(images, batch_size=256))
            row = {"method": method, "steps": int(steps), "samples": len(images), "seconds": round(seconds, 1)}
            row.update({k: round(float(m[k]), 4) for k in ("fid", "precision", "recall")})
            rows.append(row)
            print(row, flush=True)

    args.results.parent.mkdir(parents=True, exist_ok=True)
    info = {"train_steps": args.train_steps, "samples": args.samples, "snr": args.snr, "rows": rows}
    args.results.with_suffix(".json").write_text(json.dumps(info, indent=1) + "\n")
    lines = [
        f"# Score-based samplers vs ancestral (quickstart digits, {args.train_steps} training steps, EMA)",
        "",
        f"`python bench/experiments/score_samplers.py` · {args.samples} samples per row, same start noise per step "
        f"count · pc: 1 Langevin step at snr {args.snr} per step (2 network calls) · FID in a digit classifier's "
        "feature space against the train split (not comparable to Inception FIDs) · 1 CPU thread.",
        "",
        "| method | steps | network calls | FID | precision | recall | seconds |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        calls = r["steps"] * (2 if r["method"] == "pc" else 1)
        lines.append(
            f"| {r['method']} | {r['steps']} | {calls} | {r['fid']:.3f} | {r['precision']:.3f} | {r['recall']:.3f} "
            f"| {r['seconds']} |"
        )
    args.results.with_suffix(".md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
