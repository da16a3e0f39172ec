"""UNet forward+backward throughput and peak memory for the quickstart and CIFAR-10 presets.

Each case (preset × device × precision) runs in its own subprocess so that the CPU peak RSS
(``resource.getrusage``, a process-lifetime maximum) belongs to that case alone. On CUDA the peak
is ``torch.cuda.max_memory_allocated``. A step is forward + a scalar loss + backward (no optimizer);
its FLOPs are counted once with ``torch.utils.flop_counter`` to report the achieved rate.

    python bench/bench_unet.py                      # CPU fp32 + bf16 autocast, and CUDA bf16 if present
    python bench/bench_unet.py --iters 10 --threads 2

Writes ``bench/results/unet.json`` and ``bench/results/unet.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

from benchlib import cpu_name

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"

# preset name → (config file, image size, image channels, batch on CPU, batch on CUDA)
PRESETS = {
    "quickstart": ("configs/quickstart.yaml", 16, 1, 16, 256),
    "cifar10": ("configs/cifar10_hybrid.yaml", 32, 3, 4, 128),
}
NO_GPU_NOTE = "No GPU on this machine: the CUDA bf16 rows (channels_last, batch 256/128) appear when run on one."


def run_case(preset: str, device: str, precision: str, iters: int, warmup: int, threads: int) -> dict:
    """Measure one case in this process and return its record."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from trainer.config import load_config
    from trainer.models.unet import build_unet, count_parameters, estimate_flops_per_image

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    path, image, channels, cpu_batch, cuda_batch = PRESETS[preset]
    batch = cuda_batch if device == "cuda" else cpu_batch
    cfg = load_config(ROOT / path).model
    if device == "cuda":
        cfg = cfg.model_copy(update={"channels_last": True})
    model = build_unet(cfg, image, channels, learn_sigma=True).to(device).train()
    x = torch.randn(batch, channels, image, image, device=device)
    t = torch.randint(0, 4000, (batch,), device=device)
    autocast = torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=precision == "bf16")

    def step() -> None:
        with autocast:
            out = model(x, t)
        out.float().square().mean().backward()
        model.zero_grad(set_to_none=True)

    def sync() -> None:
        if device == "cuda":
            torch.cuda.synchronize()

    rss_before_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    counter = FlopCounterMode(display=False)
    with counter:
        step()  # first warm-up step, counted
    step_flops = int(counter.get_total_flops())
    for _ in range(max(warmup - 1, 0)):
        step()
    sync()
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - start)
    median = sorted(times)[len(times) // 2]
    record = {
        "preset": preset,
        "device": device,
        "precision": "bf16 autocast" if precision == "bf16" else "fp32",
        "batch": batch,
        "image": f"{channels}x{image}x{image}",
        "params": count_parameters(model),
        "fwd_gflops_per_image": estimate_flops_per_image(model, image, channels, None) / 1e9,
        "step_gflops": step_flops / 1e9,
        "iters": iters,
        "step_s_median": median,
        "step_s_min": min(times),
        "images_per_s": batch / median,
        "achieved_tflops": step_flops / median / 1e12,
        "threads": threads,
    }
    if device == "cuda":
        record["peak_mem_mib"] = torch.cuda.max_memory_allocated() / 2**20
        record["gpu"] = torch.cuda.get_device_name()
    else:
        # ru_maxrss is in KiB on Linux.
        record["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        record["rss_before_steps_mib"] = rss_before_kb / 1024
    return record


def spawn_case(preset: str, device: str, precision: str, args: argparse.Namespace) -> dict:
    cmd = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--case",
        f"{preset}:{device}:{precision}",
        "--iters",
        str(args.iters),
        "--warmup",
        str(args.warmup),
        "--threads",
        str(args.threads),
    ]
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"case {preset}:{device}:{precision} failed:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def markdown(report: dict) -> str:
    lines = [
        "# UNet forward+backward benchmark",
        "",
        f"{report['date']} · {report['cpu']} · {report['cpus']} CPUs shared by several users · "
        f"torch {report['torch']} · {report['threads']} thread(s) · load average "
        f"{report['load_before'][0]:.2f} before / {report['load_after'][0]:.2f} after (1-min). "
        f"{report['note']}",
        "",
        "| preset | device | precision | batch | params | fwd GFLOP/img | images/s | step s (median) "
        "| achieved TFLOP/s | peak memory |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in report["results"]:
        mem = (
            f"{r['peak_mem_mib']:.0f} MiB (CUDA allocated)"
            if "peak_mem_mib" in r
            else f"{r['peak_rss_mib']:.0f} MiB RSS ({r['rss_before_steps_mib']:.0f} before steps)"
        )
        lines.append(
            f"| {r['preset']} | {r['device']} | {r['precision']} | {r['batch']} | {r['params']:,} "
            f"| {r['fwd_gflops_per_image']:.2f} | {r['images_per_s']:.1f} | {r['step_s_median']:.3f} "
            f"| {r['achieved_tflops']:.4f} | {mem} |"
        )
    if report.get("gpu_note"):
        lines += ["", report["gpu_note"]]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iters", type=int, default=5, help="timed steps per case")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per case (the first is FLOP-counted)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (machine is shared)")
    parser.add_argument("--presets", default="quickstart,cifar10")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--case", help=argparse.SUPPRESS)  # internal: run one case, print JSON
    args = parser.parse_args()

    if args.case:
        preset, device, precision = args.case.split(":")
        print(json.dumps(run_case(preset, device, precision, args.iters, args.warmup, args.threads)))
        return

    import torch

    cases = []
    for preset in args.presets.split(","):
        if preset not in PRESETS:
            raise SystemExit(f"--presets: unknown preset {preset!r}; choose from {','.join(PRESETS)}")
        cases += [(preset, "cpu", "fp32"), (preset, "cpu", "bf16")]
        if torch.cuda.is_available():
            cases.append((preset, "cuda", "bf16"))
    load_before = os.getloadavg()
    results = []
    for case in cases:
        print(f"running {':'.join(case)} ...", file=sys.stderr, flush=True)
        results.append(spawn_case(*case, args))
        print(json.dumps(results[-1]), file=sys.stderr, flush=True)
    report = {
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "cpu": cpu_name(),
        "cpus": os.cpu_count(),
        "torch": torch.__version__,
        "threads": args.threads,
        "load_before": load_before,
        "load_after": os.getloadavg(),
        "note": "Step = forward + MSE-style loss + backward, no optimizer; TFLOP/s from counted step FLOPs.",
        "gpu_note": None if torch.cuda.is_available() else NO_GPU_NOTE,
        "results": results,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "unet.json").write_text(json.dumps(report, indent=2) + "\n")
    (args.out / "unet.md").write_text(markdown(report))
    print(markdown(report))


if __name__ == "__main__":
    main()
