"""The state protocol: what every part of a run with state implements, and the run's own counters.

A part with state (the engine, the EMA, the timestep history, the data stream, the metric window, the
counters below, the RNG streams) is a :class:`Stateful`: ``state_dict()`` returns plain values and
tensors, ``load_state_dict()`` restores them. :class:`trainer.checkpoint.CheckpointManager` saves a
named set of such parts, as torchtitan's checkpointer does. A per-rank part that can continue at
another world size also implements ``load_state_dict_resharded(states)`` (:class:`Reshardable`),
receiving the states every saving rank wrote, in rank order.

This is a leaf module: it imports nothing from the package, so any part may depend on it.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from typing import Any, Protocol, runtime_checkable

import torch


@runtime_checkable
class Stateful(Protocol):
    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


@runtime_checkable
class Reshardable(Stateful, Protocol):
    def load_state_dict_resharded(self, states: list[dict[str, Any]]) -> None: ...


class TrainState:
    """The run's counters and curves: identical on every rank, saved once (shared scope)."""

    def __init__(self) -> None:
        self.step = 0
        """Optimizer steps kept (a skipped non-finite step does not count)."""
        self.samples_seen = 0
        """Training images drawn over all ranks, skipped steps included."""
        self.skipped_steps = 0
        self.bad_streak = 0
        """Skipped steps in a row, up to the last one settled."""
        self.mlflow_run_id: str | None = None
        self.curves: dict[str, list[tuple[int, float]]] = defaultdict(list)

    def state_dict(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "samples_seen": self.samples_seen,
            "skipped_steps": self.skipped_steps,
            "bad_streak": self.bad_streak,
            "mlflow_run_id": self.mlflow_run_id,
            "curves": {k: [list(p) for p in v] for k, v in self.curves.items()},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step = int(state["step"])
        self.samples_seen = int(state["samples_seen"])
        self.skipped_steps = int(state.get("skipped_steps", 0))
        self.bad_streak = int(state.get("bad_streak", 0))
        self.mlflow_run_id = state.get("mlflow_run_id")
        self.curves = defaultdict(list, {k: [(int(a), float(b)) for a, b in v] for k, v in state["curves"].items()})


class RNGState:
    """The process's torch RNG streams (CPU, and CUDA where present) as a :class:`Stateful`.

    At another world size there is no saved stream for the new ranks: ``reseed()`` gives each rank a
    fresh, deterministic one instead."""

    def __init__(self, reseed: Callable[[], None]) -> None:
        self._reseed = reseed

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {"torch": torch.get_rng_state()}
        if torch.cuda.is_available():
            state["cuda"] = torch.cuda.get_rng_state()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        torch.set_rng_state(state["torch"])
        if "cuda" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state(state["cuda"])

    def load_state_dict_resharded(self, states: list[dict[str, Any]]) -> None:
        self._reseed()
