"""The chaos run: a 2-rank training run under a seeded schedule of faults, relaunched until it finishes, and
then compared with the same run without faults.

    python -m tests.chaos --faults 20 --steps 300 [--mlflow-server] [--seed 0] --report chaos.json

A supervisor (this module, standing in for SLURM's requeue) starts the two ranks of a tiny quickstart run
(``tests/integration/fault_at.py``, which injects each fault at its step), waits until they end, and
relaunches them with ``--resume auto`` (exporting SLURM_RESTART_COUNT, as a requeue does) until the run
reaches its last step. Faults: ``kill9`` (a rank SIGKILLs itself between checkpoints), ``kill9-save`` (during
a checkpoint write), ``stop`` (SIGTERM to every rank: save and exit 75), ``enospc`` (the output directory, a
small tmpfs mounted here, is full for one checkpoint), ``hang`` (a rank stops inside a step; the hang watchdog
must end the run, exit 4) and, with ``--mlflow-server``, ``mlflow`` (the tracking server is killed and started
again a few steps later).

What it proves, checked at the end (any failure: exit 1):
- the final checkpoint (weights, EMA, optimizer state, LR schedule, timestep history, data position, RNG)
  is bitwise equal to the fault-free run's;
- one MLflow run, with exactly one ``train/loss`` point per step, equal to the fault-free run's values, and
  the restart count as its ``restarts`` tag.
The report (JSON, and a printed table) lists faults injected and survived, steps re-trained and wall time lost.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
HOOK = "tests/integration/fault_at.py"
TINY = [
    "model.channels=16",
    "model.norm_groups=8",
    "model.channel_mult=[1,2]",
    "model.attention_resolutions=[8]",
    "sample.num_samples=4",
    "sample.batch_size=4",
    "sample.steps=5",
]
KINDS = ("kill9", "kill9-save", "stop", "enospc", "hang", "mlflow")
CKPT_EVERY = 10
GRACE_S = 30.0
"""After one rank failed, how long the others get to end on their own before they are killed (a launcher's
teardown); hang-reporting ranks end within a second."""


def free_port() -> int:
    from trainer.distributed import free_port as port

    return port()


def child_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", PYTHONPATH=str(REPO))
    env.update(extra)
    return env


# ---------------------------------------------------------------------------------------------- launching
@dataclass
class Launch:
    """One start of every rank, and how it ended."""

    index: int
    codes: list[int]
    wall_s: float
    faults: list[str]
    """The faults that struck (``kind:step:rank``), as the ranks announced them."""
    last_step: int
    """The last step rank 0 finished (-1: none)."""
    resumed_from: int
    """The step it resumed from (0: a fresh start)."""


def launch_ranks(world: int, args: list[str], logs: Path, index: int, env: dict[str, str], watch: Any = None) -> Launch:
    """Start ``world`` ranks of ``fault_at.py`` with the launcher's variables set by hand (so each rank's own
    exit status is seen), wait for all to end; when one fails, the others get :data:`GRACE_S` to end on their
    own and are then killed. ``watch(rank0_log_text)`` is called while waiting (the MLflow fault's hand-shake)."""
    logs.mkdir(parents=True, exist_ok=True)
    port = str(free_port())
    procs, paths = [], []
    t0 = time.monotonic()
    for r in range(world):
        path = logs / f"launch_{index:02d}_rank_{r}.log"
        paths.append(path)
        renv = child_env(
            RANK=str(r),
            LOCAL_RANK=str(r),
            WORLD_SIZE=str(world),
            LOCAL_WORLD_SIZE=str(world),
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=port,
            **env,
        )
        with path.open("wb") as out:
            cmd = [sys.executable, HOOK, "--config", "configs/quickstart.yaml", "--resume", "auto", *args]
            procs.append(subprocess.Popen(cmd, cwd=REPO, env=renv, stdout=out, stderr=subprocess.STDOUT))
    failed_at: float | None = None
    while any(p.poll() is None for p in procs):
        if watch is not None:
            watch(paths[0].read_text(errors="replace"))
        if failed_at is None and any(p.returncode not in (None, 0, 75) for p in procs):
            failed_at = time.monotonic()
        if failed_at is not None and time.monotonic() - failed_at > GRACE_S:
            for p in procs:
                if p.poll() is None:
                    p.kill()
        time.sleep(0.1)
    wall = time.monotonic() - t0
    text0 = paths[0].read_text(errors="replace")
    faults = []
    for path in paths:
        faults += re.findall(r"^chaos: fault (\S+) at step (\d+) rank (\d+)", path.read_text(errors="replace"), re.M)
    steps = [int(s) for s in re.findall(r"^chaos: step (\d+)", text0, re.M)]
    resumed = re.search(r"resumed from \S*step_(\d+)", text0)
    return Launch(
        index=index,
        codes=[p.returncode for p in procs],
        wall_s=round(wall, 1),
        faults=sorted({f"{k}:{s}:{r}" for k, s, r in faults}),
        last_step=max(steps, default=-1),
        resumed_from=int(resumed.group(1)) if resumed else 0,
    )


# ---------------------------------------------------------------------------------------------- schedule
@dataclass
class Fault:
    kind: str
    step: int
    rank: int
    launch: int | None = None
    outcome: str = "not reached"

    @property
    def spec(self) -> str:
        return f"{self.kind}:{self.step}:{self.rank}"


def make_schedule(seed: int, faults: int, steps: int, kinds: tuple[str, ...]) -> list[Fault]:
    """``faults`` faults at distinct steps, at least 4 apart (a stop saves up to two steps later; a hang must
    come two steps after any resume point, so the watchdog is armed), kinds in a seeded shuffled cycle.
    Checkpoint-bound faults (``kill9-save``, ``enospc``) strike at checkpoint steps, the others off them."""
    rng = random.Random(seed)
    order: list[str] = []
    while len(order) < faults:
        cycle = list(kinds)
        rng.shuffle(cycle)
        order += cycle
    out: list[Fault] = []
    last = 4
    for i, kind in enumerate(order[:faults]):
        room = (steps - 6 - last) // max(1, faults - i)  # spread the faults over the run
        lo, hi = last + 4, last + 4 + max(0, room - 4)
        if kind in ("kill9-save", "enospc"):
            choices = [s for s in range(lo, hi + CKPT_EVERY + 1) if s % CKPT_EVERY == 0]
        else:
            choices = [s for s in range(lo, hi + 1) if s % CKPT_EVERY not in (0, 1, 2)]
        choices = [s for s in choices if s < steps - 3] or [s for s in range(lo, steps - 3)]
        if not choices:
            break
        step = rng.choice(choices)
        out.append(Fault(kind, step, rng.randrange(2)))
        last = step
    return out


# ---------------------------------------------------------------------------------------------- resources
class TmpfsOutput:
    """A size-limited tmpfs as the run's output directory (root only), so a full disk is real."""

    def __init__(self, path: Path, size_kb: int) -> None:
        self.path, self.size_kb, self.mounted = path, size_kb, False

    def mount(self) -> str | None:
        """Mount it; returns why it could not be, or None."""
        self.path.mkdir(parents=True, exist_ok=True)
        if os.geteuid() != 0:
            return "not root"
        proc = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={self.size_kb}k", "tmpfs", str(self.path)],
            capture_output=True,
            text=True,
            check=False,
        )
        if proc.returncode != 0:
            return f"mount failed: {proc.stderr.strip() or proc.returncode}"
        self.mounted = True
        return None

    def unmount(self) -> None:
        if self.mounted:
            subprocess.run(["umount", "-l", str(self.path)], check=False)
            self.mounted = False


class MlflowServer:
    """A real ``mlflow server`` (sqlite behind it) in its own session, killable and restartable in place."""

    def __init__(self, root: Path) -> None:
        self.root, self.port = root, free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    def start(self, timeout_s: float = 180.0) -> None:
        self.starts += 1
        env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
        cmd = [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(self.port)]
        cmd += ["--workers", "1", "--backend-store-uri", f"sqlite:///{self.root / 'mlflow.db'}"]
        cmd += ["--serve-artifacts", "--artifacts-destination", str(self.root / "artifacts")]
        with (self.root / f"server_{self.starts}.log").open("wb") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        t0 = time.monotonic()
        while not self.healthy():
            if self.proc.poll() is not None or time.monotonic() - t0 > timeout_s:
                raise RuntimeError(f"mlflow server did not start; see {self.root}/server_{self.starts}.log")
            time.sleep(0.5)

    def healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.uri}/health", timeout=1) as resp:
                return resp.status == 200
        except OSError:
            return False

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=30)


# ---------------------------------------------------------------------------------------------- checks
def final_state(out: Path, steps: int) -> dict[str, Any]:
    from tests.integration.test_exact_resume import checkpoint_contents

    return checkpoint_contents(out / "checkpoints" / f"step_{steps:08d}")


def mlflow_summary(uri: str, experiment: str) -> dict[str, Any]:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id]) if exp is not None else []
    out: dict[str, Any] = {"runs": len(runs)}
    if len(runs) == 1:
        run = runs[0]
        history = client.get_metric_history(run.info.run_id, "train/loss")
        out.update(
            status=run.info.status,
            restarts_tag=run.data.tags.get("restarts"),
            loss_steps=[m.step for m in sorted(history, key=lambda m: (m.step, m.timestamp))],
            loss={m.step: m.value for m in history},
        )
    return out


# ---------------------------------------------------------------------------------------------- the run
@dataclass
class Report:
    seed: int
    steps: int
    faults_planned: int
    skipped_kinds: dict[str, str] = field(default_factory=dict)
    faults: list[dict[str, Any]] = field(default_factory=list)
    launches: list[dict[str, Any]] = field(default_factory=list)
    injected: int = 0
    survived: int = 0
    steps_retrained: int = 0
    reference_wall_s: float = 0.0
    chaos_wall_s: float = 0.0
    wall_lost_s: float = 0.0
    checks: dict[str, Any] = field(default_factory=dict)
    passed: bool = False

    def table(self) -> str:
        rows = [f"{'#':>3}  {'fault':<11} {'step':>5} {'rank':>4}  {'launch':>6}  outcome"]
        for i, f in enumerate(self.faults, 1):
            launch = "-" if f["launch"] is None else str(f["launch"])
            rows.append(f"{i:>3}  {f['kind']:<11} {f['step']:>5} {f['rank']:>4}  {launch:>6}  {f['outcome']}")
        rows += [
            "",
            f"faults injected {self.injected}, survived {self.survived}; launches {len(self.launches)}; "
            f"steps re-trained {self.steps_retrained}",
            f"wall: chaos {self.chaos_wall_s:.0f} s, fault-free {self.reference_wall_s:.0f} s, "
            f"lost {self.wall_lost_s:.0f} s",
        ]
        rows += [f"check {k}: {v}" for k, v in self.checks.items()]
        if self.skipped_kinds:
            rows += [f"skipped {k}: {v}" for k, v in self.skipped_kinds.items()]
        rows.append("PASSED" if self.passed else "FAILED")
        return "\n".join(rows)


def _outcome(codes: list[int]) -> str:
    if any(c == 4 for c in codes):
        return f"hang reported (exit {codes}), relaunched"
    if all(c == 75 for c in codes):
        return "stopped cleanly (exit 75), relaunched"
    return f"ranks exited {codes}, relaunched"


def run_chaos(
    work: Path,
    shards: Path,
    steps: int,
    faults: int,
    seed: int,
    mlflow_server: bool,
    kinds: tuple[str, ...] = KINDS,
) -> Report:
    """The whole chaos run in ``work``; returns its report (``passed`` says whether every check held)."""
    work.mkdir(parents=True, exist_ok=True)
    kinds = tuple(k for k in kinds if k != "mlflow" or mlflow_server)
    report = Report(seed=seed, steps=steps, faults_planned=faults)
    if not mlflow_server:
        report.skipped_kinds["mlflow"] = "needs --mlflow-server"
    common = [
        *TINY,
        f"data.root={shards}",
        "data.batch_size=8",
        "data.shuffle_buffer=64",
        "diffusion.steps=20",
        "diffusion.timestep_sampler=loss-second-moment",
        "diffusion.history_per_term=1",
        "train.ema_rates=[0.9,0.99]",
        "train.zero_stage=2",
        "train.precision=fp32",
        f"train.total_steps={steps}",
        f"train.ckpt_every={CKPT_EVERY}",
        "train.keep_last=2",
        "train.log_every=1",
        "train.warmup_steps=3",
        "train.importance_plot_every=0",
        "train.hang_timeout_min=0.25",
        "train.collective_timeout_min=5",
        "tracking.experiment=chaos",
    ]
    # The fault-free run first: the reference, and a measure of a checkpoint's size for the tmpfs.
    ref_out = work / "reference"
    ref = launch_ranks(
        2,
        [*common, f"train.output_dir={ref_out}", f"tracking.uri=sqlite:///{work / 'ref.db'}"],
        work / "logs_reference",
        0,
        {},
    )
    if ref.codes != [0, 0]:
        raise RuntimeError(f"the fault-free run failed {ref.codes}; see {work / 'logs_reference'}")
    report.reference_wall_s = ref.wall_s
    ckpt_bytes = sum(
        f.stat().st_size for f in (ref_out / "checkpoints" / f"step_{steps:08d}").rglob("*") if f.is_file()
    )

    out = work / "out"
    tmpfs = TmpfsOutput(out, size_kb=(ckpt_bytes * 6) // 1024 + 1024)  # keep_last + 1 in flight, leftovers
    if "enospc" in kinds:
        why = tmpfs.mount()
        if why is not None:
            report.skipped_kinds["enospc"] = f"no tmpfs output directory ({why})"
            kinds = tuple(k for k in kinds if k != "enospc")
    schedule = make_schedule(seed, faults, steps, kinds)
    server = MlflowServer(work) if mlflow_server else None
    try:
        if server is not None:
            server.start()
        uri = server.uri if server is not None else f"sqlite:///{work / 'chaos.db'}"
        args = [*common, f"train.output_dir={out}", f"tracking.uri={uri}"]
        ack = work / "ack"
        t0 = time.monotonic()
        index = 0

        def watch(text: str) -> None:  # the MLflow fault's hand-shake with rank 0
            if server is None:
                return
            for what, step in re.findall(r"^chaos: mlflow (down|up)\? (\d+)", text, re.M):
                done = Path(f"{ack}.{step}.{what}")
                if not done.exists():
                    server.kill() if what == "down" else server.start()
                    done.touch()

        while True:
            index += 1
            pending = [f for f in schedule if f.launch is None]
            env = {
                "FAULTS": ",".join(f.spec for f in pending),
                "FAULT_ACK": str(ack),
                "SLURM_RESTART_COUNT": str(index - 1),
            }
            launch = launch_ranks(2, args, work / "logs", index, env, watch)
            report.launches.append(asdict(launch))
            for spec in launch.faults:
                for f in pending:
                    if f.spec == spec:
                        f.launch = index
                        f.outcome = _outcome(launch.codes) if launch.codes != [0, 0] else "run went on"
            (out / ".chaos_filler").unlink(missing_ok=True)  # a full disk that outlived its run is freed
            if launch.codes == [0, 0]:
                break
            if not launch.faults:
                raise RuntimeError(f"launch {index} failed {launch.codes} with no fault injected; see {work / 'logs'}")
            if index > 3 * faults + 5:
                raise RuntimeError(f"{index} launches and the run has not finished; see {work / 'logs'}")
        report.chaos_wall_s = round(time.monotonic() - t0, 1)
        report.wall_lost_s = round(report.chaos_wall_s - report.reference_wall_s, 1)
        starts = [la["resumed_from"] for la in report.launches]
        ends = [la["last_step"] for la in report.launches]
        report.steps_retrained = sum(max(0, end - nxt) for end, nxt in zip(ends[:-1], starts[1:], strict=True))
        for f in schedule:
            if f.launch is not None and f.outcome == "run went on" and f.kind == "mlflow":
                f.outcome = "server killed and restarted, run went on"
        report.faults = [asdict(f) for f in schedule]
        report.injected = sum(f.launch is not None for f in schedule)

        # ---- the checks
        from tests.integration.test_exact_resume import assert_identical

        try:
            worst = assert_identical(final_state(ref_out, steps), final_state(out, steps))
            report.checks["state bitwise equal to the fault-free run"] = worst == 0.0
        except AssertionError as err:
            report.checks["state bitwise equal to the fault-free run"] = f"no: {str(err)[:300]}"
        a = mlflow_summary(f"sqlite:///{work / 'ref.db'}", "chaos")
        b = mlflow_summary(uri, "chaos")
        report.checks["one MLflow run"] = b["runs"] == 1
        if b["runs"] == 1:
            report.checks["one loss point per step"] = b["loss_steps"] == list(range(1, steps + 1))
            report.checks["losses equal the fault-free run's"] = b["loss"] == a.get("loss")
            report.checks["restarts tag"] = f"{b['restarts_tag']} (launches - 1 = {index - 1})"
            report.checks["restart count recorded"] = b["restarts_tag"] == str(index - 1)
            report.checks["run status"] = b["status"]
        report.passed = all(v is True for k, v in report.checks.items() if k not in ("restarts tag", "run status"))
        report.passed = report.passed and b.get("status") == "FINISHED"
        report.survived = report.injected if report.passed else 0
        return report
    finally:
        if server is not None:
            server.kill()
        if tmpfs.mounted:
            # Keep the evidence: copy the run off the tmpfs before it goes.
            shutil.copytree(out, work / "out_copy", dirs_exist_ok=True, ignore=shutil.ignore_patterns(".chaos_filler"))
            tmpfs.unmount()


def build_shards(work: Path) -> Path:
    out = work / "digits16"
    if not (out / "manifest.json").is_file():
        cmd = [sys.executable, "-m", "data_prep", "make", "--source", "digits", "--out", str(out), "--image-size", "16"]
        cmd += ["--channels", "1", "--val-fraction", "0.1", "--max-per-shard", "256"]
        subprocess.run(cmd, cwd=REPO, env=child_env(), check=True, capture_output=True)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tests.chaos", description=__doc__.split("\n\n")[0])
    p.add_argument("--faults", type=int, default=20)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--mlflow-server", action="store_true", help="track to a real mlflow server, and kill it")
    p.add_argument("--kinds", default=",".join(KINDS), help="fault kinds to draw from (default: %(default)s)")
    p.add_argument("--work", type=Path, default=None, help="working directory (default: a new temporary one)")
    p.add_argument("--report", type=Path, default=None, help="write the report here as JSON")
    args = p.parse_args(argv)
    work = args.work or Path(tempfile.mkdtemp(prefix="chaos-"))
    print(f"chaos run in {work}: {args.faults} faults over {args.steps} steps, seed {args.seed}", flush=True)
    kinds = tuple(k for k in args.kinds.split(",") if k)
    unknown = sorted(set(kinds) - set(KINDS))
    if unknown:
        print(f"error: --kinds: unknown {', '.join(unknown)} (known: {', '.join(KINDS)})", file=sys.stderr)
        return 2
    report = run_chaos(work, build_shards(work), args.steps, args.faults, args.seed, args.mlflow_server, kinds)
    print(report.table())
    if args.report is not None:
        args.report.write_text(json.dumps(asdict(report), indent=2, default=str))
    return 0 if report.passed else 1


if __name__ == "__main__":
    sys.exit(main())
