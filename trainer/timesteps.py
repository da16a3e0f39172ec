"""Timestep samplers: uniform, and importance sampling from a loss history shared by all ranks.

Nichol & Dhariwal 2021 ("Improved DDPM", §3.3, eq. 18) note that L_vlb = Σ_t L_t is dominated by a
few timesteps, so estimating it with uniformly drawn t is noisy. They draw t with
p_t ∝ sqrt(E[L_t²]), estimated from the last N values of L_t seen for every t, and weight each draw
so the estimate stays unbiased. Our losses are means over t (Σ_t L_t = T · E_{t~U}[L_t]), so the
weight is 1/(T·p_t):  E_{t~p}[L(t) / (T p_t)] = Σ_t L(t) / T  for any per-sample loss L(t).

Which loss feeds the history
    The trainer feeds what ``diffusion.history_term`` names: "loss", the per-sample loss being optimised
    (improved-diffusion's choice), or "vb", described here. With "vb",
    ``record(t, losses)`` takes the per-sample L_vlb term L_t, in bits/dim, exactly as the diffusion
    loss computes it for the drawn t (KL(q(x_{t-1}|x_t,x_0) ‖ p(x_{t-1}|x_t)) for t > 0, the discretized
    decoder NLL for t = 0), detached, *unweighted*: before the 1/(T p_t) weight and before the λ·T
    factor of the hybrid objective. Under ``loss: kl`` that term is the whole loss; under ``hybrid``
    it is the part whose variance the paper reduces (L_simple barely varies with t in comparison).
    The returned weights multiply each sample's full loss (L_simple + λ·T·L_t under hybrid), which
    keeps the estimate of the uniform-t objective unbiased for both terms.

Distributed contract
    Every rank must draw t from the identical distribution, so every rank must hold a bit-identical
    history. ``record`` only queues (t, loss) pairs locally (once per micro-batch, no communication);
    ``sync`` runs once per optimizer step: it all-gathers every rank's queued pairs (:mod:`trainer.exchange`:
    uneven per-rank counts, no pickling, tensors on ``device`` so NCCL works too) and folds them into the
    history in rank-major, then record, order. Construct, load and sync the sampler on
    every rank.
    All ranks fold the same bytes with the same deterministic code (element-wise IEEE operations and an
    exactly rounded ``math.fsum``), so their histories and p_t agree bit for bit. Each sample's t comes
    from its own uniform (:meth:`TimestepSampler.draw`, ``trainer/per_sample.py``), and each rank holds a
    contiguous slice of the global batch, so rank-major order is the batch's order on any world size. The
    history is global, so a state saved at one world size resumes at any other.
"""

from __future__ import annotations

import math
import numbers
from enum import Enum
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from trainer.exchange import Exchange, LocalExchange


class TimestepSamplerKind(str, Enum):
    UNIFORM = "uniform"
    LOSS_SECOND_MOMENT = "loss-second-moment"


class TimestepSampler:
    """Draws timesteps t ∈ [0, T) and the importance weights 1/(T p_t) that keep losses unbiased.

    The base class is the uniform sampler's behaviour minus the drawing; subclasses override
    :meth:`probabilities` and, when they learn from losses, :meth:`record` / :meth:`sync`.
    """

    kind: TimestepSamplerKind

    def __init__(self, num_timesteps: int, device: torch.device | str = "cpu") -> None:
        if not isinstance(num_timesteps, int) or num_timesteps < 1:
            raise ValueError(f"num_timesteps must be a positive int, got {num_timesteps!r}")
        self.num_timesteps = num_timesteps
        self.device = torch.device(device)

    # ------------------------------------------------------------------ drawing
    def probabilities(self) -> np.ndarray:
        """p_t over t = 0..T-1 as float64 (identical on every rank)."""
        return np.full(self.num_timesteps, 1.0 / self.num_timesteps)

    def sample(self, batch_size: int, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Draw ``batch_size`` timesteps. Returns (t: int64 [B], weights: float32 [B]), both on ``device``.

        ``generator`` (CPU or on ``device``) makes the draw reproducible; ranks should use different
        streams: the distribution, not the draw, is what must agree across ranks.
        """
        if not isinstance(batch_size, numbers.Integral) or batch_size < 0:
            raise ValueError(f"batch_size must be an int >= 0, got {batch_size!r}")
        batch_size = int(batch_size)
        draw_device = generator.device if generator is not None else self.device
        if self._is_uniform():
            t = torch.randint(0, self.num_timesteps, (batch_size,), generator=generator, device=draw_device).to(
                self.device
            )
            return t, torch.ones(batch_size, dtype=torch.float32, device=self.device)
        if batch_size == 0:
            t = torch.zeros(0, dtype=torch.long, device=self.device)
            return t, torch.zeros(0, dtype=torch.float32, device=self.device)
        # Non-blocking host-to-device copies: a blocking one waits for the device's whole queue.
        probs = torch.from_numpy(self.probabilities()).to(draw_device, non_blocking=True)
        t = torch.multinomial(probs, batch_size, replacement=True, generator=generator).to(self.device)
        weights = torch.from_numpy(self.weights()).to(self.device, non_blocking=True)[t]
        return t, weights

    def draw(self, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Timesteps by inverse transform of uniforms ``u`` (float64 [B] in [0, 1), one per sample, from the
        sample's own generator: ``trainer/per_sample.py``). Returns (t: int64 [B], weights: float32 [B]) on
        ``u``'s device. The same ``u`` and history give the same t on every rank and any world size:
        t = the first index whose cumulative probability exceeds u (uniform: floor(u·T)). No host read."""
        T = self.num_timesteps
        if self._is_uniform():
            t = (u * T).long().clamp_(max=T - 1)
            return t, torch.ones(t.shape[0], dtype=torch.float32, device=u.device)
        # The CDF in float64 on the host, summed in order: the same bits on every rank.
        cdf = torch.from_numpy(np.cumsum(self.probabilities())).to(u.device, non_blocking=True)
        t = torch.searchsorted(cdf, u, right=True).clamp_(max=T - 1)
        weights = torch.from_numpy(self.weights()).to(u.device, non_blocking=True)[t]
        return t, weights

    def weights(self) -> np.ndarray:
        """1/(T·p_t) per t as float32; exactly 1 while the distribution is uniform."""
        if self._is_uniform():
            return np.ones(self.num_timesteps, dtype=np.float32)
        return (1.0 / (self.num_timesteps * self.probabilities())).astype(np.float32)

    @property
    def importance_active(self) -> bool:
        """True once t is drawn non-uniformly (weights differ from 1)."""
        return not self._is_uniform()

    def _is_uniform(self) -> bool:
        return True

    # ------------------------------------------------------------------ learning from losses
    def record(self, t: torch.Tensor, losses: torch.Tensor) -> None:
        """Queue one micro-batch's per-sample (t, loss) pairs locally. The uniform sampler drops them."""
        _check_pairs(t, losses)

    def sync(self) -> int:
        """Fold all ranks' queued pairs into the history; returns how many. The uniform sampler has none."""
        return 0

    def start_sync(self) -> None:
        """Start exchanging the queued pairs without waiting (see :meth:`LossSecondMomentSampler.start_sync`)."""

    def reject_inflight(self) -> None:
        """The step whose pairs are being exchanged was skipped: drop them when they arrive."""

    def collect(self) -> None:
        """Wait for an exchange in flight and keep its pairs, not yet folded."""

    def finish_sync(self) -> int:
        """Fold everything exchanged so far; returns how many pairs."""
        return 0

    def history_stats(self) -> dict[str, np.ndarray] | None:
        """Per-t ``count``, ``mean`` and ``rms`` of the history (NaN where empty); None without a history."""
        return None

    # ------------------------------------------------------------------ checkpointing
    def state_dict(self) -> dict[str, Any]:
        return {"sampler": self.kind.value, "num_timesteps": self.num_timesteps}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        _expect(state, "sampler", self.kind.value)
        _expect(state, "num_timesteps", self.num_timesteps)


class UniformSampler(TimestepSampler):
    """t ~ U{0..T-1}, weights 1 (Ho et al. 2020, Algorithm 1)."""

    kind = TimestepSamplerKind.UNIFORM


class LossSecondMomentSampler(TimestepSampler):
    """p_t ∝ sqrt(mean of the last N values of L_t²), mixed with a uniform share (Nichol & Dhariwal eq. 18).

    Uniform until every t has N recorded values; afterwards p = (1-u)·p_raw + u/T. The history is a ring
    buffer per t: ``writes[t]`` counts every value ever recorded for t, and the next one lands in slot
    ``writes[t] % N``, so the oldest surviving value sits at that slot once the row is full.
    """

    kind = TimestepSamplerKind.LOSS_SECOND_MOMENT

    def __init__(
        self,
        num_timesteps: int,
        history_per_term: int = 10,
        uniform_prob: float = 0.001,
        device: torch.device | str = "cpu",
        process_group: dist.ProcessGroup | None = None,
    ) -> None:
        super().__init__(num_timesteps, device)
        if not isinstance(history_per_term, int) or history_per_term < 1:
            raise ValueError(f"history_per_term must be a positive int, got {history_per_term!r}")
        if not 0.0 <= uniform_prob <= 1.0:
            raise ValueError(f"uniform_prob must lie in [0, 1], got {uniform_prob!r}")
        self.history_per_term = history_per_term
        self.uniform_prob = float(uniform_prob)
        self.process_group = process_group
        self._history = np.zeros((num_timesteps, history_per_term), dtype=np.float64)
        self._writes = np.zeros(num_timesteps, dtype=np.int64)
        self.dropped_nonfinite = 0
        """Gathered pairs whose loss was NaN/inf, skipped (identically on every rank) rather than stored."""
        self._pending: list[torch.Tensor] = []
        self._probs: np.ndarray | None = None
        # Rows per rank the exchange sends without a second round; it follows the gathered counts,
        # so it is the same on every rank as long as all ranks construct, load and sync together.
        self._capacity = 0
        self._inflight: Exchange | LocalExchange | None = None
        self._gathered: list[np.ndarray] = []
        """Pairs exchanged but not folded yet, in exchange order (identical on every rank)."""

    # ------------------------------------------------------------------ distribution
    @property
    def warmed_up(self) -> bool:
        return bool((self._writes >= self.history_per_term).all())

    def _is_uniform(self) -> bool:
        return self._probabilities_or_none() is None

    def probabilities(self) -> np.ndarray:
        probs = self._probabilities_or_none()
        return super().probabilities() if probs is None else probs.copy()

    def _probabilities_or_none(self) -> np.ndarray | None:
        """The importance distribution, or None while it is uniform (warm-up or an all-zero history)."""
        if self._probs is not None:
            return self._probs
        if not self.warmed_up:
            return None
        # Sum the squares column by column: element-wise IEEE adds give the same bits on every
        # machine, where a vectorised reduction may reorder by SIMD width. fsum is exactly rounded.
        squares = self._history * self._history
        total_sq = squares[:, 0].copy()
        for j in range(1, self.history_per_term):
            total_sq += squares[:, j]
        rms = np.sqrt(total_sq / self.history_per_term)
        norm = math.fsum(rms.tolist())
        if not (norm > 0.0 and math.isfinite(norm)):
            return None
        u, n = self.uniform_prob, self.num_timesteps
        self._probs = (1.0 - u) * (rms / norm) + u / n
        return self._probs

    # ------------------------------------------------------------------ history
    def record(self, t: torch.Tensor, losses: torch.Tensor) -> None:
        """Queue a micro-batch's pairs on ``device`` (no host sync, no communication)."""
        _check_pairs(t, losses)
        if t.numel() == 0:
            return
        pairs = torch.stack([t.detach().to(torch.float64), losses.detach().to(torch.float64)], dim=1)
        self._pending.append(pairs.to(self.device))

    def sync(self) -> int:
        """All-gather every rank's queued pairs and fold them in rank-major order. Call on every rank."""
        self.start_sync()
        return self.finish_sync()

    def start_sync(self) -> None:
        """Start the all-gather of the queued pairs and return at once (no host sync). The trainer starts
        a step's exchange after the step and finishes it after the next one, so the GPU is never drained
        for it; every rank folds the same pairs at the same point, so histories stay bit-identical (t is
        then drawn from a history one step older, identically on every rank). Call on every rank."""
        if self._inflight is not None:
            self.collect()
        local = (
            torch.cat(self._pending) if self._pending else torch.zeros((0, 2), dtype=torch.float64, device=self.device)
        )
        self._pending = []
        if dist.is_available() and dist.is_initialized() and dist.get_world_size(self.process_group) > 1:
            self._inflight = Exchange(local, self.process_group, self._capacity)
        elif len(local):
            self._inflight = LocalExchange(local)

    def reject_inflight(self) -> None:
        """The step whose pairs are in flight was skipped (every rank learns it at the same point): its
        pairs are dropped when they arrive, so the history never sees a skipped step."""
        if self._inflight is not None:
            self._inflight.rejected = True

    def collect(self) -> None:
        """Wait for the exchange in flight and keep its pairs (not folded: folding stays where it would
        have been, so a checkpoint written here changes nothing). Collective when one is in flight."""
        if self._inflight is None:
            return
        pairs, self._capacity = self._inflight.result()
        rejected, self._inflight = self._inflight.rejected, None
        if len(pairs) and not rejected:
            self._gathered.append(pairs)

    def finish_sync(self) -> int:
        """Fold every pair exchanged so far, in the order exchanged; returns how many."""
        self.collect()
        if not self._gathered:
            return 0
        pairs = np.concatenate(self._gathered)
        self._gathered = []
        self._fold(pairs)
        return len(pairs)

    @property
    def pending(self) -> int:
        """Locally queued pairs not yet folded by :meth:`sync`."""
        return sum(len(p) for p in self._pending)

    def _fold(self, pairs: np.ndarray) -> None:
        t_float, losses = pairs[:, 0], pairs[:, 1]
        t = t_float.astype(np.int64)
        bad = (t != t_float) | (t < 0) | (t >= self.num_timesteps)
        if bad.any():
            raise ValueError(
                f"timestep sampler: recorded t must be integers in [0, {self.num_timesteps}), "
                f"got {float(t_float[bad][0]):g}"
            )
        finite = np.isfinite(losses)
        self.dropped_nonfinite += int((~finite).sum())
        t, losses = t[finite], losses[finite]
        if len(t) == 0:
            return
        # Stable sort by t keeps each t's values in arrival order; only the last N per t survive,
        # and those land in N distinct ring slots, so the scatter below has no collisions.
        n_hist = self.history_per_term
        order = np.argsort(t, kind="stable")
        t_sorted, loss_sorted = t[order], losses[order]
        uniq, first, counts = np.unique(t_sorted, return_index=True, return_counts=True)
        pos = np.arange(len(t_sorted)) - np.repeat(first, counts)
        keep = pos >= np.repeat(counts, counts) - n_hist
        slots = (self._writes[t_sorted] + pos) % n_hist
        self._history[t_sorted[keep], slots[keep]] = loss_sorted[keep]
        self._writes[uniq] += counts
        self._probs = None

    def history_stats(self) -> dict[str, np.ndarray]:
        count = np.minimum(self._writes, self.history_per_term)
        # While a row is filling, its values occupy slots 0..count-1.
        mask = np.arange(self.history_per_term)[None, :] < count[:, None]
        with np.errstate(invalid="ignore", divide="ignore"):
            mean = np.where(mask, self._history, 0.0).sum(axis=1) / count
            rms = np.sqrt(np.where(mask, self._history**2, 0.0).sum(axis=1) / count)
        return {"count": count, "mean": mean, "rms": rms}

    # ------------------------------------------------------------------ checkpointing
    def state_dict(self) -> dict[str, Any]:
        """The global history (identical on all ranks; save it from any one). Call after :meth:`sync`."""
        if self._pending or self._inflight is not None:
            raise RuntimeError(
                "timestep sampler: recorded pairs not yet exchanged; call sync() or collect() before state_dict()"
            )
        gathered = np.concatenate(self._gathered) if self._gathered else np.zeros((0, 2))
        return {
            **super().state_dict(),
            "history_per_term": self.history_per_term,
            "history": torch.from_numpy(self._history.copy()),
            "writes": torch.from_numpy(self._writes.copy()),
            "dropped_nonfinite": self.dropped_nonfinite,
            "exchanged_unfolded": torch.from_numpy(gathered.astype(np.float64)),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a state saved at any world size. Call on every rank (the exchange restarts too)."""
        super().load_state_dict(state)
        _expect(state, "history_per_term", self.history_per_term)
        shape = (self.num_timesteps, self.history_per_term)
        history = torch.as_tensor(state.get("history"), dtype=torch.float64)
        writes = torch.as_tensor(state.get("writes"), dtype=torch.int64)
        if tuple(history.shape) != shape or tuple(writes.shape) != (self.num_timesteps,):
            raise ValueError(
                f"timestep sampler state: history/writes shapes {tuple(history.shape)}/{tuple(writes.shape)} "
                f"do not match {shape}/({self.num_timesteps},)"
            )
        if bool((writes < 0).any()):
            raise ValueError("timestep sampler state: 'writes' has negative counts")
        self._history = history.cpu().numpy().copy()
        self._writes = writes.cpu().numpy().copy()
        self.dropped_nonfinite = int(state.get("dropped_nonfinite", 0))
        self._pending = []
        self._probs = None
        self._capacity = 0
        self._inflight = None
        unfolded = torch.as_tensor(state.get("exchanged_unfolded", torch.zeros((0, 2))), dtype=torch.float64)
        self._gathered = [unfolded.cpu().numpy().reshape(-1, 2)] if unfolded.numel() else []


def _check_pairs(t: torch.Tensor, losses: torch.Tensor) -> None:
    if not isinstance(t, torch.Tensor) or not isinstance(losses, torch.Tensor):
        raise TypeError("timestep sampler: record(t, losses) takes two tensors")
    if t.dim() != 1 or t.shape != losses.shape:
        raise ValueError(
            f"timestep sampler: record(t, losses) needs two 1-D tensors of equal length, "
            f"got shapes {tuple(t.shape)} and {tuple(losses.shape)}"
        )
    if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
        raise TypeError(f"timestep sampler: t must be an integer tensor, got {t.dtype}")


def _expect(state: dict[str, Any], key: str, value: Any) -> None:
    if key not in state:
        raise ValueError(f"timestep sampler state: missing key '{key}'")
    if state[key] != value:
        raise ValueError(f"timestep sampler state: '{key}' is {state[key]!r}, this sampler has {value!r}")


# --------------------------------------------------------------------------- construction


def create_timestep_sampler(
    name: str | TimestepSamplerKind,
    num_timesteps: int,
    history_per_term: int = 10,
    uniform_prob: float = 0.001,
    device: torch.device | str = "cpu",
    process_group: dist.ProcessGroup | None = None,
) -> TimestepSampler:
    """Build a sampler by name. ``device`` is where t, weights and communication tensors live
    (cpu for gloo, the rank's cuda device for NCCL)."""
    try:
        kind = TimestepSamplerKind(name)
    except ValueError:
        choices = ", ".join(repr(k.value) for k in TimestepSamplerKind)
        raise ValueError(f"unknown timestep sampler {name!r}; choose one of {choices}") from None
    if kind is TimestepSamplerKind.UNIFORM:
        return UniformSampler(num_timesteps, device=device)
    return LossSecondMomentSampler(
        num_timesteps,
        history_per_term=history_per_term,
        uniform_prob=uniform_prob,
        device=device,
        process_group=process_group,
    )


def sampler_from_config(diffusion: Any, device: torch.device | str = "cpu") -> TimestepSampler:
    """Build the sampler a :class:`trainer.config.DiffusionConfig` describes."""
    return create_timestep_sampler(
        diffusion.timestep_sampler,
        num_timesteps=diffusion.steps,
        history_per_term=diffusion.history_per_term,
        uniform_prob=diffusion.uniform_prob,
        device=device,
    )


# --------------------------------------------------------------------------- observability


def sampler_summary_metrics(sampler: TimestepSampler) -> dict[str, float]:
    """Scalar health numbers: whether importance sampling is active, and the spread of p_t and weights."""
    probs = sampler.probabilities()
    weights = sampler.weights()
    return {
        "ts_importance_active": float(sampler.importance_active),
        "ts_p_max_over_uniform": float(probs.max() * sampler.num_timesteps),
        "ts_p_min_over_uniform": float(probs.min() * sampler.num_timesteps),
        "ts_weight_max": float(weights.max()),
    }
