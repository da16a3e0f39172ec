"""Peak host memory per rank of ZeRO stages 0-3, 2 ranks, CIFAR-10 preset, measured over training steps only.

Each (variant, stage) is one ``torchrun --nproc_per_node 2`` launch (gloo, ``OMP_NUM_THREADS=1``) of this
file in ``--child`` mode, which builds the real :class:`trainer.main.Trainer` from
``configs/cifar10_hybrid.yaml`` (the CIFAR-10 preset: the 52.5M-parameter UNet at 32x32x3) and drives
its step (``TrainStep.run`` + ``settle``) itself: no ``fit()``, so no checkpoint, export or sample grid
(those gather full weights). The data are the built-in digits written as 32x32 RGB shards into a temporary
directory (the model only sees the image shape). Overrides: fp32, ``data.global_batch_size=4`` (2 per rank, no
accumulation), tracking off.

Per rank, a background thread reads the current RSS (``/proc/self/statm``) every ~2 ms and keeps the peak
per phase. Phases are switched by wrappers around the trainer's pieces (``build_engine``, the model call,
``engine.backward``, ``engine.allreduce_gradients``, ``engine.step``); nothing in the trainer changes:

- ``baseline``: after imports and process-group set-up, before the UNet and the engine are built;
- ``before_engine``: after the UNet is built (fp32 weights, 4P bytes), before ``deepspeed.initialize``;
- ``engine_built``: after ``deepspeed.initialize``;
- ``after_step1``: after the first optimizer step (AdamW moments are allocated lazily there);
- ``peak_steps``: the highest RSS during the steps and its phase: ``fwd``, ``loss``, ``bwd`` (activations
  alive), ``reduce`` (stage 0/1 gradient all-reduce at the end of backward), ``opt`` (``engine.step``),
  ``post`` (between backward and step, and after the step: agreement, EMA update, bookkeeping);
- ``activations``: bytes autograd saved for backward in one forward (``saved_tensors_hooks``, unique
  storages, parameters excluded), the largest over the steps;
- ``model_state`` = max(peak in fwd/loss/bwd − activations, peak in reduce/opt/post) − baseline, on the
  anonymous RSS (resident − file-backed pages; torch's library code paged in during the first steps is
  reported apart as ``file_pages_growth``): the activations are subtracted only where they are alive
  (stage 0 peaks in its all-reduce, ZeRO 1-3 in the optimizer step, both after backward freed them);
  its ratio to stage 0's.

To tell the allocator from the tensors, each rank also takes a census of live tensors (unique storages
reachable from Python, by role) and glibc's ``mallinfo2`` at the end of the first and last step.

Variants (``--variants``): ``scaled``: the trainer as it is (ZeRO buffer sizes scaled to the model by
trainer/engine.py); ``ds-defaults``: DeepSpeed's default sizes passed explicitly (``train.deepspeed``),
i.e. the DeepSpeed config before the trainer scaled them; ``*-mmap``: the same with
``MALLOC_MMAP_THRESHOLD_=131072`` (glibc then serves every block >= 128 KiB with its own mmap and returns
it on free, so the RSS follows the live tensors instead of what glibc keeps). Not run by default:
``scaled-subgroups`` (ZeRO-3's optimizer steps over sub-groups of 1/16 of the model, so its
flat-partition temporaries shrink; changes the layout of ZeRO-3 checkpoints).

    python bench/bench_zero_memory.py --out bench/results/zero_memory        # 4 variants x stages 0-3
    python bench/bench_zero_memory.py --variants scaled --stages 0 3 --steps 3 --out /tmp/zm

Writes ``<out>.json`` and ``<out>.md``.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
CONFIG = "configs/cifar10_hybrid.yaml"
FAR = 10**9
GB = 1e9
# DeepSpeed 0.19's defaults (deepspeed/runtime/zero/config.py), for the ds-defaults variant.
DS_DEFAULTS = {
    "reduce_bucket_size": 500_000_000,
    "allgather_bucket_size": 500_000_000,
    "stage3_prefetch_bucket_size": 50_000_000,
    "stage3_max_live_parameters": 1_000_000_000,
    "stage3_max_reuse_distance": 1_000_000_000,
}
VARIANTS = {
    "scaled": {"what": "ZeRO sizes scaled to the model (the trainer)", "zero": None, "env": {}},
    "scaled-mmap": {
        "what": "ZeRO sizes scaled to the model (the trainer)",
        "zero": None,
        "env": {"MALLOC_MMAP_THRESHOLD_": "131072"},
    },
    "ds-defaults": {"what": "DeepSpeed's default ZeRO sizes (before the fix)", "zero": DS_DEFAULTS, "env": {}},
    "ds-defaults-mmap": {
        "what": "DeepSpeed's default ZeRO sizes (before the fix)",
        "zero": DS_DEFAULTS,
        "env": {"MALLOC_MMAP_THRESHOLD_": "131072"},
    },
    "scaled-subgroups": {  # not run by default: sub_group_size changes ZeRO-3's checkpoint layout
        "what": "ZeRO sizes scaled to the model, ZeRO-3 optimizer steps in sub-groups of 1/16 of the model",
        "zero": {"sub_group_size": 3_284_992},
        "env": {},
    },
}
DEFAULT_VARIANTS = ("ds-defaults", "scaled", "ds-defaults-mmap", "scaled-mmap")
ZERO_KEYS = (
    "reduce_bucket_size",
    "allgather_bucket_size",
    "overlap_comm",
    "contiguous_gradients",
    "prefetch_bucket_size",
    "param_persistence_threshold",
    "max_live_parameters",
    "max_reuse_distance",
)
ACTIVE = ("fwd", "loss", "bwd")  # phases with the forward's saved tensors alive


# ------------------------------------------------------------------------------------------ measuring


_PAGE = os.sysconf("SC_PAGE_SIZE")


def rss_bytes() -> tuple[int, int]:
    """(resident, anonymous resident) bytes: statm's resident minus its file-backed ``shared`` pages (the
    code of torch's libraries, paged in as kernels are first used) leaves the heap and mmapped memory."""
    with open("/proc/self/statm", "rb") as f:
        fields = f.read().split()
    resident, shared = int(fields[1]) * _PAGE, int(fields[2]) * _PAGE
    return resident, resident - shared


class _MallInfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in (
            "arena",
            "ordblks",
            "smblks",
            "hblks",
            "hblkhd",
            "usmblks",
            "fsmblks",
            "uordblks",
            "fordblks",
            "keepcost",
        )
    ]


def malloc_stats() -> dict[str, int] | None:
    """glibc's view: bytes handed out (heap + mmapped blocks) and bytes freed but kept in its heaps."""
    try:
        fn = ctypes.CDLL("libc.so.6").mallinfo2
    except (OSError, AttributeError):
        return None
    fn.restype = _MallInfo2
    info = fn()
    return {"in_use": info.uordblks + info.hblkhd, "mmapped": info.hblkhd, "free_in_heap": info.fordblks}


class RssMonitor(threading.Thread):
    """Samples the current RSS every ``interval`` s and keeps the peak of each phase (total and anonymous)."""

    def __init__(self, interval: float = 0.002) -> None:
        super().__init__(daemon=True)
        self.interval = interval
        self.phase = "start"
        self.peaks: dict[str, int] = {}
        self.anon_peaks: dict[str, int] = {}
        self._halt = threading.Event()

    def _note(self) -> tuple[int, int]:
        phase = self.phase
        rss, anon = rss_bytes()
        if rss > self.peaks.get(phase, 0):
            self.peaks[phase] = rss
        if anon > self.anon_peaks.get(phase, 0):
            self.anon_peaks[phase] = anon
        return rss, anon

    def mark(self, phase: str) -> tuple[int, int]:
        """Close the current phase (one last sample) and start ``phase``; returns (RSS, anonymous RSS) now."""
        self._note()
        self.phase = phase
        return self._note()

    def run(self) -> None:
        while not self._halt.wait(self.interval):
            self._note()

    def stop(self) -> None:
        self._halt.set()
        self.join()


def _storage_key(t: Any) -> tuple[int, int] | None:
    try:
        s = t.untyped_storage()
    except (RuntimeError, NotImplementedError, AttributeError):
        return None
    if s.device.type == "meta" or s.nbytes() == 0:
        return None
    return s.data_ptr(), s.nbytes()


def _tensors(value: Any) -> list[Any]:
    """Tensors in an attribute value: a tensor, (nested) lists/dicts of them, or bucket objects."""
    import torch

    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (list, tuple)):
        return [t for v in value for t in _tensors(v)]
    if isinstance(value, dict):
        return [t for v in value.values() for t in _tensors(v)]
    if hasattr(value, "buffer"):  # DeepSpeed's IPGBucket / IPGBucketZ3
        return _tensors(value.buffer)
    return []


def tensor_census(trainer: Any) -> dict[str, Any]:
    """Live tensor bytes by role (unique storages reachable from Python; allocated size, touched or not)."""
    import torch

    engine = trainer.parts.engine
    zero = engine.optimizer
    seen: dict[int, int] = {}
    out: dict[str, Any] = {}

    def add(role: str, tensors: Any) -> None:
        for t in tensors:
            key = _storage_key(t) if t is not None else None
            if key is None or key[0] in seen:
                continue
            seen[key[0]] = key[1]
            out[role] = out.get(role, 0) + key[1]

    def attrs(*names: str) -> list[Any]:
        return [t for n in names for t in _tensors(getattr(zero, n, None))]

    params = list(engine.module.parameters())
    add("params", [getattr(p, "ds_tensor", None) for p in params] + [p.data for p in params])
    add("grads", [p.grad for p in params] + attrs("grad_partitions_flat_buffer", "averaged_gradients"))
    add("fp32 master (ZeRO)", attrs("single_partition_of_fp32_groups", "fp32_partitioned_groups_flat"))
    add("reduce bucket (ZeRO)", attrs("ipg_buckets"))
    opt = getattr(engine, "basic_optimizer", None) or zero
    add("adam m, v", [v for st in opt.state.values() for v in st.values() if isinstance(v, torch.Tensor)])
    add("ema", [s for shadows in trainer.parts.ema.shadows.values() for s in shadows])
    add("other", [o for o in gc.get_objects() if isinstance(o, torch.Tensor)])
    out["total"] = sum(seen.values())
    return out


# ------------------------------------------------------------------------------------------ child side


def overrides(data: Path, work: Path, stage: int, steps: int, zero: dict[str, Any] | None) -> list[str]:
    out = [
        f"data.root={data}",
        "data.global_batch_size=4",
        "data.batch_size=2",
        "train.precision=fp32",
        f"train.zero_stage={stage}",
        "tracking.enabled=false",
        f"train.output_dir={work / f'run_zero{stage}'}",
        f"train.total_steps={steps}",
        f"train.log_every={FAR}",
        f"train.ckpt_every={FAR}",
        "train.sample_every=0",
    ]
    if zero:
        out.append("train.deepspeed=" + json.dumps({"zero_optimization": zero}))
    return out


def child(args: argparse.Namespace) -> None:
    import dataclasses

    import torch

    import trainer.main as tm
    from trainer import distributed
    from trainer.builders import Builders
    from trainer.config import load_config
    from trainer.engine import build_engine as real_build

    mon = RssMonitor()
    mon.start()
    cfg = load_config(
        ROOT / CONFIG, overrides(Path(args.data), Path(args.work), args.stage, args.steps, json.loads(args.zero))
    )
    env = distributed.init_distributed()
    gc.collect()
    rec: dict[str, Any] = {"rank": env.rank, "stage": args.stage}
    rec["baseline"], rec["baseline_anon"] = mon.mark("build_model")
    rec["malloc_baseline"] = malloc_stats()

    def build_engine(*a: Any, **k: Any) -> Any:
        rec["before_engine"], _ = mon.mark("build_engine")
        rec["malloc_before_engine"] = malloc_stats()
        engine = real_build(*a, **k)
        rec["engine_built"], _ = mon.mark("build_rest")
        rec["malloc_engine_built"] = malloc_stats()
        return engine

    trainer = tm.Trainer(cfg, env, dataclasses.replace(Builders(), engine=build_engine))
    rec["trainer_built"], _ = mon.mark("idle")
    rec["malloc_trainer_built"] = malloc_stats()
    rec["params"] = trainer.parts.n_params
    rec["ema_rates"] = list(trainer.parts.ema.rates)
    rec["grad_clip"] = trainer.cfg.train.grad_clip
    zc = trainer.parts.engine._config.zero_config  # the effective values, DeepSpeed's defaults included
    rec["ds_zero_config"] = {k: getattr(zc, k) for k in ZERO_KEYS}

    # Phase switches around the trainer's pieces; a saved-tensor hook counts the activations.
    engine, step_no = trainer.parts.engine, [0]
    acts: list[int] = []
    real_call, real_backward, real_step = trainer.step.call, engine.backward, engine.step
    real_allreduce = engine.allreduce_gradients

    def call(*a: Any, **k: Any) -> Any:
        params = {key[0] for p in engine.module.parameters() if (key := _storage_key(p.data))}
        saved: dict[int, int] = {}

        def pack(t: torch.Tensor) -> torch.Tensor:
            key = _storage_key(t)
            if key and key[0] not in params and not isinstance(t, torch.nn.Parameter):
                saved[key[0]] = key[1]
            return t

        mon.mark(f"s{step_no[0]}:fwd")
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = real_call(*a, **k)
        acts.append(sum(saved.values()))
        mon.mark(f"s{step_no[0]}:loss")
        return out

    def phase(name: str, fn: Any, after: str | None = None) -> Any:
        def wrapped(*a: Any, **k: Any) -> Any:
            back = mon.phase
            mon.mark(f"s{step_no[0]}:{name}")
            out = fn(*a, **k)
            mon.mark(f"s{step_no[0]}:{after}" if after else back)
            return out

        return wrapped

    trainer.step.call = call
    engine.backward = phase("bwd", real_backward, after="post")
    engine.allreduce_gradients = phase("reduce", real_allreduce)
    engine.step = phase("opt", real_step, after="post")
    step_rss, times = [], []
    for i in range(1, args.steps + 1):
        step_no[0] = i
        t0 = time.perf_counter()
        trainer.step.run([next(trainer.stream) for _ in range(trainer.rt.batch.grad_accum)])
        outcome = trainer.step.settle()  # each step's verdict read at once: steps are measured one by one
        times.append(time.perf_counter() - t0)
        assert outcome.kept, f"step {i} was skipped"
        step_rss.append(mon.mark("idle"))
        if i in (1, args.steps):
            rec[f"census_step{i}"] = tensor_census(trainer)
            rec[f"malloc_step{i}"] = malloc_stats()
    mon.stop()
    rec["after_step1"] = step_rss[0][0]
    rec["after_steps"] = [r for r, _ in step_rss]
    rec["step_seconds"] = times
    rec["phase_peaks"], rec["phase_peaks_anon"] = mon.peaks, mon.anon_peaks
    rec["activations"] = max(acts)
    steps = {k: v for k, v in mon.peaks.items() if ":" in k}
    top = max(steps, key=steps.__getitem__)
    rec["peak_steps"], rec["peak_phase"] = steps[top], top.split(":")[1]
    anon = {k: v for k, v in mon.anon_peaks.items() if ":" in k}
    active = max(v for k, v in anon.items() if k.split(":")[1] in ACTIVE)
    rest = max(v for k, v in anon.items() if k.split(":")[1] not in ACTIVE)
    rec["peak_active_anon"], rec["peak_rest_anon"] = active, rest
    rec["model_state"] = max(active - rec["activations"], rest) - rec["baseline_anon"]
    rec["model_state_phase"] = (
        "fwd/bwd"
        if active - rec["activations"] > rest
        else max((k for k in anon if k.split(":")[1] not in ACTIVE), key=anon.__getitem__).split(":")[1]
    )
    # Library code paged in since the baseline (file-backed, shared): in the RSS, not in the model state.
    rec["file_pages_growth"] = (step_rss[-1][0] - rec["baseline"]) - (step_rss[-1][1] - rec["baseline_anon"])
    Path(args.result).with_suffix(f".rank{env.rank}.json").write_text(json.dumps(rec))
    distributed.barrier()
    distributed.shutdown()


# ------------------------------------------------------------------------------------------ parent side


def make_data(where: Path) -> Path:
    data = where / "data32"
    cmd = [sys.executable, "-m", "data_prep", "make", "--source", "digits", "--out", str(data)]
    cmd += ["--image-size", "32", "--channels", "3", "--max-per-shard", "256", "--workers", "1", "--quiet"]
    subprocess.run(cmd, check=True, cwd=ROOT)
    return data


def run_stage(variant: str, stage: int, args: argparse.Namespace, data: Path, work: Path) -> list[dict[str, Any]]:
    from trainer.distributed import free_port

    spec = VARIANTS[variant]
    result = work / f"{variant}_zero{stage}"
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
        __file__, "--child", "--stage", str(stage), "--steps", str(args.steps),
        "--data", str(data), "--work", str(work), "--result", str(result),
    ]  # fmt: skip
    cmd += ["--zero", json.dumps(spec["zero"])]
    env = dict(os.environ, OMP_NUM_THREADS="1", **spec["env"])
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if proc.returncode:
        sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-8000:])
        raise SystemExit(f"{variant}, stage {stage}: torchrun exited {proc.returncode}")
    print(f"{variant}, stage {stage}: {time.perf_counter() - t0:.0f} s", flush=True)
    return [json.loads(result.with_suffix(f".rank{r}.json").read_text()) for r in range(2)]


def expected(stage: int, n: int, world: int, ema: int) -> dict[str, float]:
    """Steady model-state bytes per rank by first principles, fp32, torch AdamW.

    Full fp32 copies are 4P bytes, a 1/W partition 4P/W. ZeRO 1/2 keep an fp32 master partition apart
    from the module's flat weights by design; ZeRO-3 would share it with its weight partition when both
    are fp32 on the same device, but compares ``tensor.device`` with a device *string* (always unequal,
    DeepSpeed 0.19 stage3.py ``_create_fp32_partitions``), so it copies too. Transients (the gradients
    of stage 0-1 between backward and step, reduce buckets, optimizer temporaries) are not included."""
    full, part = 4 * n, 4 * n / world
    parts = {
        0: {"params": full, "grads": 0, "master": 0, "adam": 2 * full, "ema": ema * full},
        1: {"params": full, "grads": 0, "master": part, "adam": 2 * part, "ema": ema * full},
        2: {"params": full, "grads": 0, "master": part, "adam": 2 * part, "ema": ema * full},
        3: {"params": part, "grads": part, "master": part, "adam": 2 * part, "ema": ema * part},
    }[stage]
    parts["total"] = sum(parts.values())
    return parts


def summarize(per_stage: dict[int, list[dict[str, Any]]]) -> list[dict[str, Any]]:
    rows = []
    for stage, ranks in sorted(per_stage.items()):
        big = max(ranks, key=lambda r: r["model_state"])
        last = f"census_step{len(big['after_steps'])}"
        rows.append(
            {
                "stage": stage,
                "rank": big["rank"],
                **{k: big[k] for k in ("baseline", "before_engine", "engine_built", "trainer_built", "after_step1")},
                **{k: big[k] for k in ("peak_steps", "peak_phase", "activations", "file_pages_growth")},
                "model_state": big["model_state"],
                "model_state_phase": big["model_state_phase"],
                "expected_steady": expected(stage, big["params"], 2, len(big["ema_rates"]))["total"],
                "live_tensors": big[last]["total"],
                "census": big[last],
                "malloc": big[last.replace("census", "malloc")],
                "ds_zero_config": big["ds_zero_config"],
                "ranks": ranks,
            }
        )
    base = next((r["model_state"] for r in rows if r["stage"] == 0), None)
    for r in rows:
        r["ratio_to_stage0"] = r["model_state"] / base if base else None
    return rows


def _g(x: float) -> str:
    return f"{x / GB:.2f}"


def md_table(variant: str, rows: list[dict[str, Any]]) -> list[str]:
    spec = VARIANTS[variant]
    how = spec["what"]
    env = " ".join(f"{k}={v}" for k, v in spec["env"].items()) or "default glibc malloc"
    lines = [
        f"### `{variant}`: {how}, {env}",
        "",
        "| stage | baseline | after engine build | after 1st step | peak over steps (phase) | activations"
        " | code pages | model state (phase) | steady expected | live tensors | malloc free kept | ratio to stage 0 |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        ratio = f"{r['ratio_to_stage0']:.2f}" if r["ratio_to_stage0"] is not None else "-"
        kept = _g(r["malloc"]["free_in_heap"]) if r["malloc"] else "-"
        lines.append(
            f"| {r['stage']} | {_g(r['baseline'])} | {_g(r['engine_built'])} | {_g(r['after_step1'])} |"
            f" {_g(r['peak_steps'])} ({r['peak_phase']}) | {_g(r['activations'])} | {_g(r['file_pages_growth'])} |"
            f" {_g(r['model_state'])} ({r['model_state_phase']}) |"
            f" {_g(r['expected_steady'])} | {_g(r['live_tensors'])} | {kept} | **{ratio}** |"
        )
    roles = [k for k in ROLE_ORDER if any(k in r["census"] for r in rows)]
    lines += ["", "Live tensors at the end of the last step by role (GB; allocated size, touched or not):", ""]
    lines.append("| stage | " + " | ".join(roles) + " | total |")
    lines.append("|---" * (len(roles) + 2) + "|")
    for r in rows:
        c = r["census"]
        lines.append(f"| {r['stage']} | " + " | ".join(_g(c.get(k, 0)) for k in roles) + f" | {_g(c['total'])} |")
    return lines + [""]


ROLE_ORDER = ("params", "grads", "fp32 master (ZeRO)", "adam m, v", "ema", "reduce bucket (ZeRO)", "other")


READING = (
    "With C = one full fp32 copy (4P bytes): stage 0 holds params C + AdamW m, v 2C + EMA C = 4C between"
    " steps; at its peak (end of backward) add the gradients C and DeepSpeed's stage-0 all-reduce, which"
    " flattens all gradients into one more copy C (`buffered_allreduce_fallback`, a fixed 5e8-element bucket,"
    " not configurable): 6C.",
    "ZeRO-3 at 2 ranks holds params C/2 + gradient partitions C/2 (a persistent flat buffer) + AdamW C + EMA"
    " C/2 (trainer/ema.py averages `ds_tensor` shards, no gather) + an fp32 master partition C/2 = 3C. The"
    " master copy should not exist in fp32: DeepSpeed 0.19 `_create_fp32_partitions` compares"
    " `tensor.device == self.device` with a device *string*, always False, so it clones. Its step peak adds"
    " the flattened gradient partition C/2 and torch AdamW's `sqrt`/`div` temporaries over the one flat"
    " partition (C): ~4.5C. Hence ~0.75, not 0.5, even with an ideal allocator.",
    "DeepSpeed's default sizes (`ds-defaults`) are sized for ~1B-parameter models: the whole 52.5M-parameter"
    " model fits in one 5e8-element reduce bucket (allocated at 2 GB per rank; the CPU only makes the written"
    " part resident, a GPU would hold all of it) and in one prefetch window, and a reuse distance of 1e9 keeps"
    " every gathered parameter from its forward use to its backward use, so ZeRO-2/3 hold a full gradient copy"
    " and ZeRO-3 a full weight copy at the peak. trainer/engine.py now scales them to 1/16 of the model.",
    "glibc's default malloc keeps freed blocks in its heaps (`malloc free kept`; its mmap threshold rises to"
    " the largest freed block, up to 32 MB): ZeRO-3's per-module gather/release churn leaves ~3C there, which"
    " hides the partitioning in the RSS. `MALLOC_MMAP_THRESHOLD_=131072` removes it (every large block is"
    " mapped and zeroed anew: its step-time cost on this loaded machine varied between runs, 1.0-1.7x); on a"
    " GPU the model state lives in device memory and this does not apply.",
)


def summary_lines(results: dict[str, list[dict[str, Any]]]) -> list[str]:
    out = []
    for variant, rows in results.items():
        by = {r["stage"]: r for r in rows}
        secs = {s: statistics.median(t for rk in r["ranks"] for t in rk["step_seconds"]) for s, r in by.items()}
        text = f"`{variant}`: "
        if 0 in by and 3 in by:
            text += (
                f"model state {_g(by[3]['model_state'])} / {_g(by[0]['model_state'])} GB ="
                f" **{by[3]['model_state'] / by[0]['model_state']:.2f}**; live tensors"
                f" {_g(by[3]['live_tensors'])} / {_g(by[0]['live_tensors'])} GB ="
                f" {by[3]['live_tensors'] / by[0]['live_tensors']:.2f}; steady expected"
                f" {by[3]['expected_steady'] / by[0]['expected_steady']:.2f}; "
            )
        text += "step s " + ", ".join(f"stage {s}: {v:.1f}" for s, v in sorted(secs.items()))
        out.append(text)
    return out


def write_md(path: Path, meta: dict[str, Any], results: dict[str, list[dict[str, Any]]]) -> None:
    m = meta["machine"]
    n = next(iter(results.values()))[0]["ranks"][0]["params"]
    lines = [
        "# Peak host memory per rank, ZeRO 0-3, 2 ranks, CIFAR-10 preset",
        "",
        f"{meta['date']} · {m['cpu']} · {m['cpus']} CPUs · torch {m['torch']} · deepspeed {m['deepspeed']} ·"
        f" {CONFIG} ({n:,} params = P; a full fp32 copy is 4P = {_g(4 * n)} GB), fp32, 2 ranks x batch 2, gloo,"
        f" OMP_NUM_THREADS=1, {meta['steps']} steps per run · `{meta['command']}`",
        "",
        "GB = 1e9 bytes; RSS of the rank with the larger model state. **baseline**: after imports and"
        " process-group set-up, before the UNet and the engine are built. **peak over steps**: highest RSS"
        " sampled (2 ms) during the training steps only (no checkpoint, export or sampling); phase: fwd/loss/bwd"
        " (activations alive), reduce (stage-0/1 all-reduce at the end of backward), opt (`engine.step`), post"
        " (after backward or step: EMA, bookkeeping)."
        " **activations**: tensors saved for backward by one forward. **code pages**: file-backed RSS (torch's"
        " library code paged in as kernels are first used) gained since the baseline. **model state** ="
        " max(peak in fwd/loss/bwd − activations, peak in reduce/opt/post) − baseline, on the *anonymous* RSS"
        " (resident − file-backed), so code pages are out; activations are subtracted only where they are"
        " alive. **steady expected**: params + fp32 master partition"
        " (ZeRO 1-3) + AdamW m, v + EMA (+ grad partitions, ZeRO-3), full or 1/2 per rank, no transients."
        " **live tensors**: unique tensor storages at the end of a step. **malloc free kept**: bytes glibc holds"
        " freed in its heaps (counted in RSS).",
        "",
    ]
    for variant, rows in results.items():
        lines += md_table(variant, rows)
    lines += ["Summary (stage 3 / stage 0 per rank; step seconds: median over both ranks and all steps):", ""]
    lines += [f"- {line}" for line in summary_lines(results)]
    lines += [f"- {note}" for note in meta.get("notes", [])]
    lines += ["", "Reading:", ""] + [f"- {line}" for line in READING]
    path.write_text("\n".join(lines).rstrip() + "\n")


def machine() -> dict[str, Any]:
    import deepspeed
    import torch

    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "cpus": os.cpu_count(), "torch": torch.__version__, "deepspeed": deepspeed.__version__}


def parent(args: argparse.Namespace) -> None:
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta: dict[str, Any] = {
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": machine(),
        "command": "python " + " ".join([os.path.relpath(__file__, ROOT), *sys.argv[1:]]),
        "config": CONFIG,
        "steps": args.steps,
        "variants": {v: VARIANTS[v] for v in args.variants},
        "load_before": os.getloadavg(),
    }
    results: dict[str, list[dict[str, Any]]] = {}
    with tempfile.TemporaryDirectory(prefix="zero_memory_") as tmp:
        data = make_data(Path(tmp))
        for variant in args.variants:
            results[variant] = summarize({s: run_stage(variant, s, args, data, Path(tmp)) for s in args.stages})
    meta["load_after"] = os.getloadavg()
    meta["notes"] = args.note or []
    out.with_suffix(".json").write_text(json.dumps({**meta, "results": results}, indent=2))
    write_md(out.with_suffix(".md"), meta, results)
    print(out.with_suffix(".md").read_text())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "zero_memory"), help="output path, no suffix")
    p.add_argument("--stages", type=int, nargs="+", default=[0, 1, 2, 3], choices=range(4))
    p.add_argument("--steps", type=int, default=4, help="optimizer steps per run (default %(default)s)")
    p.add_argument("--variants", nargs="+", default=list(DEFAULT_VARIANTS), choices=list(VARIANTS))
    p.add_argument("--note", action="append", help="a line for the md file's notes")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--zero", default="null", help=argparse.SUPPRESS)
    p.add_argument("--stage", type=int, help=argparse.SUPPRESS)
    p.add_argument("--data", help=argparse.SUPPRESS)
    p.add_argument("--work", help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    args = p.parse_args()
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    if args.child:
        child(args)
    else:
        parent(args)


if __name__ == "__main__":
    main()
