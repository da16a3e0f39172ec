"""Distributed setup: the one module that reads the launcher's environment.

Every launcher we support ends up here with the same standard variables:
``torchrun`` and the ``deepspeed`` launcher set RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR and
MASTER_PORT; the SLURM path (``cluster/``) exports them from the SLURM environment through submitit
before calling the trainer; a plain ``python trainer/main.py`` has none of them and runs as a world
of one. Device, dtype and backend are chosen here and nowhere else.
"""

from __future__ import annotations

import os
import socket
import warnings
from dataclasses import dataclass
from typing import TypeVar

import torch
import torch.distributed as dist

T = TypeVar("T")

_REQUIRED = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


class LauncherError(RuntimeError):
    """The launcher's environment is incomplete or inconsistent."""


@dataclass(frozen=True)
class DistEnv:
    rank: int
    local_rank: int
    world_size: int
    local_world_size: int
    device: torch.device
    backend: str

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def free_port() -> int:
    """A TCP port that is free right now on this host (fixed ports collide between concurrent runs)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _read_env() -> tuple[int, int, int, int]:
    env = os.environ
    present = [k for k in _REQUIRED if k in env]
    if not present:
        # A plain single process: give DeepSpeed a complete world of one. Without LOCAL_RANK it would
        # try MPI discovery (mpi4py) and fail.
        env.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    else:
        missing = [k for k in _REQUIRED if k not in env]
        if missing:
            raise LauncherError(
                f"incomplete distributed environment: {', '.join(missing)} not set "
                f"(set all of {', '.join(_REQUIRED)}, or use torchrun / deepspeed / cluster/submit.py)"
            )
    rank, local_rank, world = int(env["RANK"]), int(env["LOCAL_RANK"]), int(env["WORLD_SIZE"])
    # torchrun: LOCAL_WORLD_SIZE; deepspeed launcher: LOCAL_SIZE; SLURM: e.g. "4" or "2(x3)".
    local = env.get("LOCAL_WORLD_SIZE") or env.get("LOCAL_SIZE") or env.get("SLURM_NTASKS_PER_NODE", "0")
    local_world = int(local.split("(")[0] or 0)
    if local_world <= 0:
        local_world = world
    return rank, local_rank, world, local_world


def _pick_device(local_rank: int) -> tuple[torch.device, str]:
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank % torch.cuda.device_count())
        return torch.device("cuda", torch.cuda.current_device()), "nccl"
    return torch.device("cpu"), "gloo"


def _limit_cpu_threads(local_world: int) -> None:
    # The deepspeed launcher does not set OMP_NUM_THREADS; N processes each using every core run
    # ~10x slower from oversubscription (FACTS.md). Share the cores unless the user chose a number.
    if "OMP_NUM_THREADS" not in os.environ:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        torch.set_num_threads(max(1, cores // max(1, local_world)))


def _skip_cpu_shm_op_build() -> None:
    # On the CPU accelerator DeepSpeed JIT-compiles its shared-memory all-reduce op (40-220 s of g++)
    # at init_distributed. That op only serves inference all-reduce; training uses gloo. DeepSpeed
    # consults this dict before building (and documents that edits to it persist).
    import deepspeed.ops

    deepspeed.ops.__dict__.setdefault("__compatible_ops__", {})["deepspeed_shm_comm"] = False


def init_distributed() -> DistEnv:
    """Read the launcher's environment, pick device and backend, and initialise the process group."""
    rank, local_rank, world, local_world = _read_env()
    # DeepSpeed's ZeRO calls a torch collective that torch has renamed; the warning repeats every step.
    warnings.filterwarnings("ignore", message=".*all_gather_into_tensor.*", category=FutureWarning)
    device, backend = _pick_device(local_rank)
    if device.type == "cpu":
        _limit_cpu_threads(local_world)
        _skip_cpu_shm_op_build()
    import deepspeed

    deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False)
    return DistEnv(rank, local_rank, world, local_world, device, backend)


def restart_count() -> int:
    """How many times the scheduler restarted this job (SLURM requeue), 0 outside SLURM."""
    return int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0)


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def any_rank(flag: bool, device: torch.device) -> bool:
    """True on every rank when ``flag`` is true on at least one (a MAX all-reduce)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


def agree(flags: torch.Tensor) -> list[bool]:
    """Per entry of a small float vector on the device: True on every rank when it is non-zero on at
    least one (one MAX all-reduce, one host read)."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        flags = flags.clone()
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
    return [v > 0 for v in flags.tolist()]


def broadcast_object(value: T, device: torch.device, src: int = 0) -> T:
    """Send a small picklable value from ``src`` to every rank (our own processes: trusted data)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return value
    obj = [value]
    dist.broadcast_object_list(obj, src=src, device=device)
    return obj[0]


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
