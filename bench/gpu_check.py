"""One GPU check: CIFAR-10 preset throughput (full stack vs a bare loop) and the quickstart end to end.

Run by ``bench/gpu_check.sh`` (which installs the carried wheels and refuses to start without a GPU):

(a) The CIFAR-10 preset UNet (``configs/cifar10_hybrid.yaml``, 52.5M parameters, batch 128) on one GPU,
    on 32x32 RGB shards made from the built-in digits (no download):
    - ``trainer``: the real :class:`trainer.main.Trainer` (DeepSpeed bf16, ZeRO-2, the webdataset stream
      with loader workers, EMA, non-finite guard, hybrid loss), tracking disabled; each step is what
      ``Trainer.fit`` does per step (``fit(until=...)``, one launch; checkpoints set beyond the run);
    - ``bare``: the same UNet and loss in a plain loop: fp32 weights, bf16 autocast around the model call,
      torch's fused AdamW, the same gradient clipping, pre-loaded batches on the device.
    Reported: images/s, the ratio, MFU = 3 x forward FLOPs/image x images/s / the GPU's peak dense bf16
    FLOP/s (omitted for GPUs not in :data:`PEAK_BF16`), and peak memory (``torch.cuda.max_memory_allocated``).
(b) ``trainer/main.py --config configs/quickstart.yaml`` end to end (digits shards, tracking disabled),
    run under ``python -X importtime`` to show that our code imports no MLflow there; it must leave a grid.

Writes ``gpu.json`` and ``gpu.md`` (default ``bench/results/``), the grid and ``gpu_check.log`` (the
children's output) beside them, and copies all four to ``$OUT`` when that is set. Exit status 0 when
every part ran, 1 otherwise (the files say what failed).

    python bench/gpu_check.py                       # on a GPU machine (normally via bench/gpu_check.sh)
    python bench/gpu_check.py --dry-run --out /tmp/x  # CPU, tiny model, 3 steps: everything but CUDA
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from benchlib import bare_step, cpu_name

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
CIFAR_CONFIG = "configs/cifar10_hybrid.yaml"
QUICKSTART_CONFIG = "configs/quickstart.yaml"
RESULT_PREFIX = "RESULT "
LOG_LINES = 300  # last lines of each child's output kept in gpu_check.log
LOGS: list[tuple[str, str]] = []  # (part, output) of every child process, for gpu_check.log
RESERVE_BARE = 90.0  # seconds kept for the bare loop while the trainer runs
RESERVE_QUICKSTART = 120.0  # seconds kept for the quickstart while part (a) runs
SYNC_STEPS = 20
"""Steps run after the timed ones under torch.cuda's sync debug mode, counting host waits (a log step may
fall among them: it reads its metrics on purpose)."""
FAR = 10**9  # a cadence beyond any run here: no checkpoint, plot or grid inside the timed window

# Peak dense (no sparsity) bf16 tensor-core FLOP/s from the vendors' data sheets, matched on the name
# torch reports (e.g. "NVIDIA H100 80GB HBM3"). First match wins: the PCIe/NVL H100s before the SXM one.
PEAK_BF16: list[tuple[str, float]] = [
    (r"\bGH200\b", 989e12),
    (r"\bH200\b", 989e12),
    (r"\bH100\b.*\bPCIe\b", 756e12),
    (r"\bH100\b.*\bNVL\b", 835e12),
    (r"\bH100\b", 989e12),
    (r"\bB200\b", 2250e12),
    (r"\bA100\b", 312e12),
    (r"\bL40S\b", 362e12),
    (r"\bL4\b", 121e12),
    (r"\bA10\b", 125e12),
]

# A model small enough for a CPU dry run of the same code paths (shapes valid for 32x32 images).
TINY_MODEL = [
    "model.channels=16",
    "model.norm_groups=8",
    "model.channel_mult=[1,2]",
    "model.num_res_blocks=1",
    "model.attention_resolutions=[16]",
    "diffusion.steps=100",
]
TINY_QUICKSTART = [
    "model.channels=16",
    "model.norm_groups=8",
    "diffusion.steps=100",
    "train.total_steps=3",
    "train.warmup_steps=1",
    "train.log_every=1",
    "train.ckpt_every=3",
    "train.importance_plot_every=3",
    "sample.num_samples=4",
    "sample.batch_size=4",
    "sample.steps=5",
]


def peak_bf16_flops(device_name: str) -> float | None:
    for pattern, flops in PEAK_BF16:
        if re.search(pattern, device_name):
            return flops
    return None


def _schema_has(section: str, key: str) -> bool:
    """Whether the config schema has ``section.key`` (keys being added concurrently may be absent)."""
    from trainer.config import Config

    sub = Config.model_fields[section].annotation
    return key in getattr(sub, "model_fields", {})


def train_overrides(args: argparse.Namespace, data: Path, work: Path) -> list[str]:
    out = [
        f"data.root={data}",
        f"data.batch_size={args.batch}",
        f"data.num_workers={args.workers}",
        f"data.pin_memory={'true' if args.device == 'cuda' else 'false'}",
        "train.precision=bf16",
        "train.zero_stage=2",
        "tracking.enabled=false",
        f"train.output_dir={work / 'run'}",
        f"train.total_steps={FAR}",
        f"train.ckpt_every={FAR}",
        f"train.importance_plot_every={FAR}",
        "train.sample_every=0",
    ]
    if _schema_has("data", "global_batch_size"):
        out.append(f"data.global_batch_size={args.batch}")  # one rank, no accumulation: global == per rank
    if _schema_has("train", "compile"):
        out.append("train.compile=false")  # eager in both variants: compile time would swamp a short run
    if args.dry_run:
        out += [*TINY_MODEL, "train.log_every=2"]  # the metrics path runs inside a 4-step dry run too
    return out


# ------------------------------------------------------------------------------------------ children


def _sync(device: Any) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _peak_memory(device: Any) -> dict[str, float]:
    import torch

    if device.type == "cuda":
        return {"peak_mem_gib": torch.cuda.max_memory_allocated(device) / 2**30}
    return {"peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}  # KiB on Linux


def _timed(step: Any, device: Any, warmup: int, steps: int) -> float:
    for _ in range(warmup):
        step()
    _sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    _sync(device)
    return time.perf_counter() - start


def _count_syncs(step: Any, device: Any, steps: int) -> dict[str, Any] | None:
    """Operations that made the host wait for the GPU during ``steps`` more steps, by the Python line that
    called them: torch.cuda's sync debug mode warns at each one (None off CUDA)."""
    import warnings
    from collections import Counter

    import torch

    if device.type != "cuda":
        return None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            for _ in range(steps):
                step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    where = Counter(
        f"{w.filename.split('site-packages/')[-1].removeprefix(str(ROOT) + '/')}:{w.lineno}"
        for w in caught
        if "synchroniz" in str(w.message)
    )
    return {"steps": steps, "per_step": sum(where.values()) / steps, "by_line": dict(where.most_common(12))}


def child_trainer(args: argparse.Namespace) -> dict[str, Any]:
    from trainer import distributed
    from trainer.config import load_config
    from trainer.main import Trainer

    cfg = load_config(ROOT / CIFAR_CONFIG, train_overrides(args, Path(args.data), Path(args.work)))
    env = distributed.init_distributed()
    if env.device.type != args.device:
        raise RuntimeError(f"trainer picked {env.device.type}, the check asked for {args.device}")
    trainer = Trainer(cfg, env)
    trainer.resume("none")
    state, stream = trainer.state, trainer.stream

    def step() -> None:
        trainer.fit(until=state.step + int(trainer.step.in_flight) + 1)  # one launch of the loop
        if state.skipped_steps:
            raise RuntimeError(f"non-finite step before step {state.step + 1}")

    for _ in range(args.warmup):
        step()
    wait0 = stream.stats().get("wait_s", 0.0)
    seconds = _timed(step, env.device, 0, args.steps)
    wait = stream.stats().get("wait_s", 0.0) - wait0
    syncs = _count_syncs(step, env.device, SYNC_STEPS)
    out = {
        "host_syncs": syncs,
        "seconds": seconds,
        "data_wait_ms_per_step": 1e3 * wait / args.steps,
        "params": trainer.parts.n_params,
        "fwd_flops_per_image": trainer.parts.flops,
        "precision": f"DeepSpeed {trainer.rt.precision}, ZeRO-{trainer.rt.zero_stage}",
        # Informational: DeepSpeed imports mlflow itself where it is installed (quickstart part checks ours).
        "mlflow_in_sys_modules": "mlflow" in sys.modules,
        **_peak_memory(env.device),
    }
    stream.close()
    distributed.shutdown()
    return out


def child_bare(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from trainer.config import load_config
    from trainer.data import build_train_stream, load_manifest

    device = torch.device(args.device)
    cfg = load_config(ROOT / CIFAR_CONFIG, train_overrides(args, Path(args.data), Path(args.work)))
    manifest = load_manifest(cfg.data.root)
    # Decoded batches from the same stream, already on the device: the bare loop never waits for data.
    stream = build_train_stream(cfg.data.model_copy(update={"num_workers": 0}), manifest, rank=0, world_size=1)
    batches = [next(stream)[0].to(device) for _ in range(min(8, args.warmup + args.steps))]
    calls = iter(range(10**12))
    step = bare_step(cfg, manifest, device, lambda: batches[next(calls) % len(batches)], bf16=True)
    seconds = _timed(step, device, args.warmup, args.steps)
    return {
        "seconds": seconds,
        "precision": "fp32 weights, bf16 autocast, torch AdamW (fused)",
        **_peak_memory(device),
    }


def child(args: argparse.Namespace) -> None:
    out = child_trainer(args) if args.child == "trainer" else child_bare(args)
    out["images_per_s"] = args.steps * args.batch / out["seconds"]
    out["step_ms"] = 1e3 * out["seconds"] / args.steps
    print(RESULT_PREFIX + json.dumps(out), flush=True)


# ------------------------------------------------------------------------------------------ parent


def _env(args: argparse.Namespace) -> dict[str, str]:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    # The repo is not installed on the GPU node: make trainer/ and data_prep/ importable from anywhere.
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    if args.device == "cpu":
        env.setdefault("OMP_NUM_THREADS", "1")
    return env


def _tail(text: str, lines: int = 25) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])


def make_data(work: Path, env: dict[str, str]) -> tuple[Path, Path]:
    """32x32 RGB shards for the CIFAR-10 model and the quickstart's 16x16 grey ones, built concurrently."""
    specs = {"digits32rgb": ("32", "3"), "digits16": ("16", "1")}
    procs = {}
    for name, (size, channels) in specs.items():
        cmd = [sys.executable, "-m", "data_prep", "make", "--source", "digits", "--out", str(work / name)]
        cmd += ["--image-size", size, "--channels", channels, "--val-fraction", "0.1", "--max-per-shard", "256"]
        cmd += ["--quiet", "--workers", "2"]
        procs[name] = subprocess.Popen(
            cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
    for name, proc in procs.items():
        output, _ = proc.communicate(timeout=300)
        if proc.returncode != 0:
            raise RuntimeError(f"data_prep for {name} failed (exit {proc.returncode}):\n{_tail(output)}")
    return work / "digits32rgb", work / "digits16"


def spawn(
    variant: str, args: argparse.Namespace, data: Path, work: Path, env: dict[str, str], timeout: float
) -> dict[str, Any]:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", variant, "--data", str(data)]
    cmd += ["--work", str(work), "--device", args.device, "--steps", str(args.steps), "--warmup", str(args.warmup)]
    cmd += ["--batch", str(args.batch), "--workers", str(args.workers)]
    if args.dry_run:
        cmd.append("--dry-run")
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        return {"ok": False, "error": f"timed out after {timeout:.0f} s"}
    LOGS.append((f"(a) {variant}", proc.stdout + proc.stderr))
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(RESULT_PREFIX)]
    if proc.returncode != 0 or not lines:
        return {"ok": False, "error": f"exit {proc.returncode}: {_tail(proc.stderr or proc.stdout)}"}
    out = json.loads(lines[-1][len(RESULT_PREFIX) :])
    out.update(ok=True, process_s=time.perf_counter() - t0)
    return out


def run_quickstart(
    args: argparse.Namespace, data: Path, work: Path, env: dict[str, str], timeout: float
) -> dict[str, Any]:
    """``trainer/main.py`` as a user runs it, under ``-X importtime`` (every import is listed on stderr)."""
    out_dir = work / "quickstart"
    cmd = [sys.executable, "-X", "importtime", "trainer/main.py", "--config", QUICKSTART_CONFIG, "--resume", "none"]
    cmd += [f"data.root={data}", "tracking.enabled=false", f"train.output_dir={out_dir}"]
    if args.dry_run:
        cmd += TINY_QUICKSTART
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        return {"ok": False, "error": f"timed out after {timeout:.0f} s"}
    wall = time.perf_counter() - t0
    imports = [ln for ln in proc.stderr.splitlines() if ln.startswith("import time:")]
    LOGS.append(("(b) quickstart", proc.stdout + "\n".join(ln for ln in proc.stderr.splitlines() if ln not in imports)))
    importers = mlflow_importers(imports)
    ours = sorted(m for m in importers if not m.startswith("deepspeed."))
    other_err = "\n".join(ln for ln in proc.stderr.splitlines() if not ln.startswith("import time:"))
    grids = sorted((out_dir / "samples").glob("*.png"))
    steps = [ln for ln in proc.stdout.splitlines() if ln.startswith("step ")]
    result: dict[str, Any] = {
        "command": " ".join(cmd[1:]),
        "exit_code": proc.returncode,
        "wall_s": wall,
        "grid": str(grids[-1]) if grids else None,
        "last_log": steps[-1] if steps else None,
        # DeepSpeed's autotuner does ``try: import mlflow`` (absent on the GPU node); any other importer is ours.
        "mlflow_imported_by": importers,
        "modules_imported": len(imports),
    }
    problems = []
    if proc.returncode != 0:
        problems.append(f"exit {proc.returncode}: {_tail(other_err or proc.stdout)}")
    if not grids:
        problems.append("no sample grid under " + str(out_dir / "samples"))
    if ours:
        problems.append(f"tracking disabled, yet {', '.join(ours)} imported MLflow")
    result["ok"] = not problems
    if problems:
        result["error"] = "; ".join(problems)
    return result


def mlflow_importers(importtime_lines: list[str]) -> list[str]:
    """The modules that imported ``mlflow`` directly, from ``python -X importtime`` lines.

    Each line ends ``| <indent>module``, one more space of indent per level of nesting, and a module is
    listed after everything it imported: the importer of a module is the first later line indented less.
    """
    entries = []
    for line in importtime_lines:
        name_field = line.rsplit("|", 1)[-1]
        name = name_field.strip()
        entries.append((len(name_field) - len(name_field.lstrip(" ")), name))
    found = set()
    for i, (indent, name) in enumerate(entries):
        if name.split(".")[0] != "mlflow":
            continue
        for later_indent, later in entries[i + 1 :]:
            if later_indent < indent:
                if later.split(".")[0] != "mlflow":
                    found.add(later)
                break
        else:
            found.add("<top level>")
    return sorted(found)


def device_info(device: str) -> dict[str, Any]:
    import torch

    info: dict[str, Any] = {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cuda": torch.version.cuda,
    }
    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        info.update(name=torch.cuda.get_device_name(0), memory_gib=props.total_memory / 2**30)
    else:
        name = cpu_name()
        info["name"] = f"CPU: {name}"
    return info


def markdown(report: dict[str, Any]) -> str:
    dev, tr = report["device"], report["train"]
    mode = " (CPU dry run: tiny model, a few steps; not a measurement)" if report["dry_run"] else ""
    lines = [
        f"# GPU check{mode}",
        "",
        f"{report['date']} · {dev['name']} · torch {dev['torch']} (CUDA {dev['cuda']}) · Python {dev['python']}",
        "",
        f"## (a) {tr['config']}: {tr.get('params', 0):,} params, {tr.get('fwd_gflops_per_image', 0):.2f} GFLOP/img "
        f"forward, batch {tr['batch']}, {tr['steps']} timed steps after {tr['warmup']} warm-up",
        "",
        "| variant | precision | images/s | step ms | MFU | peak memory | note |",
        "|---|---|---|---|---|---|---|",
    ]
    for name in ("trainer", "bare"):
        r = tr[name]
        if not r.get("ok"):
            lines.append(f"| {name} | | failed | | | | {r.get('error', '').splitlines()[-1][:200]} |")
            continue
        mfu = f"{100 * r['mfu']:.1f}%" if r.get("mfu") is not None else "n/a"
        mem = f"{r['peak_mem_gib']:.2f} GiB" if "peak_mem_gib" in r else f"{r.get('peak_rss_gib', 0):.2f} GiB RSS"
        note = f"data wait {r['data_wait_ms_per_step']:.1f} ms/step" if "data_wait_ms_per_step" in r else ""
        lines.append(
            f"| {name} | {r['precision']} | {r['images_per_s']:.0f} | {r['step_ms']:.1f} | {mfu} | {mem} | {note} |"
        )
    if tr.get("ratio") is not None:
        lines += ["", f"trainer / bare images/s: **{tr['ratio']:.3f}**"]
    syncs = tr["trainer"].get("host_syncs")
    if syncs:
        by_line = ", ".join(f"`{k}` x{v}" for k, v in syncs["by_line"].items()) or "none"
        lines.append(
            f"Host waits for the GPU (torch.cuda sync debug mode, {syncs['steps']} trainer steps): "
            f"{syncs['per_step']:.2f} per step; by calling line: {by_line}."
        )
    if tr.get("peak_bf16_flops"):
        lines.append(
            f"MFU against {tr['peak_bf16_flops'] / 1e12:.0f} TFLOP/s dense bf16 (3 x forward FLOPs per image)."
        )
    else:
        lines.append("MFU omitted: this device is not in the peak-FLOP/s table.")
    qs = report["quickstart"]
    via = ", ".join(qs.get("mlflow_imported_by", []))  # importtime lists failed attempts too
    lines += ["", "## (b) quickstart end to end (tracking disabled)", ""]
    if qs.get("ok"):
        lines += [
            f"- `{qs['command']}`: exit {qs['exit_code']} in {qs['wall_s']:.0f} s",
            f"- last log line: `{qs['last_log']}`",
            f"- sample grid: `{Path(qs['grid']).name}` (copied next to this file as `gpu_quickstart_grid.png`)",
            "- MLflow imported by our code: no"
            + (f" (DeepSpeed's guarded, optional import attempt: {via})" if via else ""),
        ]
    else:
        lines.append(f"- FAILED: {qs.get('error', 'unknown')}")
    lines += ["", f"Overall: {'OK' if report['ok'] else 'FAILED'}"]
    return "\n".join(lines) + "\n"


def parent(args: argparse.Namespace) -> int:
    env = _env(args)
    out_dir = args.out
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as tmp:
        work = Path(args.work) if args.work else Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        if out_dir is None:
            out_dir = work / "results" if args.dry_run else RESULTS
        t0 = time.perf_counter()

        def time_left(reserve: float) -> float:
            # Each part may use what the budget leaves after reserving time for the parts after it.
            return max(30.0, t0 + args.budget_s - time.perf_counter() - reserve)

        data32, data16 = make_data(work, env)
        print(f"gpu_check: data ready in {time.perf_counter() - t0:.0f} s", flush=True)

        train: dict[str, Any] = {
            "config": CIFAR_CONFIG + (" + tiny model (dry run)" if args.dry_run else ""),
            "batch": args.batch,
            "steps": args.steps,
            "warmup": args.warmup,
            "loader_workers": args.workers,
        }
        for variant, reserve in (("trainer", RESERVE_BARE + RESERVE_QUICKSTART), ("bare", RESERVE_QUICKSTART)):
            (work / variant).mkdir(exist_ok=True)
            train[variant] = spawn(variant, args, data32, work / variant, env, time_left(reserve))
            r = train[variant]
            shown = f"{r['images_per_s']:.1f} images/s" if r.get("ok") else f"FAILED: {r['error'][-300:]}"
            print(f"gpu_check: (a) {variant}: {shown}", flush=True)

        dev = device_info(args.device)
        peak = peak_bf16_flops(dev["name"]) if args.device == "cuda" else None
        tr, bare = train["trainer"], train["bare"]
        if tr.get("ok"):
            train.update(params=tr["params"], fwd_gflops_per_image=tr["fwd_flops_per_image"] / 1e9)
            for r in (tr, bare):
                if r.get("ok"):
                    r["mfu"] = 3 * tr["fwd_flops_per_image"] * r["images_per_s"] / peak if peak else None
        train["peak_bf16_flops"] = peak
        train["ratio"] = tr["images_per_s"] / bare["images_per_s"] if tr.get("ok") and bare.get("ok") else None

        quick = run_quickstart(args, data16, work, env, time_left(0))
        print(f"gpu_check: (b) quickstart: {'OK' if quick['ok'] else 'FAILED: ' + quick['error'][-300:]}", flush=True)

        report = {
            "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "dry_run": args.dry_run,
            "device": dev,
            "train": train,
            "quickstart": quick,
            "total_s": time.perf_counter() - t0,
            "ok": bool(tr.get("ok") and bare.get("ok") and quick["ok"]),
        }
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "gpu.json").write_text(json.dumps(report, indent=2) + "\n")
        (out_dir / "gpu.md").write_text(markdown(report))
        (out_dir / "gpu_check.log").write_text(
            "".join(f"===== {part}\n{_tail(text, LOG_LINES)}\n" for part, text in LOGS)
        )
        grid = Path(quick["grid"]) if quick.get("grid") else None
        if grid is not None and grid.is_file():
            shutil.copyfile(grid, out_dir / "gpu_quickstart_grid.png")
        if os.environ.get("OUT"):  # the device tool brings back what lands in $OUT
            dest = Path(os.environ["OUT"])
            dest.mkdir(parents=True, exist_ok=True)
            for name in ("gpu.json", "gpu.md", "gpu_quickstart_grid.png", "gpu_check.log"):
                if (out_dir / name).is_file():
                    shutil.copyfile(out_dir / name, dest / name)
        print(markdown(report), flush=True)
        print(f"gpu_check: wrote {out_dir / 'gpu.json'} and gpu.md in {report['total_s']:.0f} s", flush=True)
        return 0 if report["ok"] else 1


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda", help="cpu implies --dry-run")
    p.add_argument("--dry-run", action="store_true", help="CPU, tiny model, 3 steps: exercise all but CUDA")
    p.add_argument("--steps", type=int, help="timed steps per variant (default 300; dry run 3)")
    p.add_argument("--warmup", type=int, help="untimed steps per variant (default 30; dry run 1)")
    p.add_argument("--batch", type=int, help="images per step (default 128, the preset's; dry run 4)")
    p.add_argument("--workers", type=int, help="trainer's loader workers (default 8; dry run 0)")
    p.add_argument(
        "--budget-s", type=float, default=420, help="seconds for all parts together (each child is cut off to fit)"
    )
    p.add_argument("--out", type=Path, help="results folder (default bench/results; dry run: inside the work dir)")
    p.add_argument("--work", help="work folder (default: a temporary one, removed at the end)")
    p.add_argument("--child", choices=("trainer", "bare"), help=argparse.SUPPRESS)
    p.add_argument("--data", help=argparse.SUPPRESS)
    args = p.parse_args()
    # The CIFAR-10 model is far too slow on a CPU: a CPU run is always the tiny dry run.
    args.dry_run = args.dry_run or args.device == "cpu"
    if args.dry_run:
        args.device = "cpu"
    small = args.dry_run
    defaults = {"steps": 3 if small else 300, "warmup": 1 if small else 30, "batch": 4 if small else 128}
    defaults["workers"] = 0 if small else 8
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.child:
        child(args)
        return
    sys.exit(parent(args))


if __name__ == "__main__":
    main()
