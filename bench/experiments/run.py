"""Evidence for the Improved-DDPM paper's claims, reproduced at small scale on the digits (issue 13).

    python bench/experiments/run.py --all                       # the suite: ~70 min on an idle 2-core machine
    python bench/experiments/run.py --part 1 --part 5           # some experiments; runs are shared and reused
    python bench/experiments/run.py --all --dry-run             # the plan and its time estimate, nothing run
    python bench/experiments/run.py --smoke --part 1 --part 5   # end-to-end check in ~2 min, into a temp dir
    python bench/experiments/run.py --part 5 --bounds-only      # experiment 5's likelihood half only (no sampling)

Five experiments (Nichol & Dhariwal 2021), each a comparison of arms, every arm a config under
``configs/experiments/`` trained with every seed (``--seeds``, default 0 1):

1. L_simple with fixed variances (``mse_fixed``) vs L_hybrid with learned variances (``hybrid_cosine``):
   bits/dim on held-out data.
2. Linear (``hybrid_linear``) vs cosine (``hybrid_cosine``) noise schedule: bits/dim.
3. L_vlb with uniform (``kl_uniform``) vs loss-second-moment (``kl_importance``) timestep sampling: the standard
   deviation of the training loss over the last quarter of the run, and bits/dim.
4. L_hybrid with uniform sampling (``hybrid_cosine``) vs importance sampling whose history is fed the L_vlb term
   (``hybrid_importance_vb``) or the whole per-sample loss (``hybrid_importance_loss``): the same figures; the
   winner between the last two is the recommended ``diffusion.history_term`` default.
5. Sample quality and likelihood against sampling steps (10, 25, 50, 100, all T) for the models of experiment 1,
   with respaced ancestral sampling (ddpm) and DDIM (DDIM at all T only with ``--ddim-full``: +~12 min).

What runs. Every (arm, seed) is one training run in ``<out>/runs/<arm>/seed<k>/``, launched as a subprocess
(``python trainer/main.py --config configs/experiments/<arm>.yaml --resume auto ...``), then its bits/dim on the
val split: the exact bound over all T steps of the first ``--bpd-images`` val images (``trainer/evaluate.py
bpd``, the same images and noise for every model, so arms compare paired). Experiment 5 trains a small digit
classifier on the train split (``trainer.evaluation.features.train_classifier``; its held-out accuracy is reported),
computes reference statistics of the train split in its feature space (``evaluate.py stats``), samples with
``trainer/sample.py`` and scores every sample set with ``evaluate.py quality`` (FID, precision, recall, KID)
plus class coverage from the classifier's predictions. It also computes, in this process, the bound of the
respaced process at each step count on the same val images (a likelihood for each respacing; ``evaluate.py``
has no respacing option). Everything tracks to ``<out>/mlflow.db`` (artifacts in ``<out>/mlartifacts``): one
MLflow experiment per experiment for its runs, and a run per part in ``experiments-summary`` holding the JSON,
the markdown and the plots.

Resumable. A finished step is never redone: a training run whose final checkpoint exists, a bits/dim report,
samples with their quality report. A killed training run continues from its newest checkpoint (the trainer's
``--resume auto``); the sampler and ``evaluate.py`` redo only their unfinished parts. Rerun the same command.
``<out>/suite.json`` records the settings; an out directory made with other settings is refused.

Paired verdicts. ``evaluate.py bpd`` stores every image's bits/dim; each ``expN.md`` then states, for every two
arms, their paired difference with a 95 % interval over images and seeds (``bench/experiments/paired.py``) and a
verdict only where that interval excludes zero. Reports made before per-image values were stored say so.

Outputs: ``<out>/expN.json`` (per arm and seed: final bits/dim, loss noise, ...; mean and spread over seeds),
``<out>/expN_*.png`` (loss curves, bits/dim bars with seed points, steps-vs-quality), ``<out>/expN.md`` (a table
and the sentence comparing with the paper) and ``<out>/summary.md`` (all of them).

Time. Two runs at once (``--jobs 2``), one thread each (``--threads 1``): on 2 cores two 1-thread trainers
make ~7 steps/s in all against ~5.5 for one 2-thread trainer (bench/results/overhead.md). The estimate printed
before starting assumes an otherwise idle machine (it warns when the load average says otherwise).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

import report  # noqa: E402  (a sibling module: bench/experiments/report.py)

CONFIGS = ROOT / "configs" / "experiments"
DEFAULT_OUT = ROOT / "bench" / "results" / "experiments"
DEFAULT_DATA = ROOT / "data" / "digits16"

ARMS = {
    "hybrid_cosine": "L_hybrid, learned Σ, cosine, uniform t",
    "mse_fixed": "L_simple, fixed Σ = β, cosine, uniform t",
    "hybrid_linear": "L_hybrid, learned Σ, linear, uniform t",
    "kl_uniform": "L_vlb, learned Σ, cosine, uniform t",
    "kl_importance": "L_vlb, learned Σ, cosine, importance-sampled t",
    "hybrid_importance_vb": "L_hybrid, importance sampling fed L_vlb",
    "hybrid_importance_loss": "L_hybrid, importance sampling fed the whole loss",
}
HOME = {  # the MLflow experiment that holds an arm's runs (runs shared by experiments live in the first)
    "hybrid_cosine": "exp1-objective",
    "mse_fixed": "exp1-objective",
    "hybrid_linear": "exp2-schedule",
    "kl_uniform": "exp3-vlb-sampling",
    "kl_importance": "exp3-vlb-sampling",
    "hybrid_importance_vb": "exp4-hybrid-sampling",
    "hybrid_importance_loss": "exp4-hybrid-sampling",
}
EXPERIMENTS: dict[int, list[str]] = {
    1: ["hybrid_cosine", "mse_fixed"],
    2: ["hybrid_cosine", "hybrid_linear"],
    3: ["kl_uniform", "kl_importance"],
    4: ["hybrid_cosine", "hybrid_importance_vb", "hybrid_importance_loss"],
    5: ["hybrid_cosine", "mse_fixed"],
}
SUMMARY_EXPERIMENT = "experiments-summary"

# Speeds for the time estimate, on an idle 2-core machine (fp32, the quickstart UNet, T = 1000):
TRAIN_STEPS_PER_S = {1: 3.5, 2: 5.5}
"""Trainer steps/s of 32 images by threads per process: bench/results/overhead.md (1 thread: 3.52, 2: 5.51)."""
CALLS_PER_S = {1: 350.0, 2: 520.0}
"""Images x network calls per second when sampling or evaluating the bound (batch >= 16), by threads: 283/s
measured here at 1 thread with the machine's 2 cores loaded ~3.3 (this process got ~2/3 of a core)."""
TRAIN_START_S, CLI_START_S = 25.0, 8.0
"""Process start-up + model build + final checkpoint/grid of a training run; start-up of a sampling/eval CLI."""


@dataclass
class Suite:
    """Every setting that decides what a run or report contains (``<out>/suite.json``)."""

    smoke: bool = False
    seeds: list[int] = field(default_factory=lambda: [0, 1])
    train_steps: int = 1000
    diffusion_steps: int = 1000
    bpd_images: int = 64
    """64 of the 180 val images: the paired intervals of issue 22 (32 left experiment 4's differences undecided)."""
    bpd_batch: int = 16
    samples: int = 128
    sample_batch: int = 64
    sample_steps: list[int] = field(default_factory=lambda: [10, 25, 50, 100])
    ddim_full: bool = False
    classifier_epochs: int = 20
    """20 epochs: 99.4% on the val split (10 epochs: 85%, its batch-norm statistics not yet settled)."""
    overrides: list[str] = field(default_factory=list)
    """Extra trainer overrides for every run (the smoke test's shrinking)."""

    @property
    def T(self) -> int:
        return self.diffusion_steps


def smoke_suite() -> Suite:
    return Suite(
        smoke=True,
        seeds=[0],
        train_steps=10,
        diffusion_steps=50,
        bpd_images=4,
        bpd_batch=4,
        samples=16,
        sample_batch=16,
        sample_steps=[10],
        ddim_full=True,
        classifier_epochs=1,
        overrides=[
            "train.log_every=2",
            "train.ckpt_every=5",
            "train.warmup_steps=2",
            "train.importance_plot_every=5",
            "diffusion.history_per_term=2",  # importance sampling starts after 100 samples (4 steps)
            "sample.num_samples=4",
            "sample.batch_size=4",
            "sample.steps=10",
        ],
    )


# ------------------------------------------------------------------------------------------ tasks


class Runner:
    """Launches the subprocesses (``threads`` OpenMP threads each), logs one line per event."""

    def __init__(self, out: Path, suite: Suite, data: Path, threads: int) -> None:
        self.out, self.suite, self.data, self.threads = out, suite, data, threads
        self.uri = f"sqlite:///{out / 'mlflow.db'}"
        self._lock = threading.Lock()
        self.t0 = time.perf_counter()

    def say(self, msg: str) -> None:
        with self._lock:
            print(f"[{report.fmt_time(time.perf_counter() - self.t0)}] {msg}", flush=True)

    def env(self) -> dict[str, str]:
        n = str(self.threads)
        return dict(os.environ, OMP_NUM_THREADS=n, MKL_NUM_THREADS=n, PYTHONUNBUFFERED="1", TQDM_DISABLE="1")

    def call(self, cmd: list[str], log: Path, what: str) -> None:
        """Run ``cmd`` from the repository root, appending its output to ``log``; raise on failure."""
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "a") as f:
            f.write(f"\n$ {shlex.join(cmd)}\n")
            f.flush()
            proc = subprocess.run(cmd, cwd=ROOT, env=self.env(), stdout=f, stderr=subprocess.STDOUT, check=False)
        if proc.returncode != 0:
            tail = log.read_text(errors="replace").strip().splitlines()[-5:]
            raise RuntimeError(f"{what} failed (exit {proc.returncode}); see {log}: " + " | ".join(tail))

    # -- paths
    def run_dir(self, arm: str, seed: int) -> Path:
        return self.out / "runs" / arm / f"seed{seed}"

    def export(self, arm: str, seed: int) -> Path:
        return self.run_dir(arm, seed) / "checkpoints" / f"step_{self.suite.train_steps:08d}" / "export.pt"

    def bpd_json(self, arm: str, seed: int) -> Path:
        return self.run_dir(arm, seed) / "eval" / f"bpd_val_n{self.suite.bpd_images}.json"

    def trained(self, arm: str, seed: int) -> bool:
        ex = self.export(arm, seed)
        return ex.is_file() and (ex.parent / "COMPLETE").is_file()

    # -- a training run and its bits/dim
    def train_and_eval(self, arm: str, seed: int) -> None:
        run, s = self.run_dir(arm, seed), self.suite
        if not self.trained(arm, seed):
            resumed = (run / "checkpoints").is_dir()
            self.say(f"train {arm} seed {seed}: {'resuming' if resumed else 'starting'} ({s.train_steps} steps)")
            cmd = [sys.executable, "trainer/main.py", "--config", str(CONFIGS / f"{arm}.yaml"), "--resume", "auto"]
            cmd += [
                f"train.seed={seed}",
                f"data.seed={seed}",
                f"data.root={self.data}",
                f"train.output_dir={run}",
                f"train.total_steps={s.train_steps}",
                f"diffusion.steps={s.diffusion_steps}",
                f"tracking.uri={self.uri}",
                f"tracking.experiment={HOME[arm]}",
                f"tracking.run_name={arm}-seed{seed}",
                *s.overrides,
            ]
            t = time.perf_counter()
            self.call(cmd, run / "train.log", f"training {arm} seed {seed}")
            if not self.trained(arm, seed):
                raise RuntimeError(f"training {arm} seed {seed} ended without {self.export(arm, seed)}")
            self.say(f"train {arm} seed {seed}: done in {report.fmt_time(time.perf_counter() - t)}")
        out = self.bpd_json(arm, seed)
        if not out.is_file():
            self.say(f"bits/dim {arm} seed {seed}: {s.bpd_images} val images, all {s.T} steps")
            cmd = [sys.executable, "trainer/evaluate.py", "bpd", str(self.export(arm, seed)), "--split", "val"]
            cmd += ["--data-root", str(self.data), "--max-images", str(s.bpd_images)]
            cmd += ["--batch-size", str(s.bpd_batch), "--seed", "0", "--out", str(out)]
            t = time.perf_counter()
            self.call(cmd, run / "eval" / "bpd.log", f"bits/dim of {arm} seed {seed}")
            bpd = json.loads(out.read_text())["bits_per_dim"]
            self.say(f"bits/dim {arm} seed {seed}: {bpd:.4f} ({report.fmt_time(time.perf_counter() - t)})")

    # -- experiment 5
    def exp5_dir(self) -> Path:
        return self.out / "exp5"

    def classifier(self) -> tuple[Path, Path]:
        """The feature network (trained here) and the train split's reference statistics in its space."""
        d = self.exp5_dir()
        clf, ref, info = d / "classifier.pt", d / "ref_train.npz", d / "classifier.json"
        if not (clf.is_file() and info.is_file()):
            import numpy as np
            import torch

            from trainer.evaluation.features import train_classifier

            t = time.perf_counter()
            x, y = report.read_split(self.data, "train")
            self.say(f"classifier: training on {len(x)} train images, {self.suite.classifier_epochs} epochs")
            net = train_classifier(x, y, 10, epochs=self.suite.classifier_epochs, seed=0, log=self.say)
            xv, yv = report.read_split(self.data, "val")
            with torch.inference_mode():
                logits = net.extract(xv, batch_size=256).logits
            acc = float((np.asarray(logits).argmax(1) == yv).mean())
            net.save(clf)
            info.write_text(
                json.dumps(
                    {"name": net.name, "train_images": len(x), "val_images": len(xv), "val_accuracy": acc}, indent=1
                )
            )
            self.say(f"classifier: val accuracy {acc:.3f} ({report.fmt_time(time.perf_counter() - t)})")
        if not ref.is_file():
            from trainer.evaluation import scoring

            argv = ["--data", str(self.data), "--split", "train", "--features", str(clf), "--out", str(ref)]
            if scoring.main("stats", [*argv, "--device", "cpu"]) != 0:
                raise RuntimeError("evaluate.py stats failed")
        return clf, ref

    def sample_settings(self) -> list[tuple[str, str, int]]:
        """(method, respacing spec, step count) of experiment 5; the most expensive first."""
        s, T = self.suite, self.suite.T
        out = [("ddpm", "", T)] + ([("ddim", "", T)] if s.ddim_full else [])
        for k in sorted(s.sample_steps, reverse=True):
            out += [("ddpm", str(k), k), ("ddim", f"ddim{k}", k)]
        return out

    def sample_dir(self, arm: str, seed: int, method: str, steps: int) -> Path:
        return self.exp5_dir() / "samples" / f"{arm}-seed{seed}" / f"{method}_{steps}"

    def sample_and_score(self, arm: str, seed: int, method: str, spec: str, steps: int, clf: Path, ref: Path) -> None:
        d, s = self.sample_dir(arm, seed, method, steps), self.suite
        if not (d / "samples.npz").is_file():
            self.say(f"sample {arm} seed {seed}: {method} {steps} steps, {s.samples} images")
            cmd = [sys.executable, "trainer/sample.py", str(self.export(arm, seed)), "--num-samples", str(s.samples)]
            cmd += ["--batch-size", str(s.sample_batch), "--part-size", str(s.sample_batch), "--method", method]
            cmd += ["--steps", spec, "--seed", "0", "--out", str(d)]
            self.call(cmd, d.parent / f"{method}_{steps}.log", f"sampling {arm} seed {seed} {method} {steps}")
        if not (d / "quality.json").is_file():
            report.score_samples(d, clf, ref)

    def respaced_bpd(self, arm: str, seed: int) -> Path:
        """Bits/dim of the respaced processes (ddpm spacing) on the same val images as the full bound."""
        out = self.exp5_dir() / "bpd_respaced" / f"{arm}-seed{seed}.json"
        if not out.is_file():
            t = time.perf_counter()
            res = report.respaced_bpd(
                self.export(arm, seed), self.data, self.suite.bpd_images, self.suite.sample_steps, self.suite.bpd_batch
            )
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(res, indent=1))
            shown = ", ".join(f"{k}: {v['bits_per_dim']:.3f}" for k, v in res["by_steps"].items())
            self.say(f"respaced bits/dim {arm} seed {seed}: {shown} ({report.fmt_time(time.perf_counter() - t)})")
        return out


# ------------------------------------------------------------------------------------------ plan and estimate


def estimate(runner: Runner, parts: list[int], jobs: int) -> dict[str, float]:
    """Seconds of wall time still to spend, per phase, on an idle machine (what is done counts zero)."""
    s, th = runner.suite, runner.threads
    steps_s, calls_s = TRAIN_STEPS_PER_S.get(th, TRAIN_STEPS_PER_S[2]), CALLS_PER_S.get(th, CALLS_PER_S[2])
    pairs = sorted({(a, k) for p in parts for a in EXPERIMENTS[p] for k in s.seeds})
    train = sum(TRAIN_START_S + s.train_steps / steps_s for a, k in pairs if not runner.trained(a, k))
    bpd = sum(CLI_START_S + s.bpd_images * s.T / calls_s for a, k in pairs if not runner.bpd_json(a, k).is_file())
    est = {"train": train / jobs, "bits/dim": bpd / jobs}
    if 5 in parts:
        models = [(a, k) for a in EXPERIMENTS[5] for k in s.seeds]
        sampling = sum(
            CLI_START_S + s.samples * n / calls_s
            for a, k in models
            for m, _, n in runner.sample_settings()
            if not (runner.sample_dir(a, k, m, n) / "quality.json").is_file()
        )
        respaced = sum(
            s.bpd_images * sum(s.sample_steps) / calls_s
            for a, k in models
            if not (runner.exp5_dir() / "bpd_respaced" / f"{a}-seed{k}.json").is_file()
        )
        clf = 0.0 if (runner.exp5_dir() / "ref_train.npz").is_file() else 60.0
        est.update({"exp5 classifier": clf, "exp5 sampling": sampling / jobs, "exp5 respaced bits/dim": respaced})
    est["reports"] = 10.0 * len(parts)
    return est


# ------------------------------------------------------------------------------------------ main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--part", type=int, action="append", choices=sorted(EXPERIMENTS), help="experiment (repeatable)")
    p.add_argument("--all", action="store_true", help="all five experiments")
    p.add_argument("--seeds", type=int, nargs="+", default=None, help="training seeds (default 0 1; smoke: 0)")
    p.add_argument("--out", type=Path, default=None, help=f"output directory (default {DEFAULT_OUT}; smoke: temp)")
    p.add_argument("--data", type=Path, default=DEFAULT_DATA, help="digits shards (built when missing)")
    p.add_argument("--jobs", type=int, default=2, help="runs at once (default 2: one per core)")
    p.add_argument("--threads", type=int, default=1, help="OpenMP threads per run (default 1)")
    p.add_argument("--train-steps", type=int, default=None, help="optimizer steps per run (default 1000)")
    p.add_argument("--bpd-images", type=int, default=None, help="val images of the exact bound (default 64)")
    p.add_argument("--samples", type=int, default=None, help="images per sample set in experiment 5 (default 128)")
    p.add_argument(
        "--bounds-only", action="store_true", help="experiment 5: only the respaced processes' bounds (no sampling)"
    )
    p.add_argument("--ddim-full", action="store_true", help="experiment 5: DDIM at all T steps too (+~12 min)")
    p.add_argument("--smoke", action="store_true", help="shrink everything (10 steps, T = 50, 1 seed): a check")
    p.add_argument("--dry-run", action="store_true", help="print the plan and the time estimate only")
    p.add_argument("--no-mlflow-summary", action="store_true", help="do not log the reports to MLflow")
    args = p.parse_args(argv)
    if not args.all and not args.part:
        p.error("choose experiments: --part N (repeatable) or --all")
    if args.jobs < 1 or args.threads < 1:
        p.error("--jobs and --threads must be >= 1")
    return args


def build_suite(args: argparse.Namespace) -> Suite:
    suite = smoke_suite() if args.smoke else Suite()
    if args.seeds is not None:
        suite.seeds = sorted(set(args.seeds))
    if args.train_steps is not None:
        suite.train_steps = args.train_steps
    if args.samples is not None:
        suite.samples = args.samples
    if args.bpd_images is not None:
        suite.bpd_images = args.bpd_images
    if args.ddim_full:
        suite.ddim_full = True
    return suite


def check_suite(out: Path, suite: Suite) -> None:
    """Refuse an out directory whose runs were made with other settings (seeds may be added)."""
    path = out / "suite.json"
    mine = asdict(suite)
    if path.is_file():
        old = json.loads(path.read_text())
        diff = [k for k in mine if k not in ("seeds", "ddim_full") and old.get(k) != mine[k]]
        if diff:
            raise SystemExit(
                f"error: {out} holds runs made with other settings ({', '.join(f'{k}={old.get(k)!r}' for k in diff)}); "
                "use another --out"
            )
        mine["seeds"] = sorted(set(old.get("seeds", [])) | set(suite.seeds))
        mine["ddim_full"] = bool(old.get("ddim_full")) or suite.ddim_full
    out.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(mine, indent=1) + "\n")


def ensure_data(data: Path, runner: Runner) -> None:
    if (data / "manifest.json").is_file():
        return
    runner.say(f"building the digits shards in {data} (data_prep, as `make shards`)")
    cmd = [sys.executable, "-m", "data_prep", "make", "--source", "digits", "--out", str(data)]
    cmd += ["--image-size", "16", "--channels", "1", "--val-fraction", "0.1", "--max-per-shard", "256"]
    runner.call(cmd, data.parent / f"{data.name}.log", "data_prep make")


def ensure_tracking(runner: Runner, names: list[str]) -> None:
    """Create the store and the experiments before two trainers race to (artifacts stay under the out dir)."""
    from mlflow.tracking import MlflowClient

    from trainer.tracking import EXPERIMENT_KIND, EXPERIMENT_KIND_TAG

    client = MlflowClient(tracking_uri=runner.uri)
    for name in names:
        if client.get_experiment_by_name(name) is None:
            where = (runner.out / "mlartifacts" / name).as_uri()
            client.create_experiment(name, artifact_location=where, tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND})


def run_pool(runner: Runner, jobs: int, tasks: list[tuple[str, Callable[[], Any]]]) -> list[str]:
    """Run ``tasks`` (name, thunk) ``jobs`` at a time; returns the failures (a failure does not stop the rest)."""
    failures: list[str] = []
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        futures = {pool.submit(fn): name for name, fn in tasks}
        for fut in as_completed(futures):
            err = fut.exception()
            if err is not None:
                failures.append(f"{futures[fut]}: {err}")
                runner.say(f"FAILED {futures[fut]}: {err}")
    return failures


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("TQDM_DISABLE", "1")  # the CLIs called in this process: their bars would interleave
    parts = sorted(EXPERIMENTS) if args.all else sorted(set(args.part))
    suite = build_suite(args)
    out = args.out or (Path(tempfile.mkdtemp(prefix="experiments_smoke_")) if args.smoke else DEFAULT_OUT)
    out = out.resolve()
    data = args.data.resolve()
    runner = Runner(out, suite, data, args.threads)

    est = estimate(runner, parts, args.jobs)
    total = sum(est.values())
    print(f"experiments {parts} -> {out}")
    print(
        f"settings: seeds {suite.seeds}, {suite.train_steps} steps of 32 images per run, T = {suite.T}, "
        f"bits/dim on {suite.bpd_images} val images, {suite.samples} samples per setting, "
        f"{args.jobs} job(s) x {args.threads} thread(s)"
        + (" [SMOKE TEST: not figures to quote]" if suite.smoke else "")
    )
    print(
        "estimated wall time left (idle machine): "
        + ", ".join(f"{k} {report.fmt_time(v)}" for k, v in est.items() if v > 0)
        + f"; total {report.fmt_time(total)}"
    )
    load = os.getloadavg()[0]
    if load > 0.5:
        print(f"note: load average {load:.2f}: other work is running, expect it to take longer")
    if args.dry_run:
        return 0

    check_suite(out, suite)
    ensure_data(data, runner)
    ensure_tracking(runner, sorted(set(HOME.values())) + [SUMMARY_EXPERIMENT])

    # Arm by arm, seeds side by side: the two jobs train two seeds of an arm at once.
    pairs = sorted(
        {(a, k) for p in parts for a in EXPERIMENTS[p] for k in suite.seeds},
        key=lambda ak: (list(ARMS).index(ak[0]), ak[1]),
    )
    failures = run_pool(
        runner, args.jobs, [(f"{a} seed {k}", lambda a=a, k=k: runner.train_and_eval(a, k)) for a, k in pairs]
    )

    models = [(a, k) for a in EXPERIMENTS[5] for k in suite.seeds]
    if 5 in parts and not all(runner.trained(a, k) for a, k in models):
        failures.append("experiment 5: skipped, its models (experiment 1's runs) are not all trained")
    elif 5 in parts and args.bounds_only:
        for a, k in models:
            runner.respaced_bpd(a, k)
        files = report.write_exp5_bounds(runner)
        print("\n".join(str(f) for f in files))
        return 0
    elif 5 in parts:
        import torch

        torch.set_num_threads(args.jobs * args.threads)  # the in-process steps run alone
        clf, ref = runner.classifier()
        report.score_real(runner.exp5_dir() / "real_val", data, suite.samples, clf, ref)
        torch.set_num_threads(args.threads)
        tasks = [
            (
                f"sample {a} seed {k} {m} {n}",
                lambda a=a, k=k, m=m, sp=sp, n=n: runner.sample_and_score(a, k, m, sp, n, clf, ref),
            )
            for m, sp, n in runner.sample_settings()
            for a, k in models
        ]
        failures += run_pool(runner, args.jobs, tasks)
        torch.set_num_threads(args.jobs * args.threads)
        for a, k in models:
            try:
                runner.respaced_bpd(a, k)
            except Exception as err:  # noqa: BLE001 - reported with the others
                failures.append(f"respaced bits/dim {a} seed {k}: {type(err).__name__}: {err}")

    written = []
    for p in parts:
        try:
            files = report.write_experiment(p, runner, EXPERIMENTS[p], ARMS)
        except Exception as err:  # noqa: BLE001 - one report's problem does not lose the others
            failures.append(f"report of experiment {p}: {type(err).__name__}: {err}")
            continue
        written += files
        if not args.no_mlflow_summary:
            report.log_summary(runner.uri, SUMMARY_EXPERIMENT, p, files, asdict(suite))
    report.write_index(out)
    runner.say(f"wrote {len(written)} files under {out}")
    for f in written:
        print(f"  {f.relative_to(out)}")
    if failures:
        print(f"{len(failures)} failure(s); rerun the same command to retry them:", file=sys.stderr)
        for f in failures:
            print(f"  {f}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
