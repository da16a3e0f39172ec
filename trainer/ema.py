"""Exponential moving averages of the model parameters, in float32, at several rates, partitioned over ranks.

The shadows are float32 even when the module is bf16: with bf16 shadows an update of
(1 - 0.9999)·(θ - θ_ema) is far below bf16's resolution (8 bits of mantissa) and rounds to nothing.

Every rank holds, updates and saves only its part of the average, so a checkpoint carries one copy of it
whatever the number of ranks, and each rank's EMA memory is 1/N of a full copy:

- ``sliced`` (ZeRO-0/1/2, where every rank holds the full weights): the parameters, flattened in
  ``named_parameters()`` order, form one vector of ``numel`` values; rank ``r`` of ``W`` keeps the contiguous
  slice ``[r·s, min((r+1)·s, numel))`` with ``s = ceil(numel / W)``, read straight out of the weights it
  already has (no communication per step).
- ``zero3``: each rank averages its own parameter shards (``p.ds_tensor``, DeepSpeed's flat zero-padded
  slice ``[r·s, (r+1)·s)`` of each parameter with ``s = ceil(numel / W)``).

The state says which layout, rank and world it was saved with (and for ``sliced`` the slice bounds), so a
load reassembles the full average from the states of every saving rank and cuts this rank's part of it, at
any world size and from either layout. :meth:`EMA.full_state_dicts` gathers the full average (one
all-gather) for exports, grids and evaluation: collective, call it on every rank.

What is averaged is the module's working copy of the weights: with bf16 that is the bf16 rounding of
DeepSpeed's fp32 master weights (relative error <= 2^-9 per step, round-to-nearest). The fp32 masters
of ZeRO 1/2 live in flat partitions whose layout is DeepSpeed-internal; averaging those would remove
that rounding at the cost of depending on private structures, which we chose not to do.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

SLICED = "sliced"
ZERO3 = "zero3"
FULL = "full"
"""The layout of states written before the EMA was partitioned: every rank saved the full average."""


def _is_zero3(p: torch.nn.Parameter) -> bool:
    return hasattr(p, "ds_tensor")


def slice_bounds(numel: int, world: int, rank: int) -> tuple[int, int]:
    """``[start, end)`` of rank ``rank``'s part of a ``numel``-long vector cut into ``world`` contiguous parts."""
    size = math.ceil(numel / world) if numel else 0
    start = min(rank * size, numel)
    return start, min(start + size, numel)


def _rank_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


@dataclass(frozen=True)
class _Piece:
    """The part of parameter ``index`` (flat ``[lo, hi)``) that lies in this rank's slice."""

    index: int
    lo: int
    hi: int


class EMA:
    def __init__(self, module: torch.nn.Module, rates: list[float]) -> None:
        named = [(n, p) for n, p in module.named_parameters()]
        self.names = [n for n, _ in named]
        self._params = [p for _, p in named]
        self.zero3 = any(_is_zero3(p) for p in self._params)
        self.layout = ZERO3 if self.zero3 else SLICED
        self.rates = list(rates)
        self.rank, self.world = _rank_world()
        self.shapes = [tuple(p.ds_shape if self.zero3 else p.shape) for p in self._params]
        self.numel = sum(math.prod(s) for s in self.shapes)
        self.start, self.end = slice_bounds(self.numel, self.world, self.rank)
        self._pieces: list[_Piece] = []
        offset = 0
        for i, shape in enumerate(self.shapes):
            n = math.prod(shape)
            lo, hi = max(self.start, offset), min(self.end, offset + n)
            if not self.zero3 and lo < hi:
                self._pieces.append(_Piece(i, lo - offset, hi - offset))
            offset += n
        self._flat: dict[float, torch.Tensor] = {}
        self.shadows: dict[float, list[torch.Tensor]] = {}
        """Per rate: the tensors this rank averages (pieces of its slice, or its ZeRO-3 shards)."""
        for rate in self.rates:
            self._allocate(rate)

    def _allocate(self, rate: float) -> None:
        if self.zero3:
            self.shadows[rate] = [p.ds_tensor.detach().float().clone() for p in self._params]
            return
        device = self._params[0].device if self._params else torch.device("cpu")
        flat = torch.empty(self.end - self.start, dtype=torch.float32, device=device)
        self._flat[rate] = flat
        views, at = [], 0
        for piece in self._pieces:
            views.append(flat[at : at + piece.hi - piece.lo])
            at += piece.hi - piece.lo
        self.shadows[rate] = views
        self._restart_from_weights(rate)

    def _current(self) -> list[torch.Tensor]:
        """This rank's part of the weights, as float32 tensors matching ``shadows``."""
        if self.zero3:
            return [p.ds_tensor.float() for p in self._params]
        return [self._params[c.index].data.reshape(-1)[c.lo : c.hi].float() for c in self._pieces]

    @torch.no_grad()
    def update(self, keep: torch.Tensor | None = None) -> None:
        """θ_ema ← rate·θ_ema + (1 − rate)·θ. ``keep`` (a 0-d float tensor on the device, 1 or 0) scales the
        step, so a step found non-finite on the device leaves the shadows as they were without the host
        reading the verdict (the weights are then unchanged and finite: θ_ema + 0·(θ − θ_ema) = θ_ema)."""
        current = self._current()
        if not current:
            return
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

    @torch.no_grad()
    def _restart_from_weights(self, rate: float) -> None:
        # A rate added since the checkpoint starts from the resumed weights (the caller loads the engine
        # before the EMA), not from the random initial weights the shadow was built from.
        for shadow, value in zip(self.shadows[rate], self._current(), strict=True):
            shadow.copy_(value)

    # -- persistence: each rank saves its own part
    def state_dict(self) -> dict[str, Any]:
        common = {"layout": self.layout, "rates": list(self.rates), "rank": self.rank, "world": self.world}
        if self.zero3:
            shadows = {str(r): dict(zip(self.names, s, strict=True)) for r, s in self.shadows.items()}
            return {**common, "zero3": True, "shadows": shadows}
        return {
            **common,
            "zero3": False,
            "numel": self.numel,
            "start": self.start,
            "end": self.end,
            "names": list(self.names),
            "shapes": [list(s) for s in self.shapes],
            "shadows": {str(r): self._flat[r] for r in self.rates},
        }

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the part this rank saved (same world size); a state of another layout or slice is
        resharded when it alone holds everything needed (a full one), else refused."""
        layout = _layout_of(state)
        same = layout == self.layout and (
            self.zero3 or (state["start"], state["end"], state["numel"]) == (self.start, self.end, self.numel)
        )
        if not same:
            if layout == FULL or (layout == SLICED and (state["start"], state["end"]) == (0, state["numel"])):
                self.load_state_dict_resharded([state])
                return
            raise ValueError(
                f"EMA state of rank {state.get('rank')}/{state.get('world')} ({layout}) does not match this rank's "
                f"part ({self.layout}, rank {self.rank}/{self.world}): resume with the same ZeRO stage"
            )
        saved = state["shadows"]
        for rate in self.rates:
            if str(rate) not in saved:
                self._restart_from_weights(rate)
            elif self.zero3:
                _copy_by_name(self.names, self.shadows[rate], saved[str(rate)])
            else:
                src = saved[str(rate)]
                if src.shape != self._flat[rate].shape:
                    want = tuple(self._flat[rate].shape)
                    raise ValueError(f"EMA slice: saved {tuple(src.shape)} values, expected {want}")
                self._flat[rate].copy_(src)

    @torch.no_grad()
    def load_state_dict_resharded(self, states: list[dict[str, Any]]) -> None:
        """Restore this rank's part from the ``state_dict()`` of every rank of the saving world, in rank
        order, whatever that world's size and layout were: the full average is reassembled (``sliced``:
        each slice at its bounds; ``zero3``: each parameter's shards concatenated in rank order and cut to
        its size; ``full``: any one state), then this rank's part is cut from it."""
        if not states:
            raise ValueError("EMA resharding needs the state of at least one saved rank")
        rate_names = [set(s["shadows"]) for s in states]
        if any(r != rate_names[0] for r in rate_names):
            raise ValueError("EMA states of the saved ranks hold different rates")
        for rate in self.rates:
            if str(rate) not in rate_names[0]:
                self._restart_from_weights(rate)
                continue
            full = self._assemble(states, str(rate))
            self._take_part(rate, full)

    def _assemble(self, states: list[dict[str, Any]], rate: str) -> dict[str, torch.Tensor]:
        """The full average at ``rate`` as flat tensors by parameter name."""
        layout = _layout_of(states[0])
        if any(_layout_of(s) != layout for s in states):
            raise ValueError("EMA states of the saved ranks have different layouts")
        if layout == SLICED:
            numel = int(states[0]["numel"])
            flat = torch.empty(numel, dtype=torch.float32)
            covered = torch.zeros(numel, dtype=torch.bool)
            for s in states:
                start, end = int(s["start"]), int(s["end"])
                flat[start:end] = s["shadows"][rate].reshape(-1).cpu()
                covered[start:end] = True
            if not bool(covered.all()):
                raise ValueError(f"EMA slices of the saved ranks cover {int(covered.sum())} of {numel} values")
            out, at = {}, 0
            for name, shape in zip(states[0]["names"], states[0]["shapes"], strict=True):
                n = math.prod(shape)
                out[name] = flat[at : at + n]
                at += n
            return out
        per_rank = [s["shadows"][rate] for s in states]
        out = {}
        for name, p in zip(self.names, self._params, strict=True):
            if any(name not in by_name for by_name in per_rank):
                raise KeyError(f"EMA state has no parameter '{name}'")
            numel = p.ds_numel if self.zero3 else p.numel()
            if layout == ZERO3:
                whole = torch.cat([by_name[name].reshape(-1).cpu() for by_name in per_rank])
                if whole.numel() < numel:
                    raise ValueError(f"EMA '{name}': saved {whole.numel()} values, parameter has {numel}")
                out[name] = whole[:numel]
            else:
                out[name] = per_rank[0][name].reshape(-1).cpu()
        return out

    def _take_part(self, rate: float, full: dict[str, torch.Tensor]) -> None:
        for name, shape in zip(self.names, self.shapes, strict=True):
            if name not in full:
                raise KeyError(f"EMA state has no parameter '{name}'")
            if full[name].numel() != math.prod(shape):
                raise ValueError(f"EMA '{name}': saved {full[name].numel()} values, parameter has {math.prod(shape)}")
        if not self.zero3:
            for piece, shadow in zip(self._pieces, self.shadows[rate], strict=True):
                shadow.copy_(full[self.names[piece.index]][piece.lo : piece.hi])
            return
        for name, p, shadow in zip(self.names, self._params, self.shadows[rate], strict=True):
            size = shadow.numel()  # this rank's ds_tensor size: ceil(numel / world)
            start = dist.get_rank(group=getattr(p, "ds_process_group", None)) * size
            part = full[name][start : start + size]
            shadow.zero_()
            shadow[: part.numel()].copy_(part)

    # -- export
    @torch.no_grad()
    def full_state_dicts(self, rates: list[float] | None = None) -> dict[str, dict[str, torch.Tensor]]:
        """The full float32 average at each rate (default: all), on the host, keyed ``str(rate)`` then
        parameter name. Collective when there is more than one rank: one all-gather for all rates."""
        rates = list(self.rates if rates is None else rates)
        if self.zero3:
            return {str(r): self._gather_zero3(r) for r in rates}
        if self.world == 1:
            flats = [self._flat[r].detach().cpu() for r in rates]
        else:
            size = math.ceil(self.numel / self.world)
            mine = torch.zeros(len(rates), size, dtype=torch.float32, device=self._flat[rates[0]].device)
            for i, r in enumerate(rates):
                mine[i, : self.end - self.start] = self._flat[r]
            parts = [torch.empty_like(mine) for _ in range(self.world)]
            dist.all_gather(parts, mine)
            whole = torch.cat(parts, dim=1)[:, : self.numel].cpu()
            flats = list(whole)
        out = {}
        for r, flat in zip(rates, flats, strict=True):
            by_name, at = {}, 0
            for name, shape in zip(self.names, self.shapes, strict=True):
                n = math.prod(shape)
                by_name[name] = flat[at : at + n].clone().view(shape)
                at += n
            out[str(r)] = by_name
        return out

    def full_state_dict(self, rate: float) -> dict[str, torch.Tensor]:
        """Full float32 tensors keyed by parameter name (collective: call on every rank)."""
        return self.full_state_dicts([rate])[str(rate)]

    def _gather_zero3(self, rate: float) -> dict[str, torch.Tensor]:
        world = dist.get_world_size()
        out: dict[str, torch.Tensor] = {}
        for name, p, s in zip(self.names, self._params, self.shadows[rate], strict=True):
            parts = [torch.empty_like(s) for _ in range(world)]
            dist.all_gather(parts, s.contiguous())
            out[name] = torch.cat(parts)[: p.ds_numel].view(p.ds_shape).cpu()
        return out


def _layout_of(state: dict[str, Any]) -> str:
    if "layout" in state:
        return str(state["layout"])
    return ZERO3 if state.get("zero3") else FULL


def _copy_by_name(names: list[str], shadows: list[torch.Tensor], saved: dict[str, torch.Tensor]) -> None:
    for name, shadow in zip(names, shadows, strict=True):
        if name not in saved:
            raise KeyError(f"EMA state has no parameter '{name}'")
        src = saved[name]
        if src.shape != shadow.shape:
            raise ValueError(f"EMA '{name}': saved shape {tuple(src.shape)} != {tuple(shadow.shape)}")
        shadow.copy_(src)
