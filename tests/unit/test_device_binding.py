"""trainer.distributed.select_device over launcher environments and visible-device counts (no GPU needed),
and init_distributed on CPU in a child process (timeout, LOCAL_RANK, the rank-0 binding line)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from trainer.distributed import LauncherError, free_port, select_device

REPO = Path(__file__).resolve().parents[2]


def slurm(local_rank: int, tasks_per_node: int, **extra: str) -> dict[str, str]:
    """A task's environment after cluster.job exported the torch variables inside a SLURM step."""
    return {
        "RANK": str(local_rank),
        "LOCAL_RANK": str(local_rank),
        "WORLD_SIZE": str(tasks_per_node),
        "LOCAL_WORLD_SIZE": str(tasks_per_node),
        "SLURM_LOCALID": str(local_rank),
        **extra,
    }


# ------------------------------------------------------------------------------ accepted bindings


@pytest.mark.parametrize("local_rank", [0, 3, 7])
def test_all_gpus_visible_uses_gpu_local_rank(local_rank: int) -> None:
    choice = select_device(slurm(local_rank, 8, SLURM_GPUS_ON_NODE="8"), visible_devices=8, cuda=True)
    assert (choice.index, choice.local_rank, choice.launcher_local_rank) == (local_rank, local_rank, local_rank)
    assert (choice.backend, choice.binding) == ("nccl", "all-visible")
    assert choice.description.startswith(f"cuda:{local_rank} = LOCAL_RANK among 8 visible GPUs")


@pytest.mark.parametrize(
    ("extra", "reason"),
    [
        ({"SLURM_GPUS_PER_TASK": "1"}, "gpus-per-task 1"),
        ({"SLURM_GPUS_PER_TASK": "h100:1"}, "gpus-per-task 1"),
        ({"SLURM_GPU_BIND": "single:1"}, "gpu-bind single:1"),
        ({"SLURM_GPU_BIND": "verbose,single:1"}, "gpu-bind single:1"),
        ({"SLURM_GPU_BIND": "per_task:1"}, "gpu-bind per_task:1"),
        ({"SLURM_TRES_BIND": "gres/gpu:per_task:1"}, "gpu-bind per_task:1"),  # newer SLURM's form
        ({"SLURM_GPUS_ON_NODE": "8"}, "site binding, SLURM_GPUS_ON_NODE=8"),  # cgroups: only the count says it
    ],
)
@pytest.mark.parametrize("local_rank", [0, 5])
def test_one_gpu_per_task_uses_index_0_and_exports_local_rank_0(
    extra: dict[str, str], reason: str, local_rank: int
) -> None:
    env = slurm(local_rank, 8, CUDA_VISIBLE_DEVICES="0", **extra)
    choice = select_device(env, visible_devices=1, cuda=True)
    # DeepSpeed calls set_device(LOCAL_RANK): with one visible device anything but 0 is "invalid device ordinal".
    assert (choice.index, choice.local_rank, choice.launcher_local_rank) == (0, 0, local_rank)
    assert (choice.backend, choice.binding) == ("nccl", "one-per-task")
    assert f"(one GPU per task: {reason})" in choice.description
    assert f"LOCAL_RANK {local_rank} exported as 0" in choice.description
    assert "CUDA_VISIBLE_DEVICES entry 0" in choice.description


def test_without_cgroups_slurm_leaves_the_physical_id_in_cuda_visible_devices() -> None:
    env = slurm(5, 8, SLURM_GPUS_PER_TASK="1", CUDA_VISIBLE_DEVICES="5")
    choice = select_device(env, visible_devices=1, cuda=True)
    assert (choice.index, choice.local_rank) == (0, 0)
    assert "CUDA_VISIBLE_DEVICES entry 5" in choice.description


def test_site_subset_of_gpus_uses_the_index_within_the_visible_list() -> None:
    # torchrun --nproc_per_node 2 with CUDA_VISIBLE_DEVICES=2,3: rank 1 is cuda:1, i.e. physical GPU 3.
    env = {"LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2", "CUDA_VISIBLE_DEVICES": "2,3"}
    choice = select_device(env, visible_devices=2, cuda=True)
    assert (choice.index, choice.local_rank, choice.binding) == (1, 1, "all-visible")
    assert "cuda:1 (CUDA_VISIBLE_DEVICES entry 3)" in choice.description


@pytest.mark.parametrize(
    "env",
    [
        {"LOCAL_RANK": "1", "LOCAL_SIZE": "2"},  # the deepspeed launcher's name for it
        {"LOCAL_RANK": "1", "SLURM_NTASKS_PER_NODE": "2(x3)"},
        {"LOCAL_RANK": "1"},  # no local world size at all: LOCAL_RANK must fit the visible devices
    ],
)
def test_local_world_size_from_any_launcher(env: dict[str, str]) -> None:
    choice = select_device(env, visible_devices=2, cuda=True)
    assert (choice.index, choice.binding) == (1, "all-visible")


def test_a_single_rank_on_a_single_gpu_needs_no_binding() -> None:
    choice = select_device({"LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1"}, visible_devices=1, cuda=True)
    assert (choice.index, choice.local_rank, choice.binding) == (0, 0, "all-visible")


@pytest.mark.parametrize(("visible", "cuda"), [(0, False), (0, True), (4, False)])
def test_cpu_uses_gloo_and_leaves_local_rank(visible: int, cuda: bool) -> None:
    choice = select_device(slurm(3, 4), visible_devices=visible, cuda=cuda)
    assert (choice.index, choice.local_rank, choice.backend, choice.binding) == (None, 3, "gloo", "cpu")
    assert choice.description == "CPU, gloo (no CUDA device visible)"


# ------------------------------------------------------------------------------ refused


@pytest.mark.parametrize(
    ("env", "visible", "message"),
    [
        # Two ranks, one GPU, nothing binds them: they would share it.
        (
            {"LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2"},
            1,
            "LOCAL_RANK=1, LOCAL_WORLD_SIZE=2 but this process sees 1 CUDA device: ranks on this node would share "
            "a GPU (NCCL refuses); start at most one task per visible GPU, or bind one GPU per task "
            "(--gpus-per-task=1 or --gpu-bind=single:1)",
        ),
        # Rank 0 is refused too: the whole node must stop, not only the ranks past the last GPU.
        ({"LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "8"}, 4, "LOCAL_RANK=0, LOCAL_WORLD_SIZE=8 but this process sees 4"),
        (
            slurm(2, 4, CUDA_VISIBLE_DEVICES="0,1"),
            2,
            "sees 2 CUDA devices (CUDA_VISIBLE_DEVICES=0,1): ranks on this node would share a GPU",
        ),
        ({"LOCAL_RANK": "3"}, 2, "LOCAL_RANK=3 but this process sees 2 CUDA devices"),
        # SLURM put two tasks on each GPU, or every task sees the step's only GPU.
        (slurm(1, 2, SLURM_GPU_BIND="single:2", SLURM_GPUS_ON_NODE="1"), 1, "LOCAL_RANK=1, LOCAL_WORLD_SIZE=2"),
        (slurm(1, 2, SLURM_GPU_BIND="none", SLURM_GPUS_PER_TASK="1"), 1, "would share a GPU"),
        (slurm(1, 4, SLURM_GPUS_ON_NODE="2"), 1, "would share a GPU"),
        ({"LOCAL_RANK": "2", "LOCAL_WORLD_SIZE": "2"}, 8, "LOCAL_RANK=2 is not below LOCAL_WORLD_SIZE=2"),
        ({"LOCAL_RANK": "one"}, 8, "LOCAL_RANK='one' is not an integer"),
    ],
)
def test_ranks_that_would_share_a_gpu_are_refused_in_one_line(env: dict[str, str], visible: int, message: str) -> None:
    with pytest.raises(LauncherError) as info:
        select_device(env, visible_devices=visible, cuda=True)
    text = str(info.value)
    assert message in text
    assert "\n" not in text


# ------------------------------------------------------------------------------ init_distributed on CPU

_CHILD = textwrap.dedent(
    """
    import os, sys
    import torch.distributed as dist
    from trainer import distributed

    env = distributed.init_distributed(timeout_min=float(sys.argv[1]))
    group = dist.distributed_c10d._get_default_group()
    timeout = group._get_backend(env.device).options._timeout
    print("RESULT", env.device, env.backend, env.local_rank, os.environ["LOCAL_RANK"], timeout.total_seconds(),
          os.environ.get("TORCH_NCCL_ASYNC_ERROR_HANDLING", "unset"))
    distributed.shutdown()
    """
)


@pytest.mark.slow
def test_init_distributed_applies_timeout_and_logs_the_binding(tmp_path: Path) -> None:
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("LOCAL_WORLD_SIZE", "LOCAL_SIZE", "SLURM_NTASKS_PER_NODE", "TORCH_NCCL_ASYNC_ERROR_HANDLING")
    }
    env.update(
        RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()),
        PYTHONPATH=str(REPO), CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1",
    )  # fmt: skip
    proc = subprocess.run(
        [sys.executable, "-c", _CHILD, "2.5"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    result = next(line for line in lines if line.startswith("RESULT")).split()
    assert result[1:] == ["cpu", "gloo", "0", "0", "150.0", "unset"]
    binding = [line for line in lines if line.startswith("[distributed]")]
    assert binding == [
        "[distributed] 1 rank(s), 1 on this node; rank 0: CPU, gloo (no CUDA device visible); "
        "collective timeout 2.5 min"
    ]
