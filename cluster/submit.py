"""Submit a training run to SLURM (or run it locally) through submitit.

    python cluster/submit.py --config configs/quickstart.yaml --nodes 4 --gpus-per-node 8 \\
        --partition gpu --time 24:00:00 [--follow] [train.lr=2e-4 ...]
    python cluster/submit.py --config configs/quickstart.yaml --nodes 4 --tasks-per-node 1 --dry-run
    python cluster/submit.py --config configs/quickstart.yaml --local --tasks-per-node 2

Resources come from the config's ``cluster:`` section, with these flags on top; dotted overrides apply
to the whole config (``cluster.*`` included) before the flags. Every task runs ``cluster.job.TrainJob``:
the same ``trainer.main.main`` that ``torchrun``/``deepspeed`` call, with RANK/WORLD_SIZE/... exported
from the SLURM environment. The job is requeued after SIGUSR2 (time limit) or preemption and resumes
with ``--resume auto`` in the same MLflow run. Every input error is reported on one line, before
anything is submitted.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):
    # Run as a script from a checkout: make `cluster` and `trainer` importable.
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse
import contextlib
import io
import os
import shlex
import shutil
import subprocess
import time
from collections.abc import Sequence
from typing import Any, TextIO

import submitit
from pydantic import ValidationError

from cluster import monitor
from cluster.job import ENTRIES, TrainJob
from cluster.request import (
    RequestError,
    check_partition,
    gpu_binding,
    parse_slurm_arg,
    parse_time_minutes,
    render_sbatch,
    slurm_parameters,
    tasks_per_node,
    world_size,
)
from trainer.config import ClusterConfig, Config, ConfigError, dump_config, load_config

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = "configs/quickstart.yaml"
"""The config trainer/main.py trains without --config (relative to the working directory, as there)."""

# flag dest → ClusterConfig field (flags left at None keep the config's value).
_FLAG_FIELDS = {
    "nodes": "nodes",
    "gpus_per_node": "gpus_per_node",
    "tasks_per_node": "tasks_per_node",
    "cpus_per_task": "cpus_per_task",
    "mem_gb": "mem_gb",
    "partition": "partition",
    "account": "account",
    "qos": "qos",
    "constraint": "constraint",
    "exclusive": "exclusive",
    "job_name": "job_name",
    "folder": "folder",
    "dependency": "dependency",
    "max_requeues": "max_requeues",
    "signal_delay_s": "signal_delay_s",
}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="cluster/submit.py",
        description="Submit Improved-DDPM training to SLURM via submitit (requeue on preemption/time limit).",
    )
    p.add_argument(
        "--config",
        default=DEFAULT_CONFIG,
        help="YAML config; its cluster: section gives the defaults (default: %(default)s, as trainer/main.py)",
    )
    p.add_argument("overrides", nargs="*", help="dotted config overrides, e.g. train.total_steps=1000")
    r = p.add_argument_group("resources (default: the config's cluster: section)")
    r.add_argument("--nodes", type=int)
    r.add_argument("--gpus-per-node", type=int, help="one task per GPU")
    r.add_argument(
        "--gpus-per-task", type=int, metavar="1",
        help="request the GPUs per task: SLURM binds one GPU to each task (with --gpus-per-node)",
    )  # fmt: skip
    r.add_argument(
        "--gpu-bind", metavar="TYPE",
        help="SLURM GPU binding, e.g. single:1 (one GPU per task) or none (every task sees all)",
    )  # fmt: skip
    r.add_argument("--tasks-per-node", type=int, help="processes per node on CPU-only nodes")
    r.add_argument("--cpus-per-task", type=int)
    r.add_argument("--mem-gb", type=float, help="memory per node")
    r.add_argument("--time", help="time limit: minutes, or [D-]HH:MM[:SS]")
    r.add_argument("--partition")
    r.add_argument("--account")
    r.add_argument("--qos")
    r.add_argument("--constraint")
    r.add_argument("--exclusive", action=argparse.BooleanOptionalAction, default=None)
    r.add_argument("--job-name")
    r.add_argument("--folder", help="submitit folder for scripts and logs (%%j = job id)")
    r.add_argument("--dependency", help="e.g. afterok:1234")
    r.add_argument(
        "--slurm-arg", action="append", default=[], metavar="KEY=VALUE",
        help="extra #SBATCH --KEY=VALUE line (repeatable; bare KEY for a flag)",
    )  # fmt: skip
    r.add_argument("--setup", action="append", default=[], help="shell line run before the tasks (repeatable)")
    r.add_argument("--max-requeues", type=int, help="requeues allowed after time limits")
    r.add_argument("--signal-delay-s", type=int, help="seconds before the limit at which SIGUSR2 arrives")
    m = p.add_argument_group("mode")
    m.add_argument("--resume", default="auto", help="auto (default), none, or a checkpoint path")
    m.add_argument(
        "--entry",
        choices=sorted(ENTRIES),
        default="train",
        help="what the tasks run: train (default), or distributed sampling / evaluation of a trained run",
    )
    m.add_argument(
        "--entry-args",
        default="",
        help='arguments of trainer/sample.py or trainer/evaluate.py, e.g. "runs/x --num-samples 50000"',
    )
    m.add_argument("--dry-run", action="store_true", help="print the sbatch script and config; submit nothing")
    m.add_argument("--local", action="store_true", help="run here with submitit's local executor (implies --follow)")
    m.add_argument("--follow", action="store_true", help="tail rank 0's log until the job ends")
    m.add_argument("--skip-data-check", action="store_true", help="do not require data.root/manifest.json here")
    return p


# ------------------------------------------------------------------------------------------ planning


class SubmitError(ValueError):
    """Refused before submission; one line."""


def resolve_config(args: argparse.Namespace) -> Config:
    """Config file + overrides, then the command-line flags on its cluster section."""
    cfg = load_config(args.config, args.overrides)
    cluster = cfg.cluster
    updates: dict[str, Any] = {f: getattr(args, dest) for dest, f in _FLAG_FIELDS.items()}
    if args.time is not None:
        updates["time_min"] = parse_time_minutes(args.time)
    if args.slurm_arg:
        updates["slurm_args"] = {**cluster.slurm_args, **dict(parse_slurm_arg(a) for a in args.slurm_arg)}
    # The binding flags are sbatch options like --slurm-arg's, kept in cluster.slurm_args (so the resolved
    # config records them); request.gpu_binding validates them.
    binding = {k: v for k, v in (("gpus-per-task", args.gpus_per_task), ("gpu-bind", args.gpu_bind)) if v is not None}
    if binding:
        updates["slurm_args"] = {**updates.get("slurm_args", cluster.slurm_args), **binding}
    if args.setup:
        updates["setup"] = [*cluster.setup, *args.setup]
    for name, value in updates.items():
        if value is None:
            continue
        try:
            setattr(cluster, name, value)  # validate_assignment: same limits as the YAML
        except ValidationError as err:
            first = err.errors()[0]
            raise SubmitError(
                f"--{name.replace('_', '-')} {value!r}: {first['msg'].removeprefix('Value error, ')}"
            ) from None
    return cfg


def available_partitions() -> list[str] | None:
    """Partitions of the reachable cluster (``None`` when there is no ``sinfo`` to ask)."""
    if shutil.which("sinfo") is None:
        return None
    proc = subprocess.run(["sinfo", "-h", "-o", "%R"], capture_output=True, text=True, timeout=60, check=False)
    if proc.returncode != 0:
        return None
    return sorted({line.strip() for line in proc.stdout.splitlines() if line.strip()})


def slurm_available() -> bool:
    """Whether this machine can submit to SLURM (``sbatch`` on PATH)."""
    return shutil.which("sbatch") is not None


def preflight(cfg: Config, args: argparse.Namespace, partitions: Sequence[str] | None) -> None:
    c = cfg.cluster
    slurm_parameters(c, REPO_ROOT)  # raises on a GPU/task conflict or a reserved --slurm-arg
    if args.local:
        if c.nodes != 1:
            raise SubmitError(f"--local runs on this machine only: --nodes must be 1 (got {c.nodes})")
    else:
        if not args.dry_run and not slurm_available():
            raise SubmitError(
                "no SLURM on this machine (sbatch not found on PATH): run on this machine with --local "
                "(one node), or see the job script with --dry-run"
            )
        check_partition(c.partition, partitions)
    if args.resume not in ("auto", "none") and not Path(args.resume).exists():
        raise SubmitError(f"--resume {args.resume}: no such checkpoint")
    if args.entry != "train":
        if not args.entry_args.strip():
            raise SubmitError(f"--entry {args.entry} needs --entry-args (at least the run or export to use)")
        return  # the tool reads its data (if any) from the run it is given
    if args.entry_args:
        raise SubmitError("--entry-args goes with --entry sample or evaluate (training takes config overrides)")
    manifest = Path(cfg.data.root) / "manifest.json"
    if not args.skip_data_check and not manifest.is_file():
        raise SubmitError(
            f"data.root: no manifest.json in {cfg.data.root} (build shards with `python -m data_prep make`, "
            "or pass --skip-data-check if it exists only on the compute nodes)"
        )


def make_job(cfg: Config, args: argparse.Namespace) -> TrainJob:
    return TrainJob(
        config=str(Path(args.config).resolve()),
        overrides=list(args.overrides),
        resume=args.resume,
        omp_threads=cfg.cluster.cpus_per_task,
        entry=args.entry,
        entry_args=shlex.split(args.entry_args),
    )


def job_folder_template(cfg: Config) -> Path:
    return Path(cfg.cluster.folder).expanduser().absolute()


# ------------------------------------------------------------------------------------------ actions


def dry_run(cfg: Config, job: TrainJob, out: TextIO | None = None) -> None:
    out = out or sys.stdout
    params = slurm_parameters(cfg.cluster, REPO_ROOT)
    folder = job_folder_template(cfg)
    c = cfg.cluster
    out.write("# ---- sbatch script (not submitted) ----\n")
    out.write(render_sbatch(params, folder))
    out.write(
        f"\n# ---- each of the {world_size(c)} tasks ({c.nodes} nodes x {tasks_per_node(c)}) runs ----\n"
        f"# {job.call()}\n"
        "# with RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR/MASTER_PORT from SLURM, "
        f"OMP_NUM_THREADS={job.omp_threads}\n"
        f"# binding: {gpu_binding(c).description}\n"
        "# ---- resolved config ----\n"
    )
    out.write(dump_config(cfg))
    out.flush()


def make_executor(cfg: Config, local: bool) -> submitit.core.core.Executor:
    c = cfg.cluster
    folder = job_folder_template(cfg)
    if local:
        # The local controller copies this process's environment into every task.
        os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH")) if p)
        executor = submitit.LocalExecutor(folder=folder)
        executor.update_parameters(
            timeout_min=c.time_min,
            tasks_per_node=tasks_per_node(c),
            gpus_per_node=c.gpus_per_node,
            signal_delay_s=c.signal_delay_s,
        )
        return executor
    executor = submitit.SlurmExecutor(folder=folder, max_num_timeout=c.max_requeues)
    executor.update_parameters(**slurm_parameters(c, REPO_ROOT))
    return executor


def submit(cfg: Config, job: TrainJob, local: bool) -> tuple[submitit.Job[Any], monitor.SubmissionRecord]:
    executor = make_executor(cfg, local)
    try:
        # submitit echoes sbatch's stderr before raising; the error below says it in one line.
        with contextlib.redirect_stderr(io.StringIO()):
            sub = executor.submit(job)
    except submitit.core.utils.FailedJobError as err:
        lines = [ln for ln in str(err).splitlines() if ln.strip()]
        raise SubmitError(f"sbatch refused the job: {lines[-1] if lines else err}") from None
    c = cfg.cluster
    record = monitor.SubmissionRecord(
        job_id=str(sub.job_id),
        executor="local" if local else "slurm",
        job_name=c.job_name,
        config=job.config,
        overrides=job.overrides,
        output_dir=str(Path(cfg.train.output_dir).absolute()),
        folder=str(sub.paths.folder),
        folder_template=str(job_folder_template(cfg)),
        stdout=str(sub.paths.stdout),
        stderr=str(sub.paths.stderr),
        nodes=c.nodes,
        tasks_per_node=tasks_per_node(c),
        submitted_at=time.time(),
        tracking_uri=cfg.tracking.uri,
        experiment=cfg.tracking.experiment,
    )
    record.write()
    return sub, record


def describe(record: monitor.SubmissionRecord, tracking_enabled: bool, resume: str) -> str:
    lines = [
        f"submitted job {record.job_id} ({record.executor}: {record.nodes} node(s) x {record.tasks_per_node} task(s))",
        f"  rank 0 log: {record.stdout}",
        f"              {record.stderr}",
        f"  output:     {record.output_dir}",
    ]
    if tracking_enabled:
        run_id = monitor.read_run_info(record.output_dir).get("mlflow_run_id") if resume != "none" else None
        where = f"{record.tracking_uri}, experiment {record.experiment!r}"
        if run_id:
            lines.append(f"  MLflow:     run {run_id} resumes ({monitor.mlflow_link(record.tracking_uri, run_id)})")
        else:
            lines.append(f"  MLflow:     {where}; the run id lands in {record.output_dir}/run_info.json at start")
    root = monitor.folder_root(record.folder_template)
    default = Path(monitor.folder_root(ClusterConfig().folder)).absolute()
    lines.append("  status:     python -m cluster.status" + ("" if root == default else f" --folder {root}"))
    return "\n".join(lines)


def job_state(sub: submitit.Job[Any]) -> str:
    """squeue/sacct's state for a SLURM job; for a local job, the process and rank 0's result file."""
    if isinstance(sub, submitit.LocalJob):
        process_state = sub.state
        if process_state == "RUNNING":
            return "RUNNING"
        if process_state == "INTERRUPTED":
            return "CANCELLED"
        state = monitor.local_state(Path(sub.paths.folder), str(sub.job_id))
        return state if state in monitor.FINAL_STATES else "FAILED"
    return monitor.slurm_states([str(sub.job_id)]).get(str(sub.job_id), "UNKNOWN")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_intermixed_args(argv)
    try:
        cfg = resolve_config(args)
        preflight(cfg, args, None if args.local else available_partitions())
        job = make_job(cfg, args)
        if args.dry_run:
            dry_run(cfg, job)
            return 0
        sub, record = submit(cfg, job, args.local)
    except (ConfigError, RequestError, SubmitError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(describe(record, cfg.tracking.enabled, args.resume), flush=True)
    if not (args.follow or args.local):  # a local run lives in this process's children: watch it
        return 0
    final = monitor.follow(
        lambda: job_state(sub),
        [Path(record.stdout), Path(record.stderr)],
        Path(record.output_dir),
        cfg.tracking.uri,
    )
    restarts = monitor.read_run_info(record.output_dir).get("restarts", 0)
    print(f"[submit] job {record.job_id} ended: {final} (restarts: {restarts})", flush=True)
    return 0 if final == "COMPLETED" else 1


def cli() -> None:
    sys.exit(main())


if __name__ == "__main__":
    cli()
