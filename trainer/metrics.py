"""Training-loss statistics over a logging window, kept on the device and reduced across ranks.

Accumulating tensors instead of calling ``.item()`` per micro-batch avoids a host sync per step on
GPUs; reducing one fixed-size vector keeps every rank's collective identical in shape, even when a
rank drew no timestep in some quarter of [0, T).
"""

from __future__ import annotations

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
        self.micro_batches = 0


class LossWindow:
    """Sums over the optimizer steps since the last log. A step's micro-batches are staged and only
    counted once the step is known to be kept (:meth:`settle`), so a skipped non-finite step leaves no
    trace. The verdict on a step can arrive after the next step has begun (the trainer reads it a step
    late to keep the host from waiting on the device), so up to two steps are staged, oldest first."""

    def __init__(self, num_timesteps: int, device: torch.device) -> None:
        self.num_timesteps = num_timesteps
        self.acc = torch.zeros(_SIZE, dtype=torch.float64, device=device)
        self._staged: list[_StagedStep] = []
        self.micro_batches = 0

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
        staged.micro_batches += 1

    def settle(self, keep: bool) -> None:
        """The oldest staged step was kept (counted) or skipped (dropped)."""
        if not self._staged:
            return
        staged = self._staged.pop(0)
        if keep:
            self.acc += staged.sums
            self.micro_batches += staged.micro_batches

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
        self.micro_batches = 0
        return out

    # -- checkpointing (per rank: each rank's window holds its own samples)
    def state_dict(self) -> dict[str, object]:
        return {"acc": self.acc.detach().cpu().clone(), "micro_batches": self.micro_batches}

    def load_state_dict(self, state: dict[str, object]) -> None:
        acc = state["acc"]
        assert isinstance(acc, torch.Tensor)
        self.acc.copy_(acc.to(self.acc.device))
        self.micro_batches = int(state["micro_batches"])  # type: ignore[arg-type]
        self.discard()

    def load_state_dict_resharded(self, states: list[dict[str, object]]) -> None:
        """At another world size the partial window's samples are summed into rank 0's window."""
        self.discard()
        self.acc.zero_()
        self.micro_batches = 0
        if dist.is_available() and dist.is_initialized() and dist.get_rank() == 0:
            for st in states:
                self.acc += st["acc"].to(self.acc.device)  # type: ignore[union-attr]
            self.micro_batches = int(states[0]["micro_batches"])  # type: ignore[arg-type]
