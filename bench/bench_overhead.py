"""Overhead of the full training stack over a bare PyTorch loop, one process, CPU, fp32.

Variants (each run in its own process, so no thread, allocator or tracker of one run disturbs another):

- ``trainer``: the real :class:`trainer.main.Trainer`: DeepSpeed engine (ZeRO-0, fp32), the webdataset
  train stream (PNG decode in the training process, ``num_workers: 0`` as in the quickstart), EMA, the
  non-finite guard, importance sampling (``loss-second-moment`` with a pre-filled history, so p_t is
  non-uniform and every step folds new losses), the hybrid loss, and MLflow tracking to a sqlite store
  in a temp dir. Each step is what ``Trainer.fit`` does per kept step: ``train_step()`` then
  ``_after_step()`` (metrics every ``train.log_every`` steps; checkpoints, grids and plots are set
  beyond the run).
- ``bare``: the same UNet (same seed), the same loss (``create_diffusion(...).training_losses``), torch
  AdamW and the same gradient clipping, on the same batches pre-decoded into memory (t uniform).
- ``bare-stream``: ``bare`` drawing each batch from the same train stream instead (decode included).

Runs are interleaved (bare, bare-stream, trainer, bare, ...) for ``--rounds`` rounds per thread count;
warm-up steps and process start-up are excluded. The ratio is trainer steps/s over bare steps/s.

    python bench/bench_overhead.py                      # 1 and 2 threads, 3 rounds
    python bench/bench_overhead.py --threads 1 --rounds 5 --steps 60
    python bench/bench_overhead.py --profile            # cProfile one trainer run (ms/step per function)

Writes ``bench/results/overhead.json`` and ``bench/results/overhead.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
CONFIG = "configs/quickstart.yaml"
VARIANTS = ("bare", "bare-stream", "trainer")
TARGET = 0.95
FAR = 10**9  # a cadence beyond any benchmark run: no checkpoint, grid or plot inside the timed window
RESULT_PREFIX = "RESULT "


def overrides(data: Path, work: Path, batch: int) -> list[str]:
    return [
        f"data.root={data}",
        f"data.batch_size={batch}",
        "train.precision=fp32",
        "train.zero_stage=0",
        "diffusion.timestep_sampler=loss-second-moment",
        "diffusion.loss=hybrid",
        f"tracking.uri=sqlite:///{work / 'mlflow.db'}",
        "tracking.experiment=bench-overhead",
        f"train.output_dir={work / 'run'}",
        f"train.total_steps={FAR}",
        f"train.ckpt_every={FAR}",
        f"train.importance_plot_every={FAR}",
        "train.sample_every=0",
    ]


# ------------------------------------------------------------------------------------------ child side


def _prefill_history(sampler: Any) -> None:
    """A full loss history, decreasing in t like a real L_vlb, so importance sampling is active from the
    first step (a fresh run needs ~T·10/B steps of uniform warm-up before it is)."""
    import numpy as np
    import torch

    n_t, n_hist = sampler.num_timesteps, sampler.history_per_term
    rng = np.random.default_rng(0)
    history = (1.0 / (1.0 + np.arange(n_t)))[:, None] * (1.0 + 0.1 * rng.random((n_t, n_hist)))
    state = sampler.state_dict()
    state.update(history=torch.from_numpy(history), writes=torch.full((n_t,), n_hist, dtype=torch.int64))
    sampler.load_state_dict(state)
    assert sampler.importance_active


def _timed(step: Any, warmup: int, steps: int) -> float:
    for _ in range(warmup):
        step()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return time.perf_counter() - start


def _profile_rows(prof: Any, steps: int, top: int) -> list[dict[str, Any]]:
    import pstats

    stats = pstats.Stats(prof)
    rows = []
    for (file, line, func), (_cc, ncalls, tottime, cumtime, _callers) in stats.stats.items():  # type: ignore[attr-defined]
        where = f"{Path(file).name}:{line}({func})" if line else func
        rows.append(
            {
                "function": where,
                "calls_per_step": ncalls / steps,
                "self_ms_per_step": 1e3 * tottime / steps,
                "cum_ms_per_step": 1e3 * cumtime / steps,
            }
        )
    rows.sort(key=lambda r: r["self_ms_per_step"], reverse=True)
    return rows[:top]


def run_trainer(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from trainer import distributed
    from trainer.config import load_config
    from trainer.main import Trainer

    work = Path(args.work)
    cfg = load_config(ROOT / CONFIG, overrides(Path(args.data), work, args.batch))
    env = distributed.init_distributed()
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    trainer = Trainer(cfg, env)
    _prefill_history(trainer.sampler)
    trainer.start_tracking(None)
    build_s = time.perf_counter() - t0
    state = trainer.state
    saved_at = -1

    def step() -> None:
        # Fit's body for a kept step; a skipped step would fail the benchmark (it must not happen).
        nonlocal saved_at
        kept, _stop = trainer.train_step()
        assert kept, "non-finite step in the benchmark"
        state.step += 1
        saved_at = trainer._after_step(saved_at)

    for _ in range(args.warmup):
        step()
    wait0 = trainer.stream.stats().get("wait_s", 0.0)
    prof = None
    if args.profile:
        import cProfile

        prof = cProfile.Profile()
        prof.enable()
    seconds = _timed(step, 0, args.steps)
    if prof is not None:
        prof.disable()
    data_wait = trainer.stream.stats().get("wait_s", 0.0) - wait0
    trainer.tracker.close(status="FINISHED")
    distributed.shutdown()
    out: dict[str, Any] = {
        "seconds": seconds,
        "build_s": build_s,
        "data_wait_ms_per_step": 1e3 * data_wait / args.steps,
        "importance_active": trainer.sampler.importance_active,
        "logged_steps": args.steps // cfg.train.log_every,
    }
    if prof is not None:
        out["profile"] = _profile_rows(prof, args.steps, args.profile_top)
    return out


def run_bare(args: argparse.Namespace, from_stream: bool) -> dict[str, Any]:
    import torch

    from trainer.config import load_config
    from trainer.data import build_train_stream, load_manifest
    from trainer.diffusion import create_diffusion
    from trainer.models.unet import build_unet

    torch.set_num_threads(args.threads)
    cfg = load_config(ROOT / CONFIG, overrides(Path(args.data), Path(args.work), args.batch))
    manifest = load_manifest(cfg.data.root)
    torch.manual_seed(cfg.train.seed)
    model = build_unet(
        cfg.model,
        image_size=manifest.image_size,
        in_channels=manifest.channels,
        learn_sigma=cfg.diffusion.var_type == "learned_range",
    ).train()
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
    d = cfg.diffusion
    diffusion = create_diffusion(
        steps=d.steps,
        schedule=d.schedule,
        mean_type=d.mean_type,
        var_type=d.var_type,
        loss=d.loss,
        vlb_weight=d.vlb_weight,
        respacing="",
    )
    stream = build_train_stream(cfg.data, manifest, rank=0, world_size=1)
    # The trainer's stream yields these same batches in this order (same data config and seed).
    batches = None if from_stream else [next(stream)[0] for _ in range(args.warmup + args.steps)]
    params = list(model.parameters())
    it = iter(range(10**9))

    def step() -> None:
        x = next(stream)[0] if batches is None else batches[next(it)]
        t = torch.randint(0, diffusion.num_timesteps, (x.shape[0],))
        loss = diffusion.training_losses(model, x, t)["loss"].mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.train.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(params, cfg.train.grad_clip)
        opt.step()

    return {"seconds": _timed(step, args.warmup, args.steps)}


def child(args: argparse.Namespace) -> None:
    if args.child == "trainer":
        out = run_trainer(args)
    else:
        out = run_bare(args, from_stream=args.child == "bare-stream")
    out["steps_per_s"] = args.steps / out["seconds"]
    print(RESULT_PREFIX + json.dumps(out), flush=True)


# ------------------------------------------------------------------------------------------ parent side


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _pytest_running() -> bool:
    """Whether a test run shares the machine (the numbers are then noisier)."""
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            cmd = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if any(b"pytest" in part for part in cmd[:3]):
            return True
    return False


def make_data(dest: Path) -> None:
    cmd = [sys.executable, "-m", "data_prep", "make", "--source", "digits", "--out", str(dest)]
    cmd += ["--image-size", "16", "--channels", "1", "--val-fraction", "0.1", "--max-per-shard", "256", "--quiet"]
    subprocess.run(cmd, cwd=ROOT, check=True)


def spawn(variant: str, threads: int, data: Path, work: Path, args: argparse.Namespace, profile: bool = False) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", variant, "--data", str(data), "--work", str(work)]
    cmd += ["--threads", str(threads), "--steps", str(args.steps), "--warmup", str(args.warmup)]
    cmd += ["--batch", str(args.batch), "--profile-top", str(args.profile_top)]
    if profile:
        cmd.append("--profile")
    # Thread count fixed before torch loads; the trainer then leaves it alone (OMP_NUM_THREADS is set).
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), PYTHONUNBUFFERED="1")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, check=False)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(RESULT_PREFIX)]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"{variant} ({threads} threads) failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1][len(RESULT_PREFIX) :])


def summarise(runs: list[dict[str, Any]], threads: int) -> dict[str, Any]:
    mine = [r for r in runs if r["threads"] == threads]
    rounds = sorted({r["round"] for r in mine})
    by = {(r["variant"], r["round"]): r for r in mine}
    out: dict[str, Any] = {"threads": threads, "rounds": []}
    for rnd in rounds:
        row: dict[str, Any] = {"round": rnd}
        for v in VARIANTS:
            if (v, rnd) in by:
                row[v] = by[(v, rnd)]["steps_per_s"]
        if "trainer" in row:
            for base in ("bare", "bare-stream"):
                if base in row:
                    row[f"ratio_vs_{base}"] = row["trainer"] / row[base]
        out["rounds"].append(row)
    for key in ("ratio_vs_bare", "ratio_vs_bare-stream"):
        vals = [r[key] for r in out["rounds"] if key in r]
        if vals:
            out[f"median_{key}"] = statistics.median(vals)
    for v in VARIANTS:
        vals = [r[v] for r in out["rounds"] if v in r]
        if vals:
            out[f"median_{v}_steps_per_s"] = statistics.median(vals)
    waits = [r["data_wait_ms_per_step"] for r in mine if r["variant"] == "trainer"]
    if waits:
        out["trainer_data_wait_ms_per_step"] = statistics.median(waits)
    return out


def markdown(report: dict[str, Any]) -> str:
    m = report["machine"]
    lines = [
        "# Training-stack overhead vs a bare PyTorch loop",
        "",
        f"{report['date']} · {m['cpu']} · {m['cpus']} CPUs · torch {m['torch']} · quickstart UNet "
        f"({report['params']:,} params), batch {report['batch']}, fp32, ZeRO-0, one process · "
        f"{report['steps']} timed steps per run after {report['warmup']} warm-up steps · load average "
        f"{report['load_before'][0]:.2f} before / {report['load_after'][0]:.2f} after (1-min)"
        + (" · a pytest run shared the machine" if report["pytest_running"] else "")
        + ".",
        "",
        "Steps/s per run (each run its own process, interleaved in this order each round). `bare`: pre-decoded "
        "batches; `bare-stream`: the same batches decoded from the train stream; `trainer`: the full stack "
        "(DeepSpeed, stream, EMA, non-finite guard, importance sampling, MLflow sqlite logging every "
        f"{report['log_every']} steps). Target ratio >= {TARGET}.",
        "",
        "| threads | round | bare | bare-stream | trainer | trainer / bare | trainer / bare-stream |",
        "|---|---|---|---|---|---|---|",
    ]

    def fmt(v: float | None, digits: int = 3) -> str:
        return "" if v is None else f"{v:.{digits}f}"

    for s in report["summary"]:
        for r in s["rounds"]:
            lines.append(
                f"| {s['threads']} | {r['round']} | {fmt(r.get('bare'))} | {fmt(r.get('bare-stream'))} "
                f"| {fmt(r.get('trainer'))} | {fmt(r.get('ratio_vs_bare'))} | {fmt(r.get('ratio_vs_bare-stream'))} |"
            )
        lines.append(
            f"| {s['threads']} | **median** | {fmt(s.get('median_bare_steps_per_s'))} "
            f"| {fmt(s.get('median_bare-stream_steps_per_s'))} | {fmt(s.get('median_trainer_steps_per_s'))} "
            f"| **{fmt(s.get('median_ratio_vs_bare'))}** | **{fmt(s.get('median_ratio_vs_bare-stream'))}** |"
        )
    lines.append("")
    for s in report["summary"]:
        if "trainer_data_wait_ms_per_step" in s:
            lines.append(
                f"- {s['threads']} thread(s): the trainer waited {s['trainer_data_wait_ms_per_step']:.1f} ms/step "
                "for its stream (PNG decode in the training process with `data.num_workers: 0`)."
            )
    if report.get("profile"):
        lines += [
            "",
            f"cProfile of one trainer run ({report['profile_threads']} thread(s); profiling inflates Python-heavy "
            "rows), top functions by self time:",
            "",
            "| function | calls/step | self ms/step | cumulative ms/step |",
            "|---|---|---|---|",
        ]
        for row in report["profile"]:
            lines.append(
                f"| `{row['function']}` | {row['calls_per_step']:.0f} | {row['self_ms_per_step']:.2f} "
                f"| {row['cum_ms_per_step']:.2f} |"
            )
    if report.get("notes"):
        lines += ["", *[f"- {n}" for n in report["notes"]]]
    return "\n".join(lines) + "\n"


def parent(args: argparse.Namespace) -> None:
    import torch

    from trainer.config import load_config
    from trainer.models.unet import build_unet, count_parameters

    busy = _pytest_running()
    if busy:
        print("note: a pytest run is active on this machine: timings will be noisy", file=sys.stderr)
    load_before = os.getloadavg()
    runs: list[dict[str, Any]] = []
    profile = None
    with tempfile.TemporaryDirectory(prefix="bench_overhead_") as tmp:
        data = Path(tmp) / "data"
        make_data(data)
        for threads in args.threads:
            for rnd in range(1, args.rounds + 1):
                for variant in args.variants:
                    work = Path(tmp) / f"{variant}-{threads}-{rnd}"
                    work.mkdir()
                    rec = spawn(variant, threads, data, work, args)
                    rec.update(variant=variant, threads=threads, round=rnd)
                    runs.append(rec)
                    print(
                        f"threads {threads} round {rnd} {variant:12s} {rec['steps_per_s']:.3f} steps/s",
                        file=sys.stderr,
                        flush=True,
                    )
        if args.profile:
            work = Path(tmp) / "profile"
            work.mkdir()
            profile = spawn("trainer", args.threads[0], data, work, args, profile=True)["profile"]
    cfg = load_config(ROOT / CONFIG, [f"data.batch_size={args.batch}"])
    params = count_parameters(build_unet(cfg.model, 16, 1, learn_sigma=True))
    report: dict[str, Any] = {
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": {"cpu": _cpu_name(), "cpus": os.cpu_count(), "torch": torch.__version__},
        "config": CONFIG,
        "params": params,
        "batch": args.batch,
        "steps": args.steps,
        "warmup": args.warmup,
        "log_every": cfg.train.log_every,
        "target": TARGET,
        "load_before": load_before,
        "load_after": os.getloadavg(),
        "pytest_running": busy or _pytest_running(),
        "summary": [summarise(runs, t) for t in args.threads],
        "runs": runs,
        "profile": profile,
        "profile_threads": args.threads[0] if profile else None,
        "notes": args.note,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    out_json = args.out / "overhead.json"
    out_json.write_text(json.dumps(report, indent=2) + "\n")
    (args.out / "overhead.md").write_text(markdown(report))
    print(markdown(report))
    print(f"wrote {out_json} and overhead.md", file=sys.stderr)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="torch/OMP threads per run")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=40, help="timed steps per run")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps per run")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    p.add_argument("--profile", action="store_true", help="also cProfile one trainer run")
    p.add_argument("--profile-top", type=int, default=20)
    p.add_argument("--note", action="append", default=[], help="a line for the report (repeatable)")
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--child", choices=VARIANTS, help=argparse.SUPPRESS)
    p.add_argument("--data", help=argparse.SUPPRESS)
    p.add_argument("--work", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        args.threads = args.threads[0]
        child(args)
    else:
        parent(args)


if __name__ == "__main__":
    main()
