"""DeepSpeed wrapping: config assembly, optimizer, LR schedule, and the model call used by the losses."""

from __future__ import annotations

import math
import types
from collections.abc import Callable
from typing import Any

import torch

from trainer.config import Config
from trainer.runtime import Runtime, merge

ZERO_BUCKET_FRACTION = 16
"""ZeRO's communication buckets and ZeRO-3's prefetch/reuse windows hold 1/16 of the model's elements."""
ZERO_MIN_BUCKET = 1_000_000
"""Below this many elements per bucket collectives get latency-bound: small models keep one bucket."""
DEEPSPEED_ZERO_DEFAULTS = {
    "reduce_bucket_size": 500_000_000,
    "allgather_bucket_size": 500_000_000,
    "stage3_prefetch_bucket_size": 50_000_000,
    "stage3_max_reuse_distance": 1_000_000_000,
    "stage3_max_live_parameters": 1_000_000_000,
}
"""DeepSpeed 0.19's defaults (elements), sized for billion-parameter models."""


def zero_buffer_sizes(n_params: int) -> dict[str, int]:
    """ZeRO buffer and window sizes (elements) scaled to a model of ``n_params`` parameters, never above
    DeepSpeed's defaults.

    With DeepSpeed's defaults a model under ~0.5B parameters fits in one bucket and one window, and the
    partitioning saves nothing at the peak: ZeRO 2/3 copy the whole model's gradient into the reduce
    bucket before reducing it (a full fp32 gradient per rank; on a GPU the bucket is allocated at its
    full 5e8 elements, 2 GB fp32, whatever the model), ZeRO-3 prefetches the whole model and keeps every
    gathered parameter from its forward use to its backward use (max reuse distance 1e9 elements), so a
    full copy of the weights is live through each step. Scaled, a bucket or window is 1/16 of a full copy
    and ZeRO-3 keeps at most 1/4 of the weights gathered (a user can trade memory back for fewer
    collectives by setting these keys in the DeepSpeed JSON or ``train.deepspeed``)."""
    # A multiple of 1024: ZeRO 1/2 require an even allgather bucket (4-byte alignment of fp16 halves).
    bucket = max(ZERO_MIN_BUCKET, 1024 * math.ceil(n_params / ZERO_BUCKET_FRACTION / 1024))
    sizes = {
        "reduce_bucket_size": bucket,
        "allgather_bucket_size": bucket,
        "stage3_prefetch_bucket_size": bucket,
        "stage3_max_reuse_distance": bucket,
        "stage3_max_live_parameters": 4 * bucket,
    }
    return {k: min(v, DEEPSPEED_ZERO_DEFAULTS[k]) for k, v in sizes.items()}


def deepspeed_config(cfg: Config, rt: Runtime, n_params: int | None = None) -> dict[str, Any]:
    """The DeepSpeed config: ZeRO buffer sizes scaled to the model (``n_params``, when given), under the
    user's DeepSpeed settings (``rt.deepspeed``: the JSON file and ``train.deepspeed``), under the values
    this run decided: micro-batch, accumulation, clipping, ZeRO stage and precision come from the config
    and the :class:`~trainer.runtime.Runtime`, so that one file describes the run (the runtime has already
    refused a user setting that contradicts them). Sizes the user set win over the scaled ones."""
    base: dict[str, Any] = {}
    if n_params is not None:
        base = {"zero_optimization": zero_buffer_sizes(n_params)}
    derived = {
        "train_micro_batch_size_per_gpu": rt.batch.micro_batch,
        "gradient_accumulation_steps": rt.batch.grad_accum,
        "gradient_clipping": cfg.train.grad_clip,
        "zero_optimization": {"stage": rt.zero_stage},
        "bf16": {"enabled": rt.bf16},
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
    }
    merged = merge(merge(base, rt.deepspeed), derived)
    merged.pop("train_batch_size", None)  # derived by DeepSpeed from micro-batch × accumulation × world
    return merged


def lr_lambda(warmup_steps: int, total_steps: int, schedule: str) -> Callable[[int], float]:
    """Multiplier of the base LR at optimizer step ``s``: linear warm-up, then constant or cosine decay."""

    def factor(step: int) -> float:
        if warmup_steps and step < warmup_steps:
            return (step + 1) / warmup_steps
        if schedule == "cosine":
            progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
            return 0.5 * (1.0 + math.cos(math.pi * progress))
        return 1.0

    return factor


class StepGate:
    """Skips one whole optimizer step from outside DeepSpeed, decided on the device.

    DeepSpeed applies a NaN update in fp32 and skips it in bf16; the trainer wants every step with a
    non-finite loss or gradient on any rank skipped whole, in both, without the host waiting for the
    verdict. The trainer sets ``found_inf`` (a 0-d float32 tensor on the device: 1.0 skip, 0.0 apply)
    before each step; the optimizer patched by :func:`gate_optimizer` hands it to torch's fused AdamW,
    whose kernel then leaves weights, moments and its step count untouched on the device (the
    mechanism ``torch.amp.GradScaler`` uses). The LR scheduler runs on the host and cannot see the
    verdict: it advances, and the trainer calls :meth:`RewindableLambdaLR.rewind` once it has read the
    verdict, before the next optimizer step, so the schedule stays in step with the optimizer.
    DeepSpeed still zeroes the gradients as after any step."""

    def __init__(self) -> None:
        self.found_inf: torch.Tensor | None = None


def _gated_step(self: torch.optim.Optimizer, closure: Callable[[], float] | None = None) -> float | None:
    found_inf = self.gate.found_inf  # type: ignore[attr-defined]
    if found_inf is None:
        return type(self).step(self, closure)
    if self.defaults.get("fused"):
        self.found_inf = found_inf  # type: ignore[attr-defined]  # read by the fused kernel, on the device
        try:
            return type(self).step(self, closure)
        finally:
            del self.found_inf  # type: ignore[attr-defined]
    # An unfused AdamW (a device without the fused kernel) cannot skip on the device: read the verdict.
    if bool(found_inf > 0):
        return None
    return type(self).step(self, closure)


def gate_optimizer(optimizer: torch.optim.Optimizer, gate: StepGate) -> torch.optim.Optimizer:
    """Make ``optimizer.step`` honour ``gate.found_inf``. Patched on the instance, not by subclassing:
    DeepSpeed's ZeRO accepts only the exact torch optimizer types without a warning."""
    optimizer.gate = gate  # type: ignore[attr-defined]  # an attribute: state_dict() does not carry it
    optimizer.step = types.MethodType(_gated_step, optimizer)  # type: ignore[method-assign]
    return optimizer


class RewindableLambdaLR(torch.optim.lr_scheduler.LambdaLR):
    def rewind(self) -> None:
        """Undo the last :meth:`step`: the optimizer step it followed was skipped on the device."""
        self.last_epoch -= 1
        values = [base * fn(self.last_epoch) for base, fn in zip(self.base_lrs, self.lr_lambdas, strict=True)]
        for group, lr in zip(self.optimizer.param_groups, values, strict=True):
            group["lr"] = lr
        self._last_lr = values


def build_engine(cfg: Config, rt: Runtime, model: torch.nn.Module, gate: StepGate | None = None) -> Any:
    """Wrap ``model`` in a DeepSpeed engine with torch's fused AdamW (no FusedAdam JIT build) and a LambdaLR.

    The fused kernel (CPU and CUDA) is one launch for all tensors instead of a few per tensor, and it is
    what lets :class:`StepGate` skip a step on the device. ``train.compile`` compiles the module through
    DeepSpeed's ``engine.compile``."""
    import deepspeed

    adamw = torch.optim.AdamW(model.parameters(), lr=cfg.train.lr, weight_decay=cfg.train.weight_decay, fused=True)
    optimizer = gate_optimizer(adamw, gate or StepGate())
    scheduler = RewindableLambdaLR(
        optimizer, lr_lambda(cfg.train.warmup_steps, cfg.train.total_steps, cfg.train.lr_schedule)
    )
    engine, _, _, _ = deepspeed.initialize(
        model=model,
        optimizer=optimizer,
        lr_scheduler=scheduler,
        config=deepspeed_config(cfg, rt, n_params=sum(p.numel() for p in model.parameters())),
    )
    if engine.dp_world_size == 1 and engine.zero_optimization_stage() == 0:
        # One data-parallel rank: DeepSpeed would still flatten every gradient into a buffer, all-reduce it
        # with itself and copy it back each step (~2 ms of a 270 ms CPU step on the quickstart UNet; two
        # full copies of the gradients on a GPU). The sum over one rank is the identity: skip it.
        engine.enable_backward_allreduce = False
    if cfg.train.compile:
        engine.compile()
    return engine


def param_dtype(module: torch.nn.Module) -> torch.dtype:
    return next(module.parameters()).dtype


def model_fn(engine: Any) -> Callable[..., torch.Tensor]:
    """The model as the diffusion losses call it: float32 in, float32 out.

    With bf16 enabled DeepSpeed stores the module in bf16, so inputs are cast to the parameter dtype;
    the output is cast back to float32 because the variance and KL arithmetic must stay in float32.
    """
    dtype = param_dtype(engine.module)

    def call(x: torch.Tensor, t: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        return engine(x.to(dtype), t, **kwargs).float()

    return call


def full_weights(engine: Any) -> dict[str, torch.Tensor]:
    """Full float32 weights of the (possibly ZeRO-3 partitioned) module, on the host. Collective."""
    import deepspeed

    params = list(engine.module.parameters())
    with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
        return {k: v.detach().float().cpu().clone() for k, v in engine.module.state_dict().items()}
