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
    def update(self, keep: torch.Tensor | None = None) -> None:
        """θ_ema ← rate·θ_ema + (1 − rate)·θ. ``keep`` (a 0-d float tensor on the device, 1 or 0) scales the
        step, so a step found non-finite on the device leaves the shadows as they were without the host
        reading the verdict (the weights are then unchanged and finite: θ_ema + 0·(θ − θ_ema) = θ_ema)."""
        current = [self._local(p).float() for p in self._params]
        for rate, shadow in self.shadows.items():
            weight = self._step_weight(rate, keep)
            if weight is None:
                torch._foreach_lerp_(shadow, current, 1.0 - rate)
                continue
            # The list form takes the weight as a tensor: the scalar form would read a 0-d tensor on the host.
            torch._foreach_lerp_(shadow, current, [weight] * len(shadow))

    def _step_weight(self, rate: float, keep: torch.Tensor | None) -> torch.Tensor | None:
        """The lerp weight of this step for the shadow keyed ``rate`` as a device tensor, or None for the
        constant 1 - rate. A hook: the power-function EMA (trainer/phema) varies it with the step."""
        return None if keep is None else keep * (1.0 - rate)

    # -- persistence (each rank saves its own shadows; identical across ranks below ZeRO-3)
    def state_dict(self) -> dict[str, object]:
        return {
            "rates": list(self.rates),
            "zero3": self.zero3,
            "shadows": {str(r): dict(zip(self.names, s, strict=True)) for r, s in self.shadows.items()},
        }

    def load_state_dict(self, state: dict[str, object]) -> None:
        """Restore the shadows saved by this rank (same world size and ZeRO-3 setting)."""
        saved = state["shadows"]
        assert isinstance(saved, dict)
        for rate in self.rates:
            if str(rate) not in saved:
                self._restart_from_weights(rate)
                continue
            by_name = saved[str(rate)]
            for name, shadow in zip(self.names, self.shadows[rate], strict=True):
                if name not in by_name:
                    raise KeyError(f"EMA state has no parameter '{name}'")
                src = by_name[name]
                if src.shape != shadow.shape:
                    raise ValueError(f"EMA '{name}': saved shape {tuple(src.shape)} != {tuple(shadow.shape)}")
                shadow.copy_(src)

    @torch.no_grad()
    def _restart_from_weights(self, rate: float) -> None:
        # A rate added since the checkpoint starts from the resumed weights (the caller loads the engine
        # before the EMA), not from the random initial weights the shadow was built from.
        for shadow, p in zip(self.shadows[rate], self._params, strict=True):
            shadow.copy_(self._local(p).float())

    @torch.no_grad()
    def load_state_dict_resharded(self, states: list[dict[str, object]]) -> None:
        """Restore this rank's shadows from the ``state_dict()`` of every rank of the saving world, in
        rank order, whatever that world's size and ZeRO-3 setting were.

        Below ZeRO-3 every rank saved the same full shadows, so rank 0's are taken. Under ZeRO-3 rank
        ``r`` of ``W`` saved the flat, zero-padded slice ``[r·s, (r+1)·s)`` of each parameter, with
        ``s = ceil(numel / W)`` (DeepSpeed's partitioning): the slices are concatenated in rank order and
        cut to ``numel`` to get the full tensor, which is then sliced for the current layout.
        """
        if not states:
            raise ValueError("EMA resharding needs the state of at least one saved rank")
        saved_zero3 = bool(states[0].get("zero3", False))
        if not saved_zero3 and not self.zero3:
            self.load_state_dict(states[0])
            return
        rate_names = [set(s["shadows"]) for s in states]  # type: ignore[arg-type]
        if any(r != rate_names[0] for r in rate_names):
            raise ValueError("EMA states of the saved ranks hold different rates")
        for rate in self.rates:
            if str(rate) not in rate_names[0]:
                self._restart_from_weights(rate)
                continue
            per_rank = [s["shadows"][str(rate)] for s in states]  # type: ignore[index]
            for name, p, shadow in zip(self.names, self._params, self.shadows[rate], strict=True):
                if any(name not in by_name for by_name in per_rank):
                    raise KeyError(f"EMA state has no parameter '{name}'")
                numel, shape = (p.ds_numel, p.ds_shape) if self.zero3 else (p.numel(), p.shape)
                if saved_zero3:
                    full = torch.cat([by_name[name].reshape(-1) for by_name in per_rank])
                else:
                    full = per_rank[0][name].reshape(-1)
                if full.numel() < numel or (not saved_zero3 and full.numel() != numel):
                    raise ValueError(f"EMA '{name}': saved {full.numel()} values, parameter has {numel}")
                full = full[:numel]
                if self.zero3:
                    size = shadow.numel()  # this rank's ds_tensor size: ceil(numel / world)
                    start = dist.get_rank(group=getattr(p, "ds_process_group", None)) * size
                    part = full[start : start + size]
                    shadow.zero_()
                    shadow[: part.numel()].copy_(part)
                else:
                    shadow.copy_(full.view(shape))

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
