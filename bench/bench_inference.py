"""Scaling of distributed sampling and bits/dim over ranks: 1 vs 2 CPU ranks, real processes.

Every measurement is one ``torchrun`` (gloo, ``OMP_NUM_THREADS=1`` per rank, so 2 ranks use the 2 cores
of this machine) of the shipped CLI, into a fresh output directory (a reused one would resume and do no
work), with MLflow off:

- ``trainer/sample.py``: ddpm 50, ddpm 250, ddim 25, ddim 50 and heun 25 steps; each setting draws a fixed
  number of samples (a multiple of 2 x batch, so both ranks get equal parts; parts = batch size) chosen
  so a 1-rank run takes ~10-40 s of the quickstart UNet here.
- ``trainer/evaluate.py bpd``: the full bound over all T steps of the first ``--bpd-images`` validation
  images, parts of ``--bpd-batch-size`` (default ``--batch-size``; 16 images in parts of 8, ~1 min at 1 rank).

Throughput is what the CLIs report themselves (``summary.json`` / the bpd report: images made now over
the seconds from the first part to the last rank's last part, so process start-up and model loading are
excluded). The 2-rank / 1-rank throughput ratio is the scaling figure (2.0 = perfect). With
``--repeats`` > 1 the 1- and 2-rank runs of a setting alternate and the medians are reported.

The model is a quickstart-sized export trained for 2 steps (weights are irrelevant to speed, only the
architecture matters) on digits shards built as in ``tests/conftest.py``, or ``--export PATH``.

    python bench/bench_inference.py                                 # full run (~8 min on 2 idle cores)
    python bench/bench_inference.py --export runs/quickstart/checkpoints/<tag>/export.pt --repeats 3
    python bench/bench_inference.py --quick --out /tmp/inference    # smoke test (~2 min): ddim 25 and bpd

Writes ``bench/results/inference.json`` (machine, every measurement) and ``inference.md`` (or ``--out``,
a path stem; an existing directory gets ``inference.*`` inside).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from benchlib import cpu_name

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
CONFIG = "configs/quickstart.yaml"
# method:steps:samples. The quickstart UNet takes ~4 ms per image per network call at batch 8 on one idle
# core here (~7 ms loaded), so these are ~18-30 s each at 1 rank (heun 25 = 49 calls); multiples of 16 = 2 x 8.
DEFAULT_SETTINGS = "ddpm:50:96,ddpm:250:32,ddim:25:192,ddim:50:96,heun:25:96"
QUICK_SETTINGS = "ddim:25:8"
QUICK_BATCH, QUICK_BPD_IMAGES, QUICK_BPD_BATCH = 4, 2, 1
SEED = 0
TIMEOUT_S = 3600


def _env(threads: int) -> dict[str, str]:
    return dict(
        os.environ,
        OMP_NUM_THREADS=str(threads),
        MKL_NUM_THREADS=str(threads),
        PYTHONUNBUFFERED="1",
        MLFLOW_ALLOW_FILE_STORE="true",
    )


def _run(cmd: list[str], threads: int, what: str) -> tuple[subprocess.CompletedProcess[str], float]:
    start = time.perf_counter()
    proc = subprocess.run(
        cmd, cwd=ROOT, env=_env(threads), capture_output=True, text=True, timeout=TIMEOUT_S, check=False
    )
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        tail = (proc.stdout + proc.stderr)[-3000:]
        raise RuntimeError(f"{what} failed (exit {proc.returncode}): {shlex.join(cmd)}\n{tail}")
    return proc, wall


def _torchrun(nproc: int, script: str, args: list[str]) -> list[str]:
    from trainer.distributed import free_port

    run = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", f"--master_port={free_port()}"]
    return [*run, script, *args]


# ------------------------------------------------------------------------------------------ set-up


def make_data(dest: Path, image_size: int, channels: int) -> Path:
    """Digits shards as ``tests/conftest.py``'s ``digits_shards`` builds them (180 validation images)."""
    cmd = [sys.executable, "-m", "data_prep", "make", "--source", "digits", "--out", str(dest)]
    cmd += ["--image-size", str(image_size), "--channels", str(channels), "--val-fraction", "0.1"]
    cmd += ["--max-per-shard", "256", "--quiet"]
    _run(cmd, 2, "data_prep make")
    return dest


def train_export(data: Path, work: Path) -> Path:
    """A quickstart-sized export after 2 training steps (its end-of-run grid kept tiny)."""
    cmd = [sys.executable, "trainer/main.py", "--config", CONFIG, f"data.root={data}", f"train.output_dir={work}"]
    cmd += ["train.total_steps=2", "tracking.enabled=false", "train.zero_stage=0"]
    cmd += ["sample.num_samples=4", "sample.batch_size=4", "sample.steps=5"]
    _run(cmd, 2, "training the export")
    exports = sorted(work.glob("checkpoints/*/export.pt"))
    if not exports:
        raise RuntimeError(f"training wrote no export under {work}/checkpoints")
    return exports[-1]


def export_info(path: Path) -> dict[str, Any]:
    from trainer.export import load_export

    state = load_export(str(path))
    meta, model = state["meta"], state["config"]["model"]
    params = sum(v.numel() for v in state["model"].values())
    return {
        "path": str(path),
        "image_size": int(meta["image_size"]),
        "channels": int(meta["channels"]),
        "num_classes": meta["num_classes"],
        "T": int(state["config"]["diffusion"]["steps"]),
        "params": params,
        "model": {k: model[k] for k in ("channels", "channel_mult", "num_res_blocks", "attention_resolutions")},
    }


# ------------------------------------------------------------------------------------------ measurements


def measure_sample(export: Path, work: Path, ranks: int, method: str, steps: str, n: int, batch: int) -> dict:
    out = Path(tempfile.mkdtemp(prefix=f"sample_{method}{steps}_r{ranks}_", dir=work))
    args = [str(export), "--num-samples", str(n), "--batch-size", str(batch), "--part-size", str(batch)]
    args += ["--method", method, "--steps", steps, "--seed", str(SEED), "--out", str(out), "--no-mlflow"]
    _, wall = _run(_torchrun(ranks, "trainer/sample.py", args), 1, f"sample {method} {steps} on {ranks} rank(s)")
    rep = json.loads((out / "summary.json").read_text())
    if rep["world_size"] != ranks or rep["made_now"] != n:
        raise RuntimeError(f"{out}: made {rep['made_now']} of {n} on {rep['world_size']} rank(s), not fresh work")
    return {"seconds": rep["seconds"], "made_now": rep["made_now"], "images_per_s": rep["images_per_s"], "wall_s": wall}


def measure_bpd(export: Path, data: Path, work: Path, ranks: int, n: int, batch: int) -> dict:
    out = Path(tempfile.mkdtemp(prefix=f"bpd_r{ranks}_", dir=work)) / "bpd.json"
    args = ["bpd", str(export), "--data-root", str(data), "--split", "val", "--max-images", str(n)]
    args += ["--batch-size", str(batch), "--seed", str(SEED), "--out", str(out), "--no-mlflow"]
    _, wall = _run(_torchrun(ranks, "trainer/evaluate.py", args), 1, f"bpd on {ranks} rank(s)")
    rep = json.loads(out.read_text())
    if rep["world_size"] != ranks or rep["made_now"] != n or rep["num_images"] != n:
        raise RuntimeError(f"{out}: {rep['made_now']} of {n} images on {rep['world_size']} rank(s), not fresh work")
    rate = rep["made_now"] / rep["seconds"]
    return {"seconds": rep["seconds"], "made_now": rep["made_now"], "images_per_s": rate, "wall_s": wall}


def parse_settings(spec: str) -> list[tuple[str, str, int]]:
    out = []
    for item in spec.split(","):
        parts = item.strip().split(":")
        if len(parts) != 3 or not parts[2].isdigit():
            raise SystemExit(f"--settings {item!r}: expected method:steps:samples, e.g. ddim:25:128")
        out.append((parts[0], parts[1], int(parts[2])))
    return out


def summarise(runs: list[dict[str, Any]], ranks: list[int]) -> list[dict[str, Any]]:
    rows = []
    for name in dict.fromkeys(r["setting"] for r in runs):
        mine = [r for r in runs if r["setting"] == name]
        row: dict[str, Any] = {"setting": name, "kind": mine[0]["kind"], "images": mine[0]["images"]}
        for k in ranks:
            rates = [r["images_per_s"] for r in mine if r["ranks"] == k]
            row[f"images_per_s_{k}"] = statistics.median(rates) if rates else None
        lo, hi = min(ranks), max(ranks)
        one, many = row[f"images_per_s_{lo}"], row[f"images_per_s_{hi}"]
        row["per_rank_images_per_s"] = many / hi if many else None
        row["ratio"] = many / one if one and many else None
        row["ideal_ratio"] = hi / lo
        rows.append(row)
    return rows


def markdown(report: dict[str, Any]) -> str:
    m, e, s = report["machine"], report["export"], report["summary"]
    lo, hi = min(report["ranks"]), max(report["ranks"])

    def fmt(v: float | None) -> str:
        return "" if v is None else f"{v:.3f}" if v < 10 else f"{v:.2f}"

    lines = [
        "# Distributed inference scaling (sampling, bits/dim)",
        "",
        f"Command: `{report['command']}`",
        "",
        f"{report['date']} · {m['cpu']} · {m['cpus']} CPUs · torch {m['torch']} · {m['threads_per_rank']} thread "
        f"per rank (`OMP_NUM_THREADS`), torchrun + gloo · quickstart UNet ({e['params']:,} params, "
        f"{e['image_size']}x{e['image_size']}x{e['channels']}, T = {e['T']}), fp32, EMA weights · batch "
        f"{report['batch_size']} per rank = part size (bits/dim: {report['bpd_batch_size']}) · {report['repeats']} "
        f"repeat(s), median · load average {report['load_before'][0]:.2f} before / {report['load_after'][0]:.2f} "
        "after (1-min)" + (" · `--quick` smoke test: not figures to quote." if report["quick"] else "."),
        "",
        "Images/s as the CLIs report them (images made / seconds from the first part to the last rank's last "
        "part; process start-up and model loading excluded). Ratio = "
        f"{hi}-rank / {lo}-rank throughput (ideal {hi / lo:g}).",
        "",
        f"| setting | {lo} rank img/s | {hi} ranks img/s | per-rank img/s at {hi} | ratio |",
        "|---|---:|---:|---:|---:|",
    ]
    for r in s:
        label = (
            f"sample {r['setting']} ({r['images']} img)" if r["kind"] == "sample" else f"bpd, all T ({r['images']} img)"
        )
        lines.append(
            f"| {label} | {fmt(r[f'images_per_s_{lo}'])} | {fmt(r[f'images_per_s_{hi}'])} "
            f"| {fmt(r['per_rank_images_per_s'])} | **{fmt(r['ratio'])}** |"
        )
    wall = sum(r["wall_s"] for r in report["runs"])
    timed = sum(r["seconds"] for r in report["runs"])
    lines += [
        "",
        f"{len(report['runs'])} launches, {wall:.0f} s of wall time, {timed:.0f} s of it timed (the rest is process "
        "start-up, model loading and writing the outputs).",
    ]
    if report.get("notes"):
        lines += ["", *[f"- {n}" for n in report["notes"]]]
    return "\n".join(lines) + "\n"


def _command_line() -> str:
    script = Path(sys.argv[0]).resolve()
    shown = script.relative_to(ROOT) if script.is_relative_to(ROOT) else script
    return shlex.join(["python", str(shown), *sys.argv[1:]])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--export", type=Path, default=None, help="an export.pt to use (default: train a 2-step one)")
    p.add_argument("--data-root", type=Path, default=None, help="shards for bits/dim (default: digits, built)")
    p.add_argument("--settings", default=None, help=f"method:steps:samples list (default {DEFAULT_SETTINGS})")
    p.add_argument("--batch-size", type=int, default=None, help="images per network call per rank (default 8)")
    p.add_argument("--bpd-images", type=int, default=None, help="validation images for bits/dim (default 16)")
    p.add_argument("--bpd-batch-size", type=int, default=None, help="bits/dim part size (default: --batch-size)")
    p.add_argument("--no-bpd", action="store_true", help="skip the bits/dim measurement")
    p.add_argument("--ranks", type=int, nargs="+", default=[1, 2])
    p.add_argument("--repeats", type=int, default=1, help="runs per setting and rank count (medians reported)")
    p.add_argument("--quick", action="store_true", help=f"smoke test: {QUICK_SETTINGS}, batch 4, bpd of 2 images")
    p.add_argument("--note", action="append", default=[], help="a line for the report (repeatable)")
    p.add_argument("--out", type=Path, default=RESULTS / "inference", help="output path stem (.json, .md)")
    args = p.parse_args(argv)
    settings = parse_settings(args.settings or (QUICK_SETTINGS if args.quick else DEFAULT_SETTINGS))
    batch = args.batch_size or (QUICK_BATCH if args.quick else 8)
    bpd_images = args.bpd_images or (QUICK_BPD_IMAGES if args.quick else 16)
    bpd_batch = args.bpd_batch_size or (QUICK_BPD_BATCH if args.quick and not args.batch_size else batch)
    ranks = sorted(set(args.ranks))
    if min(ranks) < 1:
        raise SystemExit("--ranks: at least 1")
    counts = [(f"{m} {s}", n, batch) for m, s, n in settings] + (
        [] if args.no_bpd else [("bpd", bpd_images, bpd_batch)]
    )
    for name, n, b in counts:
        if n % (max(ranks) * b):
            print(
                f"note: {name}: {n} images are not a multiple of {max(ranks)} ranks x {b}: uneven parts",
                file=sys.stderr,
            )
    out = args.out / "inference" if args.out.is_dir() else args.out

    import torch

    load_before = os.getloadavg()
    runs: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="bench_inference_") as tmp:
        work = Path(tmp)
        t0 = time.perf_counter()
        data = args.data_root.resolve() if args.data_root else None
        if args.export is None:
            data = data or make_data(work / "data", 16, 1)
            export = train_export(data, work / "run")
            print(f"trained {export} in {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
        else:
            export = args.export.resolve()
        info = export_info(export)
        if data is None and not args.no_bpd:  # shards of the export's image size for bits/dim
            data = make_data(work / "data", info["image_size"], info["channels"])

        jobs: list[tuple[str, Any]] = [(f"{m} {s}", (m, s, n)) for m, s, n in settings]
        if not args.no_bpd:
            jobs.append(("bpd", None))
        for rep in range(1, args.repeats + 1):
            for name, job in jobs:
                order = ranks if rep % 2 else ranks[::-1]  # alternate which rank count runs first
                for k in order:
                    if job is None:
                        res = measure_bpd(export, data, work, k, bpd_images, bpd_batch)
                        rec = {"kind": "bpd", "setting": name, "images": bpd_images, "batch_size": bpd_batch}
                    else:
                        method, steps, n = job
                        res = measure_sample(export, work, k, method, steps, n, batch)
                        rec = {"kind": "sample", "setting": name, "method": method, "steps": steps, "images": n}
                    rec.setdefault("batch_size", batch)
                    rec.update(ranks=k, repeat=rep, **res)
                    rec["images_per_s_per_rank"] = rec["images_per_s"] / k
                    rec["load1_after"] = os.getloadavg()[0]
                    runs.append(rec)
                    print(
                        f"{name:>10} ranks {k} repeat {rep}: {rec['images_per_s']:8.3f} img/s "
                        f"({rec['seconds']:.1f} s timed, {rec['wall_s']:.1f} s wall)",
                        file=sys.stderr,
                        flush=True,
                    )
        if args.export is None:
            info["path"] = "(trained for this run, 2 steps, deleted)"
    report: dict[str, Any] = {
        "command": _command_line(),
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": {
            "cpu": cpu_name(),
            "cpus": os.cpu_count(),
            "affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
            "torch": torch.__version__,
            "python": platform.python_version(),
            "threads_per_rank": 1,
        },
        "config": CONFIG,
        "export": info,
        "quick": args.quick,
        "ranks": ranks,
        "batch_size": batch,
        "bpd_batch_size": bpd_batch,
        "repeats": args.repeats,
        "seed": SEED,
        "load_before": load_before,
        "load_after": os.getloadavg(),
        "total_wall_s": time.perf_counter() - t0,
        "summary": summarise(runs, ranks),
        "runs": runs,
        "notes": args.note,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    out.with_suffix(".md").write_text(markdown(report))
    print(markdown(report))
    print(f"wrote {out.with_suffix('.json')} and {out.with_suffix('.md')}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
