"""Cost of the timestep sampler's once-per-step loss-history exchange against a training step.

Two gloo ranks (one CPU thread each) train the quickstart UNet (the model section, per-rank batch and
T of configs/quickstart.yaml, at 16x16x1) with DDP + AdamW, drawing t from a
warmed-up loss-second-moment sampler. Per step we time the whole step (sample, forward, backward
with gradient all-reduce, optimizer step, record, sync) and, inside it, ``sampler.sync()`` (the
all-gather of every rank's (t, loss) pairs plus the history update) and the sampler's other work
(``sample`` and ``record``). A barrier before the sync keeps the wait for the slower rank (load
imbalance, which the next collective would absorb anyway) out of the exchange's time; it is reported
apart and counted in the step. A step's time is the slowest rank's. The loss is a timing proxy with
the shape of the hybrid loss (an ε MSE on the first output channel plus a per-sample term from the
variance channel, weighted by 1/(T p_t)): the real diffusion loss adds only element-wise work.

A second part times the exchange alone for larger per-rank payloads, to show how it scales.

    python bench/bench_timestep_exchange.py            # writes bench/results/timestep_exchange.{json,md}
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from trainer.config import load_config
from trainer.distributed import free_port
from trainer.models.unet import build_unet
from trainer.timesteps import create_timestep_sampler

_QUICKSTART = load_config(Path(__file__).resolve().parents[1] / "configs" / "quickstart.yaml")
QUICKSTART_MODEL = _QUICKSTART.model
QUICKSTART_BATCH = _QUICKSTART.data.batch_size
IMAGE_SIZE, IN_CHANNELS, NUM_TIMESTEPS = 16, 1, _QUICKSTART.diffusion.steps
LIMIT = 0.01  # the exchange must stay under 1% of a step


def _warm_history(sampler, rank: int) -> None:
    """Give every t a full history (rank 0 records it, the exchange spreads it) so p_t is non-uniform."""
    if rank == 0:
        t = torch.arange(NUM_TIMESTEPS).repeat(sampler.history_per_term)
        sampler.record(t, 0.02 + torch.exp(-t.double() / 50.0))
    sampler.sync()
    assert sampler.importance_active


def _train_part(rank: int, args: argparse.Namespace) -> dict[str, list[float]]:
    torch.manual_seed(args.seed)  # identical initial weights on every rank
    model = build_unet(QUICKSTART_MODEL, IMAGE_SIZE, IN_CHANNELS, learn_sigma=True)
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    opt = torch.optim.AdamW(ddp.parameters(), lr=1e-4)
    sampler = create_timestep_sampler("loss-second-moment", NUM_TIMESTEPS, device="cpu")
    _warm_history(sampler, rank)
    gen = torch.Generator().manual_seed(args.seed + 1 + rank)
    times: dict[str, list[float]] = {"step": [], "sync": [], "align": [], "sample_record": []}
    for i in range(args.warmup + args.steps):
        dist.barrier()
        start = time.perf_counter()
        t, w = sampler.sample(args.batch, generator=gen)
        after_sample = time.perf_counter()
        x0 = torch.rand(args.batch, IN_CHANNELS, IMAGE_SIZE, IMAGE_SIZE, generator=gen) * 2 - 1
        noise = torch.randn(x0.shape, generator=gen)
        out = ddp(0.7 * x0 + 0.7 * noise, t)
        mse = (out[:, :IN_CHANNELS] - noise).pow(2).mean(dim=(1, 2, 3))
        vb = out[:, IN_CHANNELS:].float().pow(2).mean(dim=(1, 2, 3))
        loss = (w * (mse + 1e-3 * NUM_TIMESTEPS * vb)).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        before_record = time.perf_counter()
        sampler.record(t, vb.detach())
        before_align = time.perf_counter()
        # Ranks leave the optimizer step at different times (load imbalance; on a shared 2-core box,
        # tens of ms). Whatever collective comes next absorbs that wait, so it is timed apart.
        dist.barrier()
        before_sync = time.perf_counter()
        sampler.sync()
        end = time.perf_counter()
        if i >= args.warmup:
            times["step"].append(end - start)
            times["sync"].append(end - before_sync)
            times["align"].append(before_sync - before_align)
            times["sample_record"].append((after_sample - start) + (before_align - before_record))
    return times


def _exchange_part(rank: int, args: argparse.Namespace) -> dict[str, list[float]]:
    """The exchange alone, for several per-rank payloads (rank 1 sends half as many: uneven sizes)."""
    out: dict[str, list[float]] = {}
    for per_rank in args.payloads:
        sampler = create_timestep_sampler("loss-second-moment", NUM_TIMESTEPS, device="cpu")
        _warm_history(sampler, rank)
        gen = torch.Generator().manual_seed(rank)
        n = per_rank if rank == 0 else per_rank // 2
        samples = []
        for i in range(args.warmup + args.reps):
            t = torch.randint(0, NUM_TIMESTEPS, (n,), generator=gen)
            sampler.record(t, torch.rand(n, generator=gen))
            dist.barrier()
            start = time.perf_counter()
            sampler.sync()
            if i >= args.warmup:
                samples.append(time.perf_counter() - start)
        out[str(per_rank)] = samples
    return out


def _worker(rank: int, world: int, port: int, args: argparse.Namespace, tmp: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world,
        timeout=datetime.timedelta(seconds=600),
    )
    try:
        result = {"train": _train_part(rank, args), "exchange": _exchange_part(rank, args)}
        Path(tmp, f"rank{rank}.json").write_text(json.dumps(result))
    finally:
        dist.destroy_process_group()


def _slowest(per_rank: list[list[float]]) -> list[float]:
    return [max(vals) for vals in zip(*per_rank, strict=True)]


def _summary(values: list[float]) -> dict[str, float]:
    ordered = sorted(values)
    return {
        "median_ms": 1e3 * statistics.median(ordered),
        "mean_ms": 1e3 * statistics.fmean(ordered),
        "p90_ms": 1e3 * ordered[min(len(ordered) - 1, int(0.9 * len(ordered)))],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--world", type=int, default=2)
    parser.add_argument("--batch", type=int, default=QUICKSTART_BATCH, help="per-rank batch")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--reps", type=int, default=50, help="repetitions per exchange-only payload")
    parser.add_argument("--payloads", type=int, nargs="+", default=[64, 512, 4096])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "timestep_exchange")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp:
        mp.start_processes(_worker, args=(args.world, free_port(), args, tmp), nprocs=args.world, join=True)
        ranks = [json.loads(Path(tmp, f"rank{r}.json").read_text()) for r in range(args.world)]

    step = _summary(_slowest([r["train"]["step"] for r in ranks]))
    sync = _summary(_slowest([r["train"]["sync"] for r in ranks]))
    other = _summary(_slowest([r["train"]["sample_record"] for r in ranks]))
    align = _summary(_slowest([r["train"]["align"] for r in ranks]))
    ratio = sync["median_ms"] / step["median_ms"]
    ratio_mean = sync["mean_ms"] / step["mean_ms"]
    exchange_only = {
        payload: _summary(_slowest([r["exchange"][payload] for r in ranks])) for payload in ranks[0]["exchange"]
    }
    result = {
        "what": "timestep-sampler history exchange (sync) vs. a full training step, slowest rank per step",
        "setup": {
            "world_size": args.world,
            "backend": "gloo (CPU), 1 thread per rank, DDP + AdamW",
            "model": QUICKSTART_MODEL.model_dump(),
            "image": [IN_CHANNELS, IMAGE_SIZE, IMAGE_SIZE],
            "batch_per_rank": args.batch,
            "num_timesteps": NUM_TIMESTEPS,
            "history_per_term": 10,
            "steps_timed": args.steps,
            "warmup_steps": args.warmup,
        },
        "env": {
            "torch": torch.__version__,
            "python": platform.python_version(),
            "cpu_count": os.cpu_count(),
            "machine": platform.machine(),
            "date": datetime.date.today().isoformat(),
        },
        "step": step,
        "sync": sync,
        "sample_and_record": other,
        "barrier_before_sync": align,
        "sync_over_step_median": ratio,
        "sync_over_step_mean": ratio_mean,
        "limit": LIMIT,
        "passes": ratio < LIMIT and ratio_mean < LIMIT,
        "exchange_only_by_pairs_per_rank0": exchange_only,
        "exchange_only_note": "rank 0 sends the listed number of pairs, rank 1 half as many",
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    args.out.with_suffix(".md").write_text(_markdown(result))
    print(_markdown(result))
    return 0 if result["passes"] else 1


def _markdown(r: dict) -> str:
    s = r["setup"]
    lines = [
        "# Timestep-sampler history exchange vs. training step",
        "",
        f"{s['world_size']} ranks, {s['backend']}; quickstart UNet "
        f"(channels {s['model']['channels']}, mult {s['model']['channel_mult']}, "
        f"{s['model']['num_res_blocks']} res block, attention at {s['model']['attention_resolutions']}), "
        f"{s['image'][1]}x{s['image'][2]}x{s['image'][0]}, batch {s['batch_per_rank']}/rank, "
        f"T={s['num_timesteps']}; {s['steps_timed']} timed steps; torch {r['env']['torch']}, "
        f"{r['env']['cpu_count']} CPUs, {r['env']['date']}. Times are the slowest rank's.",
        "",
        "| part | median ms | mean ms | p90 ms |",
        "|---|---:|---:|---:|",
    ]
    for name, key in (
        ("training step (all of it)", "step"),
        ("sync: all-gather + history update", "sync"),
        ("sample + record (local)", "sample_and_record"),
        ("barrier before sync (rank skew)", "barrier_before_sync"),
    ):
        v = r[key]
        lines.append(f"| {name} | {v['median_ms']:.3f} | {v['mean_ms']:.3f} | {v['p90_ms']:.3f} |")
    lines += [
        "",
        f"sync / step: **{100 * r['sync_over_step_median']:.3f}%** (median), "
        f"{100 * r['sync_over_step_mean']:.3f}% (mean); limit {100 * r['limit']:.0f}% → "
        f"{'PASS' if r['passes'] else 'FAIL'}",
        "",
        "The barrier row is the wait for the slower rank to finish its optimizer step; without the",
        "barrier the sync (or the next step's gradient all-reduce) would absorb it, so it is load",
        "imbalance, not exchange cost. It is included in the step time.",
        "",
        "Exchange alone (rank 0 sends N pairs, rank 1 N/2):",
        "",
        "| pairs (rank 0) | median ms | mean ms | p90 ms |",
        "|---:|---:|---:|---:|",
    ]
    for payload, v in r["exchange_only_by_pairs_per_rank0"].items():
        lines.append(f"| {payload} | {v['median_ms']:.3f} | {v['mean_ms']:.3f} | {v['p90_ms']:.3f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
