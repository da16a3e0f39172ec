"""Post-hoc EMA evidence at the suite's small scale: the sweep's best σ_rel against the configured fixed-rate
EMA, on bits/dim and classifier-feature FID (issue 22).

    python bench/experiments/phema_evidence.py --train 0 1 --data data/digits16 --out DIR     # trains, then sweeps
    python bench/experiments/phema_evidence.py --runs R0 R1 --data data/digits16 --out DIR  # runs trained before

Each run is the quickstart (configs/quickstart.yaml: digits 16x16, the quickstart UNet, 2 ranks x 32 images,
400 steps, EMA 0.99) trained with ``train.phema.enabled=true train.phema.every_steps=20`` and ``train.seed`` =
``data.seed`` = the seed (``--train`` runs exactly that, through the deepspeed launcher as ``make quickstart``).

For each run: ``python -m trainer.phema reconstruct`` sweeps σ_rel (and the fixed EMA's matched σ_rel,
``--decay``) with ``--eval bpd fid`` (the periodic evaluation's bits/dim estimate on the val split and FID of
samples against the train split's statistics in the feature space of a digit classifier trained here); then
the exact bound over all T steps (``trainer/evaluate.py bpd``, per image, the same images and noise for every
model) of the sweep's best σ_rel and of the fixed-rate EMA, compared paired over images and seeds
(bench/experiments/paired.py). Selection caveat: the best σ_rel is chosen on the same val images its exact
bits/dim is then measured on.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(ROOT))

import paired  # noqa: E402
import report  # noqa: E402

SIGMAS = ["0.03", "0.05", "0.10", "0.20", "0.25"]


def run(cmd: list[str]) -> str:
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"failed: {' '.join(cmd)}\n{(proc.stdout + proc.stderr)[-3000:]}")
    return proc.stdout


def classifier(data: Path, out: Path) -> tuple[Path, Path, float]:
    import numpy as np
    import torch

    from trainer.evaluation import scoring
    from trainer.evaluation.features import train_classifier

    clf, ref, info = out / "classifier.pt", out / "ref_train.npz", out / "classifier.json"
    if info.is_file():  # made by an earlier call: every run is scored with the same network and reference
        return clf, ref, json.loads(info.read_text())["val_accuracy"]
    out.mkdir(parents=True, exist_ok=True)
    x, y = report.read_split(data, "train")
    net = train_classifier(x, y, 10, epochs=20, seed=0)
    xv, yv = report.read_split(data, "val")
    with torch.inference_mode():
        acc = float((np.asarray(net.extract(xv, batch_size=256).logits).argmax(1) == yv).mean())
    net.save(clf)
    argv = ["--data", str(data), "--split", "train", "--features", str(clf), "--out", str(ref), "--device", "cpu"]
    if scoring.main("stats", argv) != 0:
        raise SystemExit("evaluate.py stats failed")
    info.write_text(json.dumps({"val_accuracy": acc}))
    return clf, ref, acc


def exact_bpd(export: Path, out: Path, images: int, ema_rate: str | None = None) -> list[float]:
    cmd = [sys.executable, "trainer/evaluate.py", "bpd", str(export), "--split", "val", "--max-images", str(images)]
    cmd += ["--out", str(out), "--no-mlflow"] + (["--ema-rate", ema_rate] if ema_rate else [])
    run(cmd)
    return json.loads(out.read_text())["per_image_bpd"]


def train(seed: int, data: Path, out: Path) -> Path:
    """The quickstart with post-hoc EMA on, seed ``seed``, in ``out/runs/seed<k>`` (kept: resumed when killed)."""
    from trainer.distributed import free_port

    run_dir = out / "runs" / f"seed{seed}"
    if (run_dir / "checkpoints" / "step_00000400" / "export.pt").is_file():
        return run_dir
    cmd = [str(Path(sys.executable).parent / "deepspeed"), "--num_gpus", "2", "--master_port", str(free_port())]
    cmd += ["trainer/main.py", "--config", "configs/quickstart.yaml", "--resume", "auto"]
    cmd += [f"data.root={data}", f"train.seed={seed}", f"data.seed={seed}", "train.phema.enabled=true"]
    cmd += ["train.phema.every_steps=20", f"train.output_dir={run_dir}", f"tracking.uri=sqlite:///{out}/mlflow.db"]
    print(f"training seed {seed}: {' '.join(cmd)}", flush=True)
    run(cmd)
    return run_dir


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--runs", type=Path, nargs="*", default=[], help="runs to sweep now (seed k = their --first + k)")
    p.add_argument("--first", type=int, default=0, help="the seed index of the first of --runs")
    p.add_argument("--train", type=int, nargs="*", default=[], help="seeds to train here (instead of --runs)")
    p.add_argument("--data", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--fid-samples", type=int, default=256)
    p.add_argument("--fid-steps", default="ddim25")
    p.add_argument("--exact-images", type=int, default=64)
    a = p.parse_args()
    clf, ref, acc = classifier(a.data, a.out / "classifier")
    seeds: dict[int, dict] = {}
    todo = list(enumerate(a.runs, start=a.first)) + [(k, train(k, a.data.resolve(), a.out.resolve())) for k in a.train]
    for k, run_dir in todo:
        recon = a.out / f"seed{k}"
        if (recon / "result.json").is_file():
            continue  # swept and measured by an earlier call
        cmd = [sys.executable, "-m", "trainer.phema", "reconstruct", str(run_dir), "--out", str(recon)]
        cmd += ["--sigma-rel", *SIGMAS, "--decay", "0.99", "--max-error", "0.07", "--eval", "bpd", "fid"]
        cmd += ["--features", str(clf), "--reference", str(ref), "--fid-samples", str(a.fid_samples)]
        cmd += ["--data-root", str(a.data), "--fid-steps", a.fid_steps]
        run(cmd)
        (sweep_dir,) = sorted(recon.glob("sweep_step*"))
        sweep = json.loads((sweep_dir / "sweep.json").read_text())
        best = sweep["best"]["bpd"]
        step = sweep["step"]
        best_export = next(recon.glob(f"sigma{best['sigma_rel']:.4f}_step*/export.pt"))
        fixed_export = run_dir / "checkpoints" / f"step_{step:08d}" / "export.pt"
        result = {
            "run": str(run_dir),
            "sweep": sweep,
            "best_bpd_sigma_rel": best["sigma_rel"],
            "exact_best": exact_bpd(best_export, recon / "exact_best.json", a.exact_images),
            "exact_fixed": exact_bpd(fixed_export, recon / "exact_fixed.json", a.exact_images, "0.99"),
        }
        (recon / "result.json").write_text(json.dumps(result, indent=1))
    # Every seed swept so far (this call or earlier ones) goes into the comparison.
    for f in sorted(a.out.glob("seed*/result.json")):
        seeds[int(f.parent.name.removeprefix("seed"))] = json.loads(f.read_text())
    iv = paired.paired_difference(
        {k: s["exact_best"] for k, s in seeds.items()}, {k: s["exact_fixed"] for k, s in seeds.items()}
    )
    doc = {"classifier_val_accuracy": acc, "sigmas": SIGMAS, "seeds": seeds, "paired_exact_bpd": iv}
    (a.out / "evidence.json").write_text(json.dumps(doc, indent=1))
    print(paired.describe("best sigma_rel", "ema 0.99", iv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
