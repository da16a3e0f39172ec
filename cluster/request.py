"""From a validated ``cluster:`` section to submitit's SLURM parameters and the sbatch script.

Pure functions (no SLURM calls) so the resource arithmetic and the rendered script can be checked
without a cluster. ``submit.py`` uses :func:`slurm_parameters` both for ``--dry-run`` (rendered
here) and for the real submission (handed to ``submitit.SlurmExecutor.update_parameters``), so the
script printed is the script submitted.
"""

from __future__ import annotations

import re
import shlex
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from submitit.slurm import slurm as submitit_slurm

from trainer.config import ClusterConfig


class RequestError(ValueError):
    """A resource request that cannot be submitted; the message fits on one line."""


# sbatch options that submitit writes itself: overriding them breaks its logs, signals or arrays.
RESERVED_SBATCH_KEYS = frozenset({"output", "error", "open-mode", "signal", "array", "wrap"})
# sbatch options with a first-class flag here: use the flag, so the config records the value.
FLAG_FOR_KEY = {
    "job-name": "--job-name",
    "partition": "--partition",
    "time": "--time",
    "nodes": "--nodes",
    "ntasks-per-node": "--tasks-per-node",
    "ntasks": "--nodes/--tasks-per-node",
    "cpus-per-task": "--cpus-per-task",
    "gpus-per-node": "--gpus-per-node",
    "mem": "--mem-gb",
    "qos": "--qos",
    "account": "--account",
    "constraint": "--constraint",
    "dependency": "--dependency",
    "exclusive": "--exclusive",
}

_TIME_RE = re.compile(r"^(?:(?P<days>\d+)-)?(?P<h>\d+):(?P<m>\d{1,2})(?::(?P<s>\d{1,2}))?$")


def parse_time_minutes(text: str) -> int:
    """``"90"`` → 90; ``"1:30:00"`` → 90; ``"2-00:00"`` → 2880 (SLURM's D-HH:MM[:SS]); seconds round up."""
    text = text.strip()
    if text.isdigit():
        minutes = int(text)
    else:
        match = _TIME_RE.match(text)
        if match is None:
            raise RequestError(f"--time {text!r}: expected minutes or [D-]HH:MM[:SS]")
        days, hours = int(match["days"] or 0), int(match["h"])
        mins, secs = int(match["m"]), int(match["s"] or 0)
        if mins >= 60 or secs >= 60:
            raise RequestError(f"--time {text!r}: minutes and seconds must be < 60")
        minutes = days * 1440 + hours * 60 + mins + (1 if secs else 0)
    if minutes < 1:
        raise RequestError(f"--time {text!r}: must be at least 1 minute")
    return minutes


def parse_slurm_arg(text: str) -> tuple[str, Any]:
    """``"mail-type=END"`` → ("mail-type", "END"); ``"requeue"`` → ("requeue", True)."""
    key, sep, value = text.partition("=")
    key = key.strip().lstrip("-").replace("_", "-")
    if not key:
        raise RequestError(f"--slurm-arg {text!r}: expected key=value")
    return key, (value if sep else True)


def check_slurm_args(args: dict[str, Any]) -> dict[str, Any]:
    """Normalise keys (dashes) and refuse those submitit owns or that have a first-class flag."""
    out: dict[str, Any] = {}
    for raw_key, value in args.items():
        key = str(raw_key).strip().lstrip("-").replace("_", "-")
        if key in RESERVED_SBATCH_KEYS:
            raise RequestError(f"slurm arg {key!r} is set by submitit (logs/signals) and cannot be overridden")
        if key in FLAG_FOR_KEY:
            raise RequestError(f"slurm arg {key!r}: use {FLAG_FOR_KEY[key]} (cluster.{_field(key)} in YAML)")
        out[key] = value
    return out


def _field(sbatch_key: str) -> str:
    return {"ntasks-per-node": "tasks_per_node", "mem": "mem_gb", "time": "time_min"}.get(
        sbatch_key, sbatch_key.replace("-", "_")
    )


def tasks_per_node(c: ClusterConfig) -> int:
    """One task per GPU; on CPU nodes ``tasks_per_node`` (default 1)."""
    if c.gpus_per_node > 0:
        if c.tasks_per_node is not None and c.tasks_per_node != c.gpus_per_node:
            raise RequestError(
                f"--tasks-per-node {c.tasks_per_node} conflicts with --gpus-per-node {c.gpus_per_node} "
                "(one task per GPU)"
            )
        return c.gpus_per_node
    return c.tasks_per_node if c.tasks_per_node is not None else 1


def world_size(c: ClusterConfig) -> int:
    return c.nodes * tasks_per_node(c)


@dataclass(frozen=True)
class GpuBinding:
    """How SLURM hands GPUs to the tasks, from ``cluster.slurm_args`` (``--gpus-per-task``, ``--gpu-bind``).

    The trainer (``trainer.distributed.select_device``) uses GPU LOCAL_RANK when a task sees every GPU of
    its node and its only GPU when SLURM binds one per task; the two flags choose between those.
    """

    gpus_per_task: int | None
    gpu_bind: str | None
    one_per_task: bool
    description: str


def _bind_kind(bind: str) -> tuple[str, str]:
    """``"verbose,single:1"`` → ("single", "1"); ``"closest"`` → ("closest", "")."""
    kind, _, arg = ",".join(p for p in bind.split(",") if p != "verbose").partition(":")
    return kind, arg


def gpu_binding(c: ClusterConfig) -> GpuBinding:
    """Validate the GPU-binding options of a request and say, in one line, which GPU each rank will use."""
    extra = check_slurm_args(c.slurm_args)
    raw_per_task, raw_bind = extra.get("gpus-per-task"), extra.get("gpu-bind")
    tpn = tasks_per_node(c)
    if c.gpus_per_node == 0:
        for key, value in (("gpus-per-task", raw_per_task), ("gpu-bind", raw_bind)):
            if value is not None:
                raise RequestError(f"--{key} needs --gpus-per-node (the GPUs of each node, one task per GPU)")
        return GpuBinding(None, None, False, f"no GPUs: {tpn} task(s)/node on CPU (gloo)")
    per_task = None
    if raw_per_task is not None:
        if str(raw_per_task) != "1":
            raise RequestError(
                f"--gpus-per-task {raw_per_task}: the trainer runs one process per GPU (use 1, or leave it out "
                "to let every task see all GPUs of its node)"
            )
        per_task = 1
    bind = None
    if raw_bind is not None:
        if raw_bind is True or not str(raw_bind).strip():
            raise RequestError("--gpu-bind needs a value, e.g. single:1")
        bind = str(raw_bind).strip()
        kind, arg = _bind_kind(bind)
        if kind == "single" and arg != "1":
            raise RequestError(
                f"--gpu-bind {bind}: puts {arg} tasks on each GPU; NCCL needs one GPU per rank (single:1)"
            )
        if kind == "per_task" and arg != "1":
            raise RequestError(
                f"--gpu-bind {bind}: gives each task {arg} GPUs, the trainer uses one per process (per_task:1)"
            )
    flags = " ".join(f"--{k}={v}" for k, v in (("gpus-per-task", per_task), ("gpu-bind", bind)) if v is not None)
    kind = _bind_kind(bind)[0] if bind is not None else ("per_task" if per_task else "")
    if kind in ("single", "per_task"):
        return GpuBinding(
            per_task, bind, True, f"{tpn} tasks/node, 1 GPU per task ({flags}): each rank uses its only visible GPU"
        )
    if kind in ("", "none"):
        how = f" ({flags})" if flags else ""
        return GpuBinding(
            per_task, bind, False, f"all {c.gpus_per_node} GPUs visible to every task{how}: rank uses GPU LOCAL_RANK"
        )
    return GpuBinding(
        per_task,
        bind,
        False,
        f"{tpn} tasks/node, site binding ({flags}): a rank that sees all {c.gpus_per_node} GPUs uses GPU "
        "LOCAL_RANK, one that sees a single GPU uses it; fewer GPUs than ranks is refused at start",
    )


def mem_string(mem_gb: float) -> str:
    """Per-node memory as sbatch wants it: whole GB as ``16GB``, fractions in MB."""
    return f"{int(mem_gb)}GB" if mem_gb == int(mem_gb) else f"{round(mem_gb * 1024)}MB"


def check_partition(partition: str | None, available: Sequence[str] | None) -> None:
    """Refuse an unknown partition when the cluster's list is known (``None``: cannot check)."""
    if partition is None or available is None:
        return
    if partition not in available:
        raise RequestError(f"unknown partition {partition!r} (available: {', '.join(available) or 'none'})")


def slurm_parameters(c: ClusterConfig, repo_root: Path) -> dict[str, Any]:
    """The ``SlurmExecutor.update_parameters`` keyword arguments for this request."""
    params: dict[str, Any] = {
        "job_name": c.job_name,
        "time": c.time_min,
        "nodes": c.nodes,
        "ntasks_per_node": tasks_per_node(c),
        "cpus_per_task": c.cpus_per_task,
        "signal_delay_s": c.signal_delay_s,
        # A rank that dies must take the others down; otherwise they wait in a collective until the
        # backend's timeout (30 min gloo, 10 min NCCL) while the allocation burns.
        "srun_args": ["--kill-on-bad-exit=1"],
        # The job imports cluster.job and trainer from this checkout even when it is not installed.
        "setup": [f"export PYTHONPATH={shlex.quote(str(repo_root))}${{PYTHONPATH:+:$PYTHONPATH}}", *c.setup],
    }
    optional = {
        "gpus_per_node": c.gpus_per_node or None,
        "mem": mem_string(c.mem_gb) if c.mem_gb is not None else None,
        "partition": c.partition,
        "account": c.account,
        "qos": c.qos,
        "constraint": c.constraint,
        "dependency": c.dependency,
        "exclusive": True if c.exclusive else None,
    }
    params.update({k: v for k, v in optional.items() if v is not None})
    extra = check_slurm_args(c.slurm_args)
    binding = gpu_binding(c)
    if binding.gpus_per_task is not None:
        # GPUs by task instead of by node (same total): SLURM then binds one GPU to each task. sbatch refuses
        # --gpus-per-task without a task count (--ntasks), whatever --nodes/--ntasks-per-node say.
        del extra["gpus-per-task"]
        del params["gpus_per_node"]
        params["gpus_per_task"] = binding.gpus_per_task
        extra["ntasks"] = world_size(c)
    if binding.gpu_bind is not None:
        # On srun too: the binding happens when the step starts its tasks (sbatch only forwards it).
        params["srun_args"].append(f"--gpu-bind={binding.gpu_bind}")
    if extra:
        params["additional_parameters"] = extra
    return params


def submitit_command(folder: str | Path, python: str | None = None) -> str:
    """The command line submitit runs in every task (same form as ``SlurmExecutor``'s)."""
    return " ".join([python or shlex.quote(sys.executable), "-u -m submitit.core._submit", shlex.quote(str(folder))])


def render_sbatch(params: dict[str, Any], folder: str | Path) -> str:
    """The sbatch script submitit would write for these parameters."""
    return submitit_slurm._make_sbatch_string(command=submitit_command(folder), folder=folder, **params)
