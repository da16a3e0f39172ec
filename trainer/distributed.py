"""Distributed setup: the one module that reads the launcher's environment.

Every launcher we support ends up here with the same standard variables:
``torchrun`` and the ``deepspeed`` launcher set RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR and
MASTER_PORT; the SLURM path (``cluster/``) exports them from the SLURM environment through submitit
before calling the trainer; a plain ``python trainer/main.py`` has none of them and runs as a world
of one. Device, dtype and backend are chosen here and nowhere else.

GPU binding: a rank uses the GPU at position LOCAL_RANK among those it can see when it sees one per rank
of its node (torchrun, the deepspeed launcher, SLURM with ``--gpus-per-node``), and its only GPU where
SLURM binds one GPU per task (``--gpus-per-task=1``, ``--gpu-bind=single:1``, per-task cgroups). DeepSpeed
itself calls ``set_device(LOCAL_RANK)`` and binds the process group to ``cuda:LOCAL_RANK``, so LOCAL_RANK
is rewritten to the chosen index before DeepSpeed starts (:func:`select_device`).
"""

from __future__ import annotations

import datetime
import os
import socket
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal, TypeVar

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
    """The launcher's LOCAL_RANK (this process's position on its node), not necessarily its CUDA index."""
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


def _env_int(env: Mapping[str, str], key: str) -> int:
    value = env[key]
    try:
        return int(value)
    except ValueError:
        raise LauncherError(f"{key}={value!r} is not an integer") from None


def _local_world_size(env: Mapping[str, str]) -> int | None:
    """Processes on this node as the launcher states it; None when it does not say."""
    # torchrun: LOCAL_WORLD_SIZE; deepspeed launcher: LOCAL_SIZE; SLURM: e.g. "4" or "2(x3)".
    local = env.get("LOCAL_WORLD_SIZE") or env.get("LOCAL_SIZE") or env.get("SLURM_NTASKS_PER_NODE", "")
    head = local.split("(")[0]
    return int(head) if head.isdigit() and int(head) > 0 else None


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
    rank, local_rank, world = _env_int(env, "RANK"), _env_int(env, "LOCAL_RANK"), _env_int(env, "WORLD_SIZE")
    return rank, local_rank, world, _local_world_size(env) or world


@dataclass(frozen=True)
class DeviceChoice:
    """Where one rank runs, decided from its environment and what it can see (:func:`select_device`)."""

    index: int | None
    """CUDA device index among the devices this process sees; None on CPU."""
    local_rank: int
    """LOCAL_RANK to export before DeepSpeed starts. DeepSpeed's engine calls ``set_device(LOCAL_RANK)``
    and its process group binds ``cuda:LOCAL_RANK``, so on CUDA this equals ``index``."""
    launcher_local_rank: int
    """LOCAL_RANK as the launcher set it: the rank's position on its node."""
    backend: Literal["nccl", "gloo"]
    binding: Literal["all-visible", "one-per-task", "cpu"]
    description: str
    """One line for the log, e.g. ``cuda:0, the only GPU this task sees (one GPU per task: gpus-per-task 1) ...``."""


_REMEDY = "start at most one task per visible GPU, or bind one GPU per task (--gpus-per-task=1 or --gpu-bind=single:1)"


def _gpu_bind(env: Mapping[str, str]) -> str:
    """The task's GPU binding as SLURM states it, without ``verbose,`` ("" when unset): SLURM_GPU_BIND, or
    the ``gres/gpu:`` part of SLURM_TRES_BIND (newer SLURM keeps ``--gpu-bind`` and the ``per_task:N``
    that ``--gpus-per-task`` implies there)."""
    bind = env.get("SLURM_GPU_BIND", "")
    if not bind:
        tres = [t for t in env.get("SLURM_TRES_BIND", "").split("+") if t.startswith("gres/gpu:")]
        bind = tres[0].removeprefix("gres/gpu:") if tres else ""
    return ",".join(p for p in bind.split(",") if p and p != "verbose")


def _bound_to_one_gpu(env: Mapping[str, str], local_world: int | None) -> str | None:
    """Why this task sees exactly one GPU of its own (SLURM per-task binding), or None if nothing says so.

    Only called when the process sees one device while its node runs several ranks: then either SLURM gave
    every task its own GPU (fine: use it), or the ranks share one GPU (NCCL refuses; so do we).
    """
    bind = _gpu_bind(env)
    kind, _, count = bind.partition(":")
    if kind in ("single", "per_task"):
        # single:N puts N tasks on each GPU, per_task:N gives each task N GPUs: only N = 1 is one per task.
        return f"gpu-bind {bind}" if count == "1" else None
    if bind == "none":
        return None  # every task sees every GPU of the step: one visible device is one shared device
    per_task = env.get("SLURM_GPUS_PER_TASK", "").rpartition(":")[2]  # "1" or "a100:1"
    if per_task == "1" and not bind:
        return "gpus-per-task 1"
    # cgroups or a site's task prolog: the step has a GPU for every rank of the node, this task sees one.
    on_node = env.get("SLURM_GPUS_ON_NODE", "")
    if on_node.isdigit() and int(on_node) >= max(2, local_world or 2):
        return f"site binding, SLURM_GPUS_ON_NODE={on_node}"
    return None


def select_device(env: Mapping[str, str], visible_devices: int, cuda: bool) -> DeviceChoice:
    """Pick this rank's device and backend from the launcher's environment and the devices it sees.

    ``visible_devices`` is ``torch.cuda.device_count()`` (it honours CUDA_VISIBLE_DEVICES and cgroups);
    this function itself touches no device, so every binding can be checked without one. Raises
    :class:`LauncherError` when ranks of this node would have to share a GPU.
    """
    local_rank = _env_int(env, "LOCAL_RANK")
    local_world = _local_world_size(env)
    if not cuda or visible_devices < 1:
        return DeviceChoice(
            index=None,
            local_rank=local_rank,
            launcher_local_rank=local_rank,
            backend="gloo",
            binding="cpu",
            description="CPU, gloo (no CUDA device visible)",
        )
    if local_world is not None and local_rank >= local_world:
        raise LauncherError(f"LOCAL_RANK={local_rank} is not below LOCAL_WORLD_SIZE={local_world}")
    listed = [d.strip() for d in env.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]

    def entry(index: int) -> str:  # which physical device a visible index is, where the launcher says
        return f" (CUDA_VISIBLE_DEVICES entry {listed[index]})" if index < len(listed) else ""

    if visible_devices == 1 and (local_world or local_rank + 1) > 1:
        reason = _bound_to_one_gpu(env, local_world)
        if reason is not None:
            return DeviceChoice(
                index=0,
                local_rank=0,
                launcher_local_rank=local_rank,
                backend="nccl",
                binding="one-per-task",
                description=f"cuda:0, the only GPU this task sees{entry(0)} (one GPU per task: {reason}); "
                f"LOCAL_RANK {local_rank} exported as 0 for DeepSpeed; nccl",
            )
    if (local_world is not None and local_world > visible_devices) or local_rank >= visible_devices:
        ranks = f"LOCAL_RANK={local_rank}" + (f", LOCAL_WORLD_SIZE={local_world}" if local_world is not None else "")
        seen = f"{visible_devices} CUDA device{'s' if visible_devices != 1 else ''}"
        if listed:
            seen += f" (CUDA_VISIBLE_DEVICES={env['CUDA_VISIBLE_DEVICES']})"
        raise LauncherError(
            f"{ranks} but this process sees {seen}: ranks on this node would share a GPU (NCCL refuses); {_REMEDY}"
        )
    return DeviceChoice(
        index=local_rank,
        local_rank=local_rank,
        launcher_local_rank=local_rank,
        backend="nccl",
        binding="all-visible",
        description=f"cuda:{local_rank}{entry(local_rank)} = LOCAL_RANK among {visible_devices} visible GPUs; nccl",
    )


def _limit_cpu_threads(local_world: int) -> None:
    # The deepspeed launcher does not set OMP_NUM_THREADS; N processes each using every core run
    # ~10x slower from oversubscription (measured on a 2-core machine, 2 ranks). Share the cores unless the
    # user chose a number.
    if "OMP_NUM_THREADS" not in os.environ:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        torch.set_num_threads(max(1, cores // max(1, local_world)))


def _skip_cpu_shm_op_build() -> None:
    # On the CPU accelerator DeepSpeed JIT-compiles its shared-memory all-reduce op (40-220 s of g++)
    # at init_distributed. That op only serves inference all-reduce; training uses gloo. DeepSpeed
    # consults this dict before building (and documents that edits to it persist).
    import deepspeed.ops

    deepspeed.ops.__dict__.setdefault("__compatible_ops__", {})["deepspeed_shm_comm"] = False


def init_distributed(timeout_min: float = 30.0) -> DistEnv:
    """Read the launcher's environment, pick device and backend, and initialise the process group.

    ``timeout_min`` bounds every collective (``train.collective_timeout_min``): a rank that waits longer
    for its peers raises instead of hanging until the job's time limit.
    """
    rank, local_rank, world, local_world = _read_env()
    # DeepSpeed's ZeRO calls a torch collective that torch has renamed; the warning repeats every step.
    warnings.filterwarnings("ignore", message=".*all_gather_into_tensor.*", category=FutureWarning)
    cuda = torch.cuda.is_available()
    choice = select_device(os.environ, torch.cuda.device_count() if cuda else 0, cuda)
    if choice.index is not None:
        os.environ["LOCAL_RANK"] = str(choice.local_rank)  # what DeepSpeed will set_device() and bind
        torch.cuda.set_device(choice.index)
        device = torch.device("cuda", choice.index)
        # The NCCL watchdog tears the process down on a failed or timed-out collective, so a dead peer
        # ends the job (srun --kill-on-bad-exit) instead of hanging it. 3 is torch's documented default
        # (tear down without ncclCommAbort, which can itself hang); set explicitly so no torch build or
        # inherited 0 silently turns it off.
        os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "3")
        # NCCL's flight recorder: each rank keeps its last collectives in a ring buffer, which the hang
        # watchdog (trainer/watchdog.py) dumps next to the Python stacks. Read when the group is made.
        os.environ.setdefault("TORCH_NCCL_TRACE_BUFFER_SIZE", str(NCCL_TRACE_ENTRIES))
    else:
        device = torch.device("cpu")
        _limit_cpu_threads(local_world)
        _skip_cpu_shm_op_build()
    import deepspeed

    deepspeed.init_distributed(
        dist_backend=choice.backend, auto_mpi_discovery=False, timeout=datetime.timedelta(minutes=timeout_min)
    )
    if rank == 0:
        print(
            f"[distributed] {world} rank(s), {local_world} on this node; rank 0: {choice.description}; "
            f"collective timeout {timeout_min:g} min",
            flush=True,
        )
    return DistEnv(rank, local_rank, world, local_world, device, choice.backend)


NCCL_TRACE_ENTRIES = 2000
"""Collectives NCCL's flight recorder keeps per rank (TORCH_NCCL_TRACE_BUFFER_SIZE), unless the user set it."""


def store() -> dist.Store | None:
    """The process group's key-value store (the rendezvous TCPStore every rank already reaches), or None
    before :func:`init_distributed`. The hang watchdog publishes each rank's progress there: it needs no
    collective, so it works while the ranks are stuck in one."""
    if not (dist.is_available() and dist.is_initialized()):
        return None
    return dist.distributed_c10d._get_default_store()


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


def all_max(flags: torch.Tensor) -> torch.Tensor:
    """Element-wise MAX of ``flags`` over all ranks, in place, left on the device: no host read. On NCCL
    the collective is queued on the stream, so the host does not wait for it either."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
    return flags


class HostCopy:
    """A small device tensor on its way to the host, read later without draining the device's queue.

    Reading a CUDA tensor (``.item()``, ``.tolist()``, ``.cpu()``) waits for *all* work queued before the
    read, so a read placed after the next step's kernels idles the GPU until they finish. Here the copy
    into pinned memory is queued at once (non-blocking) with an event behind it; :meth:`get` waits for
    that event only, i.e. for the work queued before the copy, which by then has long run. On the CPU
    the tensor is already computed: a clone is kept. The tensor must not be written to before this copy
    is queued (nothing later may change it: it is cloned on the CPU and copied in stream order on CUDA)."""

    def __init__(self, tensor: torch.Tensor) -> None:
        self._event: torch.cuda.Event | None = None
        if tensor.is_cuda:
            self._host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
            self._host.copy_(tensor.detach(), non_blocking=True)
            self._event = torch.cuda.Event()
            self._event.record()
        else:
            self._host = tensor.detach().clone()

    def get(self) -> torch.Tensor:
        """The values, on the host (waits for the copy, not for work queued after it)."""
        if self._event is not None:
            self._event.synchronize()
        return self._host


def broadcast_object(value: T, device: torch.device, src: int = 0) -> T:
    """Send a small picklable value from ``src`` to every rank (our own processes: trusted data)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return value
    obj = [value]
    dist.broadcast_object_list(obj, src=src, device=device)
    return obj[0]


def gather_object(value: T) -> list[T]:
    """Every rank's small picklable ``value``, in rank order, on every rank (our own processes: trusted)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [value]
    out: list[T] = [value] * dist.get_world_size()
    dist.all_gather_object(out, value)
    return out


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
