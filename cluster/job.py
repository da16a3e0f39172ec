"""The callable submitit runs in every SLURM task (or local process): distributed env, then trainer.main.

It is pickled at submission and unpickled in the job, so this module must stay importable there
(``submit.py`` puts the checkout on PYTHONPATH) and light: torch is imported only inside the call,
after OMP_NUM_THREADS is settled.

Requeue, end to end:
1. SLURM sends SIGUSR2 ``signal_delay_s`` before the time limit (or SIGTERM at preemption) to every task.
2. The trainer's handlers (``trainer.preemption``) only set a flag; at the next step boundary all ranks
   agree, save a checkpoint together, and ``main`` returns ``EXIT_PREEMPTED``.
3. Every rank then hands the signal to the handler the trainer replaced: submitit's. On rank 0 that is
   ``checkpoint_and_try_requeue``: it calls :meth:`TrainJob.checkpoint` (a copy resuming with
   ``--resume auto``), stores it as the job's new pickle, runs ``scontrol requeue`` and exits.
4. The requeued job starts with ``SLURM_RESTART_COUNT`` incremented; the trainer resumes from the
   newest checkpoint, in the same MLflow run, and logs the restart count.

A run the hang watchdog stopped (``trainer/watchdog.py``, exit 4) is never requeued: the job fails.
"""

from __future__ import annotations

import os
import sys
import zlib
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import submitit
from submitit.helpers import Checkpointable, DelayedSubmission, TorchDistributedEnvironment

# MASTER_PORT lies in [20000, 32767]: below Linux's ephemeral range (32768-60999 by default), from which the
# kernel hands out the local ports of outgoing connections, so a busy first node cannot have taken it.
MASTER_PORT_RANGE = (20000, 32767)


def master_port_for_job(job_id: str) -> int:
    """The rendezvous port of a job: the same on every task and every requeue, different between jobs.

    Numeric job ids map to consecutive ports, so two jobs whose ids are less than 12768 apart (the ones
    likely to share a first node at the same time) never collide; other ids (e.g. ``"123_4"``) go through
    a stable hash (crc32, not Python's salted ``hash``: every task must compute the same port).
    """
    low, high = MASTER_PORT_RANGE
    number = int(job_id) if job_id.isdigit() else zlib.crc32(job_id.encode())
    return low + number % (high - low + 1)


def export_torch_env() -> TorchDistributedEnvironment:
    """Export RANK/WORLD_SIZE/LOCAL_RANK/LOCAL_WORLD_SIZE/MASTER_ADDR/MASTER_PORT from the SLURM (or local) job.

    The master is the first node of the allocation; the port comes from :func:`master_port_for_job`.
    """
    # sbatch copies the submitting shell's environment into the job: a MASTER_PORT exported there (say,
    # from a torchrun session) would be the same for every job. submitit would keep it; we never do.
    os.environ.pop("MASTER_PORT", None)
    dist_env = TorchDistributedEnvironment()
    dist_env.master_port = master_port_for_job(submitit.JobEnvironment().raw_job_id)
    # CUDA_VISIBLE_DEVICES is left alone: trainer.distributed.select_device picks the GPU from what each task
    # sees. Every GPU of the node visible (--gpus-per-node): GPU LOCAL_RANK. SLURM binds one GPU per task
    # (--gpus-per-task=1, --gpu-bind=single:1, per-task cgroups): the task's only GPU, with LOCAL_RANK
    # exported as 0 for DeepSpeed. Fewer visible GPUs than ranks on the node otherwise: refused in one line.
    return dist_env.export(set_cuda_visible_devices=False, overwrite=True)


@dataclass(frozen=True)
class TaskReport:
    """What one task saw and how it ended (``job.results()`` holds one per task)."""

    rank: int
    local_rank: int
    world_size: int
    node: int
    master_addr: str
    master_port: int
    resume: str
    restarts: int
    """SLURM_RESTART_COUNT as this attempt saw it."""
    exit_code: int
    preempted: bool

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class TrainingFailed(RuntimeError):
    """The trainer returned a failure status (the job then ends FAILED, not COMPLETED)."""


ENTRIES = {"train": "trainer.main", "sample": "trainer.sample", "evaluate": "trainer.evaluate"}
"""What a job can run: the module whose ``main(argv)`` every task calls."""


@dataclass
class TrainJob(Checkpointable):
    """``trainer.main.main(["--config", config, "--resume", resume, *overrides])`` in a distributed task, or
    with ``entry`` "sample" / "evaluate" that tool's ``main(entry_args)`` (both resume from their finished
    parts when rerun, so a requeue continues them too)."""

    config: str
    """Absolute path of the YAML config."""
    overrides: list[str] = field(default_factory=list)
    resume: str = "auto"
    """``auto`` also on the first start: a requeue by SLURM itself (preemption) reuses this pickle."""
    omp_threads: int = 1
    """OMP_NUM_THREADS for each task unless the environment already sets it (cpus per task)."""
    entry: str = "train"
    entry_args: list[str] = field(default_factory=list)
    """Arguments of ``trainer/sample.py`` or ``trainer/evaluate.py`` when ``entry`` names one of them."""

    def argv(self, resume: str | None = None) -> list[str]:
        if self.entry != "train":
            return list(self.entry_args)
        return ["--config", self.config, "--resume", resume or self.resume, *self.overrides]

    def call(self) -> str:
        """How each task calls the entry point (for --dry-run)."""
        return f"{ENTRIES[self.entry]}.main({self.argv()!r})"

    def __call__(self) -> TaskReport:
        os.environ.setdefault("OMP_NUM_THREADS", str(self.omp_threads))
        dist_env = export_torch_env()
        job_env = submitit.JobEnvironment()

        import importlib

        from trainer import distributed, preemption

        main = importlib.import_module(ENTRIES[self.entry]).main

        # A job requeued by SLURM (not by us) restarts from the pickle as submitted: resume anyway.
        resume = "auto" if distributed.restart_count() > 0 else self.resume
        print(
            f"[cluster.job] rank {dist_env.rank}/{dist_env.world_size} local {dist_env.local_rank} "
            f"node {job_env.node} master {dist_env.master_addr}:{dist_env.master_port} "
            f"restarts {distributed.restart_count()} resume {resume}",
            flush=True,
        )
        code = main(self.argv(resume))
        report = TaskReport(
            rank=dist_env.rank,
            local_rank=dist_env.local_rank,
            world_size=dist_env.world_size,
            node=job_env.node,
            master_addr=dist_env.master_addr,
            master_port=dist_env.master_port,
            resume=resume,
            restarts=distributed.restart_count(),
            exit_code=code,
            preempted=code == preemption.EXIT_PREEMPTED,
        )
        if report.preempted:
            sys.stdout.flush()
            # Rank 0: submitit checkpoints this callable, requeues the job and exits the process here.
            # Other ranks (and a plain SIGTERM, which submitit only logs) return the report.
            preemption.forward_to_previous_handler()
            return report
        if code != 0:
            raise TrainingFailed(f"{ENTRIES[self.entry]} returned {code} on rank {dist_env.rank}")
        return report

    def checkpoint(self, *args: Any, **kwargs: Any) -> DelayedSubmission:
        """Called by submitit on rank 0 before requeueing: the same job, resuming from its checkpoint."""
        return DelayedSubmission(replace(self, resume="auto"))
