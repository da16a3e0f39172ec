"""Training-loss statistics over a logging window, kept on the device and reduced across ranks.

Accumulating tensors instead of calling ``.item()`` per micro-batch avoids a host sync per step on
GPUs; reducing one fixed-size vector keeps every rank's collective identical in shape, even when a
rank drew no timestep in some quarter of [0, T).
"""

from __future__ import annotations

import time
from typing import Any

import torch
import torch.distributed as dist

_QUARTERS = 4
# Layout of the accumulator: loss·B, Σmse, Σvb, B, then per-quarter Σloss and counts.
_LOSS, _MSE, _VB, _N = 0, 1, 2, 3
_QSUM = 4
_QN = _QSUM + _QUARTERS
_SIZE = _QN + _QUARTERS


class _StagedStep:
    def __init__(self, like: torch.Tensor) -> None:
        self.sums = torch.zeros_like(like)


class LossWindow:
    """Sums over the optimizer steps since the last log. A step's micro-batches are staged and only
    counted once the step is known to be kept (:meth:`settle`), so a skipped non-finite step leaves no
    trace. The verdict on a step can arrive after the next step has begun (the trainer reads it a step
    late to keep the host from waiting on the device), so up to two steps are staged, oldest first."""

    def __init__(self, num_timesteps: int, device: torch.device) -> None:
        self.num_timesteps = num_timesteps
        self.acc = torch.zeros(_SIZE, dtype=torch.float64, device=device)
        self._staged: list[_StagedStep] = []
        self.steps = 0
        """Kept optimizer steps in the window."""

    def begin_step(self) -> None:
        """Open the staging slot of a new optimizer step: :meth:`add` writes there from now on."""
        self._staged.append(_StagedStep(self.acc))

    @torch.no_grad()
    def add(
        self, loss: torch.Tensor, per_sample: dict[str, torch.Tensor], t: torch.Tensor, weights: torch.Tensor
    ) -> None:
        """``loss``: the weighted scalar that was minimised; ``per_sample``: unweighted terms [B];
        ``weights``: the importance weights 1/(T p_t), so that mse and vb are logged as unbiased
        estimates of their uniform-t means whatever the timestep sampler (quartiles are per-t means
        and need no weights)."""
        if not self._staged:
            self.begin_step()
        staged = self._staged[-1]
        acc = staged.sums
        b = t.shape[0]
        w = weights.detach().double()
        acc[_LOSS] += loss.detach().double() * b
        acc[_MSE] += (per_sample["mse"].detach().double() * w).sum()
        acc[_VB] += (per_sample["vb"].detach().double() * w).sum()
        acc[_N] += b
        quarter = (t * _QUARTERS) // self.num_timesteps
        acc[_QSUM:_QN].scatter_add_(0, quarter, per_sample["loss"].detach().double())
        acc[_QN:_SIZE].scatter_add_(0, quarter, torch.ones_like(quarter, dtype=torch.float64))

    def settle(self, keep: bool) -> None:
        """The oldest staged step was kept (counted) or skipped (dropped)."""
        if not self._staged:
            return
        staged = self._staged.pop(0)
        if keep:
            self.acc += staged.sums
            self.steps += 1

    def discard(self) -> None:
        """Drop every staged step."""
        self._staged.clear()

    def reduce(self, extra: dict[str, float] | None = None) -> dict[str, float]:
        """Means over the window and over all ranks (collective when distributed); resets the window.
        ``extra`` values (the same keys on every rank) are summed over ranks in the same collective."""
        names = sorted(extra or {})
        tail = torch.tensor([float(extra[k]) for k in names], dtype=torch.float64, device=self.acc.device)  # type: ignore[index]
        acc = torch.cat([self.acc, tail])
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(acc)
        v = acc.tolist()
        n = max(v[_N], 1.0)
        out = {"loss": v[_LOSS] / n, "mse": v[_MSE] / n, "vb": v[_VB] / n}
        for q in range(_QUARTERS):
            if v[_QN + q] > 0:
                out[f"loss_q{q}"] = v[_QSUM + q] / v[_QN + q]
        out.update({k: v[_SIZE + i] for i, k in enumerate(names)})
        self.acc.zero_()
        self.steps = 0
        return out

    # -- checkpointing (per rank: each rank's window holds its own samples)
    def state_dict(self) -> dict[str, object]:
        return {"acc": self.acc.detach().cpu().clone(), "steps": self.steps}

    def load_state_dict(self, state: dict[str, object]) -> None:
        acc = state["acc"]
        assert isinstance(acc, torch.Tensor)
        self.acc.copy_(acc.to(self.acc.device))
        self.steps = int(state["steps"])  # type: ignore[arg-type]
        self.discard()

    def load_state_dict_resharded(self, states: list[dict[str, object]]) -> None:
        """At another world size the partial window's samples are summed into rank 0's window."""
        self.discard()
        self.acc.zero_()
        self.steps = int(states[0]["steps"])  # type: ignore[arg-type]  # the same on every rank
        if not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0:
            for st in states:
                self.acc += st["acc"].to(self.acc.device)  # type: ignore[union-attr]


class TrainingLog:
    """The log step's line and metrics: the loss window (reduced over ranks), the data stream's counters,
    the LR, the gradient norm, the timestep sampler's spread, throughput and the ETA; also the loss curves
    (kept in the run's state, drawn at the end). Collective: every rank calls :meth:`write`."""

    def __init__(
        self,
        window: LossWindow,
        stream: Any,
        sampler: Any,
        engine: Any,
        state: Any,
        global_batch: int,
        total_steps: int,
        is_main: bool,
    ) -> None:
        self.window, self.stream, self.sampler, self.engine, self.state = window, stream, sampler, engine, state
        self.global_batch, self.total_steps, self.is_main = global_batch, total_steps, is_main
        self.start()

    def start(self) -> None:
        """Throughput and ETA count from now (the loop's first step)."""
        self.t_window = self.t_start = time.perf_counter()
        self.step_start = self.state.step

    def exclude(self, seconds: float) -> None:
        """``seconds`` spent on something else (an evaluation) do not count as training time."""
        self.t_window += seconds

    def write(self, tracker: Any) -> dict[str, float]:
        from trainer.console import fmt_time, say
        from trainer.timesteps import sampler_summary_metrics

        st, world = self.state, max(1, dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1)
        now = time.perf_counter()
        steps_done = self.window.steps
        data = self.stream.stats()
        # Data counters are summed over ranks (each rank reads its own shards).
        metrics = self.window.reduce(
            extra={
                "data/skipped": float(data.get("skipped", 0)),
                "data/shard_errors": float(data.get("shard_errors", 0)),
                "data/wait_s": float(data.get("wait_s", 0.0)) / world,
                "data/samples_per_s": float(data.get("samples_per_s", 0.0)),
            }
        )
        rate = steps_done / max(now - self.t_window, 1e-9)
        metrics.update(
            {
                "lr": self.engine.get_lr()[0],
                "steps_per_s": rate,
                "samples_per_s": rate * self.global_batch,
                "skipped_steps": float(st.skipped_steps),
                **sampler_summary_metrics(self.sampler),
            }
        )
        grad_norm = self.engine.get_global_grad_norm()
        if grad_norm is not None:  # not every ZeRO stage / precision reports it
            metrics["grad_norm"] = float(grad_norm)
        eta = (self.total_steps - st.step) * (now - self.t_start) / max(1, st.step - self.step_start)
        say(
            self.is_main,
            f"step {st.step}/{self.total_steps} | loss {metrics['loss']:.4f} mse {metrics['mse']:.4f} "
            f"vb {metrics['vb']:.4f} | {rate:.2f} steps/s {metrics['samples_per_s']:.0f} samples/s | "
            f"ETA {fmt_time(eta)}",
        )
        tracker.log_metrics({f"train/{k}": v for k, v in metrics.items()}, step=st.step)
        for k in ("loss", "mse", "vb"):
            st.curves[k].append((st.step, metrics[k]))
        self.t_window = time.perf_counter()
        return metrics
