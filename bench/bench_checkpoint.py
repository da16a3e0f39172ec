"""Checkpoint bytes, save time and the training time one checkpoint costs: CIFAR-10 preset, before and after.

Each case is one ``torchrun --nproc_per_node W`` launch (gloo, ``OMP_NUM_THREADS=1``) of this file in ``--child``
mode, which builds the real :class:`trainer.main.Trainer` from ``configs/cifar10_hybrid.yaml`` (the
52.5M-parameter UNet, ZeRO-2, precision ``auto``; the model is the preset's) and drives ``fit(until=...)`` and
``Saver.save()`` itself. Overrides: ``data.global_batch_size=4`` (the state's size does not depend on the batch;
a CPU step of the preset's 128 would take minutes), tracking off, no grids. The data are the built-in digits as
32x32 RGB shards (the model only sees the shape). "before" runs the same child with ``PYTHONPATH`` pointing at a
checkout of the code before this change (``--before``; commit 76fee30): synchronous saves, the EMA replicated.

Per case, on rank 0, after a barrier on every rank each time:

- ``step_s``: seconds per training step without a checkpoint (``--steps`` steps after 2 warm-up steps);
- ``stall_s``: seconds the loop spends inside ``save()`` (synchronous: the whole write; asynchronous: the copy
  of the state into host memory);
- ``save_s``: seconds from ``save()`` until the checkpoint is complete (``COMPLETE`` and ``latest`` written),
  waiting at once (after: ``Saver.settle()``);
- ``bytes``: the checkpoint directory's size, and per file kind (DeepSpeed model states, optimizer partitions,
  our per-rank states, the export);
- ``lost_s`` (with ``--lost``): one save, then ``--steps`` steps, then waiting for the save, minus the same
  steps without it: the training time one checkpoint costs (the background writer shares the CPU).
- ``ema_bytes_per_rank``: the EMA shadows one rank holds in memory.

The throttled cases write into a FUSE passthrough limited to ``--mb-per-s`` (``bench/throttle_fs.py``, run with
``--fuse-python``, a venv with fusepy; needs root and /dev/fuse).

    python bench/bench_checkpoint.py --before /tmp/before --fuse-python /tmp/fusevenv/bin/python \\
        --out bench/results/checkpoint

Writes ``<out>.json`` and ``<out>.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
CONFIG = "configs/cifar10_hybrid.yaml"
FAR = 10**9


def tree_sizes(path: Path) -> dict[str, int]:
    """Bytes under ``path`` by kind of file (what DeepSpeed and the trainer write), and the total."""
    kinds = {"model_states": 0, "optim_states": 0, "trainer": 0, "export": 0, "other": 0}
    for f in path.rglob("*"):
        if not f.is_file():
            continue
        n = f.stat().st_size
        if f.name.endswith("model_states.pt"):
            kinds["model_states"] += n
        elif f.name.endswith("optim_states.pt"):
            kinds["optim_states"] += n
        elif f.parent.name == "trainer":
            kinds["trainer"] += n
        elif f.name == "export.pt":
            kinds["export"] += n
        else:
            kinds["other"] += n
    kinds["total"] = sum(kinds.values())
    return kinds


# ------------------------------------------------------------------------------------------ child side


def child(args: argparse.Namespace) -> None:
    import torch

    import trainer.main as tm
    from trainer import distributed
    from trainer.config import load_config

    overrides = [
        f"data.root={args.data}",
        "data.global_batch_size=4",
        "data.batch_size=4",
        "tracking.enabled=false",
        f"train.output_dir={args.work}",
        f"train.total_steps={FAR}",
        f"train.log_every={FAR}",
        f"train.ckpt_every={FAR}",
        "train.sample_every=0",
        "train.keep_last=5",
    ]
    if args.mode != "before":
        overrides.append(f"train.async_checkpoint={str(args.mode == 'async').lower()}")
    # The preset of the code under test (the config schema changed with it).
    cfg = load_config(Path(tm.__file__).resolve().parents[1] / CONFIG, overrides)
    env = distributed.init_distributed()
    trainer = tm.Trainer(cfg, env)
    trainer.resume("none")
    saver, st = trainer.saver, trainer.state

    def train(n: int) -> None:
        trainer.fit(until=st.step + n)
        if trainer.step.in_flight:
            trainer._account(trainer.step.settle())

    def complete() -> None:
        if hasattr(saver, "settle"):  # after: wait for the background write; before: save() was complete
            saver.settle()

    def clock() -> float:
        distributed.barrier()
        return time.perf_counter()

    train(2)
    t0 = clock()
    train(args.steps)
    step_s = (clock() - t0) / args.steps

    t0 = clock()
    saver.save()
    stall_s = time.perf_counter() - t0
    complete()
    save_s = clock() - t0
    tag_dir = Path(args.work) / "checkpoints" / (Path(args.work) / "checkpoints" / "latest").read_text().strip()
    sizes = tree_sizes(tag_dir) if env.is_main else {}

    lost_s = lost_stall_s = None
    if args.lost:
        train(1)
        t0 = clock()
        saver.save()
        lost_stall_s = time.perf_counter() - t0
        train(args.steps)
        complete()
        lost_s = clock() - t0 - args.steps * step_s
    ema = trainer.parts.ema
    ema_bytes = sum(s.numel() * s.element_size() for shadows in ema.shadows.values() for s in shadows)
    if env.is_main:
        rec = {
            "step_s": step_s,
            "stall_s": stall_s,
            "save_s": save_s,
            "bytes": sizes,
            "lost_s": lost_s,
            "lost_stall_s": lost_stall_s,
            "ema_bytes_per_rank": ema_bytes,
            "params": trainer.parts.n_params,
            "precision": "bf16" if trainer.rt.bf16 else "fp32",
            "zero_stage": trainer.rt.zero_stage,
            "torch": torch.__version__,
        }
        Path(args.result).write_text(json.dumps(rec, indent=1))
    distributed.shutdown()


# ------------------------------------------------------------------------------------------ parent side


def make_data(where: Path) -> Path:
    data = where / "data32"
    cmd = [sys.executable, "-m", "data_prep", "make", "--source", "digits", "--out", str(data)]
    cmd += ["--image-size", "32", "--channels", "3", "--max-per-shard", "256", "--workers", "1", "--quiet"]
    subprocess.run(cmd, check=True, cwd=ROOT)
    return data


class Throttle:
    """The FUSE slowdown mounted for the cases that ask for it."""

    def __init__(self, python: str, mb_per_s: float, where: Path) -> None:
        self.backing, self.mount = where / "throttle_backing", where / "throttled"
        self.backing.mkdir()
        self.mount.mkdir()
        cmd = [python, str(ROOT / "bench" / "throttle_fs.py"), str(self.backing), str(self.mount)]
        self.proc = subprocess.Popen([*cmd, "--mb-per-s", str(mb_per_s)])
        for _ in range(100):
            if os.path.ismount(self.mount):
                return
            time.sleep(0.1)
        self.close()
        raise SystemExit(f"the throttled file system did not mount at {self.mount}")

    def close(self) -> None:
        subprocess.run(["umount", str(self.mount)], check=False)
        self.proc.wait(30)


def run_case(case: dict[str, Any], args: argparse.Namespace, data: Path, work: Path) -> dict[str, Any]:
    from trainer.distributed import free_port

    name = f"{case['code']}-{case['mode']}-w{case['world']}-{'local' if case['fs'] == 'local' else 'throttled'}"
    out_root = case["fs_root"]
    result = work / f"{name}.json"
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(case["world"]),
        "--master_port", str(free_port()), __file__, "--child", "--mode", case["mode"], "--steps", str(args.steps),
        "--data", str(data), "--work", str(out_root / name), "--result", str(result),
    ]  # fmt: skip
    if case["lost"]:
        cmd.append("--lost")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = str(args.before) if case["code"] == "before" else str(ROOT)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if proc.returncode:
        sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-8000:])
        raise SystemExit(f"{name}: torchrun exited {proc.returncode}")
    rec = json.loads(result.read_text())
    subprocess.run(["rm", "-rf", str(out_root / name)], check=False)  # disk space for the next case
    print(f"{name}: {time.perf_counter() - t0:.0f} s", flush=True)
    return {**{k: v for k, v in case.items() if k != "fs_root"}, **rec}


def cases(args: argparse.Namespace) -> list[dict[str, Any]]:
    """2 ranks first (sync vs async, then on the throttled file system), then the other world sizes."""
    out = []
    for world in sorted(args.worlds, key=lambda w: (w != 2, w)):
        for code, mode in (("before", "before"), ("after", "sync"), ("after", "async")):
            if mode == "sync" and world != 2:
                continue  # the bytes are those of async; sync vs async is measured at 2 ranks
            out.append({"code": code, "mode": mode, "world": world, "fs": "local", "lost": world == 2})
        if world == 2 and args.fuse_python:
            for code, mode in (("before", "before"), ("after", "async")):
                fs = f"throttled {args.mb_per_s:g} MB/s"
                out.append({"code": code, "mode": mode, "world": 2, "fs": fs, "lost": True})
    return out


def _mb(n: int | None) -> str:
    return "-" if n is None else f"{n / 1e6:,.0f}"


def _s(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}"


def write_md(path: Path, meta: dict[str, Any], rows: list[dict[str, Any]]) -> None:
    lines = [
        "# Checkpoint bytes, save time and step time lost per checkpoint (CIFAR-10 preset)",
        "",
        f"{meta['date']}, {meta['cpu']} ({meta['cpus']} cores, shared), torch {meta['torch']}, gloo, "
        f"OMP_NUM_THREADS=1; {rows[0]['params']:,} parameters, ZeRO-{rows[0]['zero_stage']}, {rows[0]['precision']}, "
        f"global batch 4, {meta['steps']} timed steps. Command: `{meta['command']}`.",
        "",
        "| code | save | ranks | file system | checkpoint MB | model states | optimizer | trainer/ | export | "
        "EMA MB per rank | step s | stall s, 1st save | save s (until complete) | stall s, 2nd save | "
        "lost s per checkpoint |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        b = r["bytes"]
        lines.append(
            f"| {r['code']} | {'sync' if r['mode'] == 'before' else r['mode']} | {r['world']} | {r['fs']} | "
            f"{_mb(b['total'])} | {_mb(b['model_states'])} | {_mb(b['optim_states'])} | {_mb(b['trainer'])} | "
            f"{_mb(b['export'])} | {_mb(r['ema_bytes_per_rank'])} | {_s(r['step_s'])} | {_s(r['stall_s'])} | "
            f"{_s(r['save_s'])} | {_s(r['lost_stall_s'])} | {_s(r['lost_s'])} |"
        )
    lines += [
        "",
        "stall: time inside `save()` (synchronous: the whole write; asynchronous: the host copy, plus what both "
        "pay: the finiteness check, the replica digest, the export's gathers); the 1st save also allocates the "
        "host buffers the 2nd reuses. save: until `COMPLETE` and `latest`, waiting at once. lost: a save followed "
        "by the timed steps and the wait for the save, minus the same steps without a save (the background writer "
        "shares the 2 cores with the ranks; step times vary by ~10 % on this shared machine, so read it as "
        "+-1 step).",
        "",
    ]
    path.write_text("\n".join(lines))


def parent(args: argparse.Namespace) -> None:
    sys.path.insert(0, str(ROOT / "bench"))
    from benchlib import machine

    with tempfile.TemporaryDirectory(prefix="bench_ckpt_", dir=args.tmp) as tmp:
        work = Path(tmp)
        data = make_data(work)
        rows: list[dict[str, Any]] = []
        throttle: Throttle | None = None
        meta = {
            **machine(),
            "date": datetime.now(timezone.utc).strftime("%Y-%m-%d"),
            "steps": args.steps,
            "command": "python " + " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]),
        }
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        try:
            for case in cases(args):
                if case["fs"] != "local" and throttle is None:
                    throttle = Throttle(args.fuse_python, args.mb_per_s, work)
                case["fs_root"] = throttle.mount if throttle and case["fs"] != "local" else work
                rows.append(run_case(case, args, data, work))
                # After every case: a failure later keeps what was measured.
                out.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
                write_md(out.with_suffix(".md"), meta, rows)
        finally:
            if throttle is not None:
                throttle.close()
    print(out.with_suffix(".md").read_text())


def rewrite_md(out: Path) -> None:
    """The table again from ``<out>.json`` (after a change of the table's layout)."""
    data = json.loads(out.with_suffix(".json").read_text())
    write_md(out.with_suffix(".md"), data["meta"], data["rows"])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--mode", choices=["before", "sync", "async"], help=argparse.SUPPRESS)
    p.add_argument("--data", help=argparse.SUPPRESS)
    p.add_argument("--work", help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    p.add_argument("--lost", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--steps", type=int, default=3, help="timed steps per measurement (default %(default)s)")
    p.add_argument("--worlds", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--before", type=Path, default=Path("/tmp/before"), help="checkout of the code before")
    p.add_argument("--fuse-python", default=None, help="a python with fusepy: adds the throttled cases")
    p.add_argument("--mb-per-s", type=float, default=100.0, help="bandwidth of the throttled file system")
    p.add_argument("--tmp", default=None, help="where the runs write (default: the system's temporary dir)")
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "checkpoint"))
    p.add_argument("--rewrite-md", action="store_true", help="only rebuild <out>.md from <out>.json")
    args = p.parse_args()
    if args.rewrite_md:
        rewrite_md(Path(args.out))
    elif args.child:
        child(args)
    else:
        parent(args)


if __name__ == "__main__":
    main()
