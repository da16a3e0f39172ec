"""Exponential moving averages of the model parameters, in float32, at several rates, ZeRO-aware.

The shadows are float32 even when the module is bf16: with bf16 shadows an update of
(1 - 0.9999)·(θ - θ_ema) is far below bf16's resolution (8 bits of mantissa) and rounds to nothing.
Under ZeRO-3 each rank averages only its own parameter shard (``p.ds_tensor``), so no gather is
needed per step; :meth:`EMA.full_state_dict` gathers the shards when a full copy is wanted.

What is averaged is the module's working copy of the weights: with bf16 that is the bf16 rounding of
DeepSpeed's fp32 master weights (relative error <= 2^-9 per step, round-to-nearest). The fp32 masters
of ZeRO 1/2 live in flat partitions whose layout is DeepSpeed-internal; averaging those would remove
that rounding at the cost of depending on private structures, which we chose not to do.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def _is_zero3(p: torch.nn.Parameter) -> bool:
    return hasattr(p, "ds_tensor")


class EMA:
    def __init__(self, module: torch.nn.Module, rates: list[float]) -> None:
        named = [(n, p) for n, p in module.named_parameters()]
        self.names = [n for n, _ in named]
        self._params = [p for _, p in named]
        self.zero3 = any(_is_zero3(p) for p in self._params)
        self.rates = list(rates)
        self.shadows: dict[float, list[torch.Tensor]] = {
            r: [self._local(p).detach().float().clone() for p in self._params] for r in self.rates
        }

    def _local(self, p: torch.nn.Parameter) -> torch.Tensor:
        return p.ds_tensor if self.zero3 else p.data

    @torch.no_grad()
    def update(self) -> None:
        current = [self._local(p).float() for p in self._params]
        for rate, shadow in self.shadows.items():
            # θ_ema ← rate·θ_ema + (1 − rate)·θ
            torch._foreach_lerp_(shadow, current, 1.0 - rate)

    # -- persistence (each rank saves its own shadows; identical across ranks below ZeRO-3)
    def state_dict(self) -> dict[str, object]:
        return {
            "rates": list(self.rates),
            "zero3": self.zero3,
            "shadows": {str(r): dict(zip(self.names, s, strict=True)) for r, s in self.shadows.items()},
        }

    def load_state_dict(self, state: dict[str, object]) -> None:
        saved = state["shadows"]
        assert isinstance(saved, dict)
        for rate in self.rates:
            if str(rate) not in saved:
                # A rate added since the checkpoint starts from the current weights.
                continue
            by_name = saved[str(rate)]
            for name, shadow in zip(self.names, self.shadows[rate], strict=True):
                if name not in by_name:
                    raise KeyError(f"EMA state has no parameter '{name}'")
                src = by_name[name]
                if src.shape != shadow.shape:
                    raise ValueError(f"EMA '{name}': saved shape {tuple(src.shape)} != {tuple(shadow.shape)}")
                shadow.copy_(src)

    # -- export
    @torch.no_grad()
    def full_state_dict(self, rate: float) -> dict[str, torch.Tensor]:
        """Full float32 tensors keyed by parameter name (collective under ZeRO-3: call on every rank)."""
        shadow = self.shadows[rate]
        if not self.zero3:
            return {n: s.detach().clone().cpu() for n, s in zip(self.names, shadow, strict=True)}
        world = dist.get_world_size()
        out: dict[str, torch.Tensor] = {}
        for name, p, s in zip(self.names, self._params, shadow, strict=True):
            parts = [torch.empty_like(s) for _ in range(world)]
            dist.all_gather(parts, s.contiguous())
            out[name] = torch.cat(parts)[: p.ds_numel].view(p.ds_shape).cpu()
        return out
