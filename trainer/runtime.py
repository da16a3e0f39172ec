"""Settings that depend on the machine and the world size, resolved once at start into a frozen :class:`Runtime`.

- precision: ``train.precision=auto`` becomes bf16 where the device computes it natively, else fp32
  (or what the user's DeepSpeed settings say, when they say);
- ZeRO stage: ``train.zero_stage``, else the user's DeepSpeed settings, else 2;
- batch: ``data.global_batch_size`` becomes a per-rank micro-batch and an accumulation count;
- data order: ``data.partitions`` (the canonical partitions, :mod:`trainer.data.canonical`), checked against
  the global batch, the world size and the loader workers;
- loader: ``data.num_workers`` / ``data.pin_memory`` left unset get per-device defaults (workers at most the
  rank's canonical partitions).

The engine, the loop and the data stream receive the :class:`Runtime` and decide nothing of this
themselves; the config keeps what the user asked for. The decisions are pure functions of what they are
given (testable without the hardware); :func:`resolve` probes the hardware once.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from trainer.config import Config, ConfigError, DataConfig
from trainer.data.canonical import check_layout, default_partitions
from trainer.distributed import DistEnv

CPU_BF16_FLAGS = ("avx512_bf16", "amx_bf16")
"""x86 CPU flags of native bf16 arithmetic; without them PyTorch emulates bf16, ~10x slower than fp32."""

CUDA_LOADER_WORKERS = 4
DEFAULT_ZERO_STAGE = 2


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
    requested: str, device_type: str, cuda_bf16: bool, flags: set[str], user_bf16: bool | None = None
) -> tuple[str, str, bool]:
    """→ (precision, reason, warn). ``warn`` is True when bf16 was asked for where it is emulated.
    ``user_bf16``: ``bf16.enabled`` of the user's DeepSpeed settings, when they set it."""
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
        if user_bf16 is not None:
            return ("bf16" if user_bf16 else "fp32"), "the DeepSpeed settings set bf16.enabled", False
        return ("bf16" if native else "fp32"), where, False
    if user_bf16 is not None and user_bf16 != (requested == "bf16"):
        raise ConfigError(
            f"train.precision={requested} contradicts bf16.enabled={str(user_bf16).lower()} in the DeepSpeed "
            "settings (train.deepspeed_config / train.deepspeed): set one of them"
        )
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


def read_deepspeed_json(path_text: str) -> dict[str, Any]:
    """The user's DeepSpeed JSON (``train.deepspeed_config``), with one-line errors."""
    path = Path(path_text)
    try:
        base = json.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"train.deepspeed_config: file not found: {path}") from None
    except json.JSONDecodeError as err:
        raise ConfigError(f"train.deepspeed_config: {path}: invalid JSON ({err.msg}, line {err.lineno})") from None
    if not isinstance(base, dict):
        raise ConfigError(f"train.deepspeed_config: {path}: top level must be an object")
    if "optimizer" in base:
        # A DeepSpeed "optimizer" block selects FusedAdam and JIT-compiles it; we pass torch AdamW.
        raise ConfigError(f"train.deepspeed_config: {path}: remove 'optimizer' (set train.lr/weight_decay)")
    return base


def merge(lower: dict[str, Any], upper: dict[str, Any]) -> dict[str, Any]:
    """Nested dict merge; ``upper`` wins."""
    out = dict(lower)
    for k, v in upper.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def user_deepspeed(cfg: Config) -> dict[str, Any]:
    """The DeepSpeed settings the user wrote: the JSON file under ``train.deepspeed`` (which wins)."""
    base = read_deepspeed_json(cfg.train.deepspeed_config) if cfg.train.deepspeed_config else {}
    return merge(base, cfg.train.deepspeed)


def choose_zero_stage(requested: int | None, user: dict[str, Any]) -> int:
    said = user.get("zero_optimization", {}).get("stage")
    if requested is None:
        return int(said) if said is not None else DEFAULT_ZERO_STAGE
    if said is not None and int(said) != requested:
        raise ConfigError(
            f"train.zero_stage={requested} contradicts zero_optimization.stage={said} in the DeepSpeed settings "
            "(train.deepspeed_config / train.deepspeed): set one of them"
        )
    return requested


@dataclass(frozen=True)
class LoaderSettings:
    """What one rank's training loader uses: its micro-batch, worker processes, pinned memory."""

    batch_size: int
    num_workers: int
    pin_memory: bool
    partitions: int
    """Canonical data partitions (resolved ``data.partitions``)."""

    def apply(self, data: DataConfig) -> DataConfig:
        """``data`` with these values in place of the user's requests (for the data package's readers)."""
        update = {
            "batch_size": self.batch_size,
            "num_workers": self.num_workers,
            "pin_memory": self.pin_memory,
            "partitions": self.partitions,
        }
        return data.model_copy(update=update)


@dataclass(frozen=True)
class Runtime:
    """Everything decided at start from the config, the machine and the world size. Frozen."""

    env: DistEnv
    precision: Literal["bf16", "fp32"]
    precision_reason: str
    batch: BatchPlan
    loader: LoaderSettings
    zero_stage: int
    deepspeed: dict[str, Any] = field(default_factory=dict)
    """The user's DeepSpeed settings (JSON file + ``train.deepspeed``), read once."""
    warnings: tuple[str, ...] = ()

    @property
    def device(self) -> torch.device:
        return self.env.device

    @property
    def bf16(self) -> bool:
        return self.precision == "bf16"

    def lines(self) -> list[str]:
        """One line per decision, then the warnings, for the log."""
        b = self.batch
        return [
            f"precision {self.precision} ({self.precision_reason}), ZeRO stage {self.zero_stage}",
            f"batch {b.global_batch} per step = {b.world_size} ranks x {b.grad_accum} accumulation x "
            f"{b.micro_batch} per micro-batch; data order: {self.loader.partitions} canonical partitions, "
            f"{self.loader.partitions // b.world_size} per rank, {self.loader.num_workers} loader workers",
            *self.warnings,
        ]

    def facts(self) -> dict[str, Any]:
        """The decisions as MLflow params (beside the config, which keeps the user's requests)."""
        return {
            "runtime.precision": self.precision,
            "runtime.zero_stage": self.zero_stage,
            "runtime.micro_batch": self.batch.micro_batch,
            "runtime.grad_accum": self.batch.grad_accum,
            "runtime.global_batch": self.batch.global_batch,
            "runtime.num_workers": self.loader.num_workers,
            "runtime.partitions": self.loader.partitions,
            "world_size": self.env.world_size,
            "device": str(self.env.device),
        }


def resolve(cfg: Config, env: DistEnv) -> Runtime:
    """Decide everything machine-dependent once. Probes the hardware (CUDA bf16, CPU flags)."""
    device = env.device
    user = user_deepspeed(cfg)
    enabled = user.get("bf16", {}).get("enabled")
    cuda_bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
    precision, why, warn = choose_precision(
        cfg.train.precision,
        device.type,
        cuda_bf16,
        cpu_flags() if device.type == "cpu" else set(),
        None if enabled is None else bool(enabled),
    )
    plan = plan_batch(cfg.data.global_batch_size, cfg.data.batch_size, cfg.train.grad_accum, env.world_size)
    workers, pin = loader_defaults(cfg.data.num_workers, cfg.data.pin_memory, device.type)
    partitions = cfg.data.partitions or default_partitions(plan.global_batch)
    if cfg.data.num_workers is None and partitions % env.world_size == 0:
        workers = min(workers, partitions // env.world_size)  # a default never asks for more than the order allows
    check_layout(partitions, plan.global_batch, env.world_size, workers)
    warnings = ()
    if warn:
        warnings = (
            f"warning: train.precision=bf16 on {device.type} without native bf16 ({why}); "
            "train.precision=auto would pick fp32",
        )
    return Runtime(
        env=env,
        precision=precision,  # type: ignore[arg-type]
        precision_reason=why,
        batch=plan,
        loader=LoaderSettings(plan.micro_batch, workers, pin, partitions),
        zero_stage=choose_zero_stage(cfg.train.zero_stage, user),
        deepspeed=user,
        warnings=warnings,
    )
