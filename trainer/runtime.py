"""Settings that depend on the machine and the world size, resolved once at start.

- precision: ``train.precision=auto`` becomes bf16 where the device computes it natively, else fp32;
- batch: ``data.global_batch_size`` becomes a per-rank micro-batch and ``train.grad_accum``;
- loader: ``data.num_workers`` / ``data.pin_memory`` left unset get per-device defaults.

The decisions are pure functions of what they are given (testable without the hardware);
:func:`resolve` probes the hardware once and returns a new :class:`Config` plus one log line per choice.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from trainer.config import Config, ConfigError

CPU_BF16_FLAGS = ("avx512_bf16", "amx_bf16")
"""x86 CPU flags of native bf16 arithmetic; without them PyTorch emulates bf16, ~10x slower than fp32."""

CUDA_LOADER_WORKERS = 4


def cpu_flags(cpuinfo: str | None = None) -> set[str]:
    """The CPU's feature flags (Linux ``/proc/cpuinfo``); empty where unknown."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return set()
    for line in cpuinfo.splitlines():
        if line.startswith(("flags", "Features")):
            return set(line.split(":", 1)[1].split())
    return set()


def choose_precision(
    requested: str, device_type: str, cuda_bf16: bool, flags: set[str], json_bf16: bool | None = None
) -> tuple[str, str, bool]:
    """→ (precision, reason, warn). ``warn`` is True when bf16 was asked for where it is emulated."""
    native = cuda_bf16 if device_type == "cuda" else any(f in flags for f in CPU_BF16_FLAGS)
    where = (
        "this GPU supports bf16"
        if device_type == "cuda" and native
        else "this GPU has no bf16"
        if device_type == "cuda"
        else f"this CPU has {'/'.join(f for f in CPU_BF16_FLAGS if f in flags)}"
        if native
        else "this CPU has no native bf16 (no avx512_bf16/amx_bf16): bf16 would be emulated, ~10x slower"
    )
    if requested == "auto":
        if json_bf16 is not None:
            return ("bf16" if json_bf16 else "fp32"), "train.deepspeed_config sets bf16.enabled", False
        return ("bf16" if native else "fp32"), where, False
    return requested, "train.precision", requested == "bf16" and not native


@dataclass(frozen=True)
class BatchPlan:
    micro_batch: int
    grad_accum: int
    world_size: int

    @property
    def global_batch(self) -> int:
        return self.micro_batch * self.grad_accum * self.world_size


def plan_batch(global_batch: int | None, max_micro: int, min_accum: int, world_size: int) -> BatchPlan:
    """Split ``global_batch`` into world_size × accumulation × micro-batch (≤ ``max_micro``), using the
    fewest accumulation steps (≥ ``min_accum``) that divide evenly. Without a global batch the per-rank
    settings stand as given."""
    if global_batch is None:
        return BatchPlan(max_micro, min_accum, world_size)
    if global_batch % world_size:
        raise ConfigError(
            f"data.global_batch_size={global_batch} does not split evenly over {world_size} ranks "
            f"(use a multiple of {world_size})"
        )
    per_rank = global_batch // world_size
    for accum in range(max(1, min_accum), per_rank + 1):
        if per_rank % accum == 0 and per_rank // accum <= max_micro:
            return BatchPlan(per_rank // accum, accum, world_size)
    raise ConfigError(
        f"data.global_batch_size={global_batch} on {world_size} ranks is {per_rank} per rank, which no "
        f"accumulation >= train.grad_accum={min_accum} splits into micro-batches"
    )


def loader_defaults(num_workers: int | None, pin_memory: bool | None, device_type: str) -> tuple[int, bool]:
    cuda = device_type == "cuda"
    workers = num_workers if num_workers is not None else (CUDA_LOADER_WORKERS if cuda else 0)
    return workers, (pin_memory if pin_memory is not None else cuda)


def _json_bf16(cfg: Config) -> bool | None:
    """``bf16.enabled`` of the user's DeepSpeed JSON, when it says."""
    if not cfg.train.deepspeed_config:
        return None
    from trainer.engine import read_deepspeed_json

    enabled = read_deepspeed_json(cfg.train.deepspeed_config).get("bf16", {}).get("enabled")
    return None if enabled is None else bool(enabled)


def resolve(cfg: Config, device: torch.device, world_size: int) -> tuple[Config, list[str], list[str]]:
    """→ (resolved config, info lines, warning lines). Probes the hardware (CUDA bf16, CPU flags)."""
    cuda_bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
    precision, why, warn = choose_precision(
        cfg.train.precision, device.type, cuda_bf16, cpu_flags() if device.type == "cpu" else set(), _json_bf16(cfg)
    )
    plan = plan_batch(cfg.data.global_batch_size, cfg.data.batch_size, cfg.train.grad_accum, world_size)
    workers, pin = loader_defaults(cfg.data.num_workers, cfg.data.pin_memory, device.type)
    data: dict[str, Any] = {"batch_size": plan.micro_batch, "num_workers": workers, "pin_memory": pin}
    if cfg.data.global_batch_size is not None:
        data["global_batch_size"] = plan.global_batch
    resolved = cfg.model_copy(
        update={
            "data": cfg.data.model_copy(update=data),
            "train": cfg.train.model_copy(update={"precision": precision, "grad_accum": plan.grad_accum}),
        }
    )
    info = [
        f"precision {precision} ({why})",
        f"batch {plan.global_batch} per step = {world_size} ranks x {plan.grad_accum} accumulation x "
        f"{plan.micro_batch} per micro-batch",
    ]
    warnings = []
    if warn:
        warnings.append(
            f"warning: train.precision=bf16 on {device.type} without native bf16 ({why}); "
            "train.precision=auto would pick fp32"
        )
    return resolved, info, warnings
