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


class LossWindow:
    def __init__(self, num_timesteps: int, device: torch.device) -> None:
        self.num_timesteps = num_timesteps
        self.acc = torch.zeros(_SIZE, dtype=torch.float64, device=device)
        self.micro_batches = 0

    @torch.no_grad()
    def add(
        self, loss: torch.Tensor, per_sample: dict[str, torch.Tensor], t: torch.Tensor, weights: torch.Tensor
    ) -> None:
        """``loss``: the weighted scalar that was minimised; ``per_sample``: unweighted terms [B];
        ``weights``: the importance weights 1/(T p_t), so that mse and vb are logged as unbiased
        estimates of their uniform-t means whatever the timestep sampler (quartiles are per-t means
        and need no weights)."""
        b = t.shape[0]
        w = weights.detach().double()
        self.acc[_LOSS] += loss.detach().double() * b
        self.acc[_MSE] += (per_sample["mse"].detach().double() * w).sum()
        self.acc[_VB] += (per_sample["vb"].detach().double() * w).sum()
        self.acc[_N] += b
        quarter = (t * _QUARTERS) // self.num_timesteps
        self.acc[_QSUM:_QN].scatter_add_(0, quarter, per_sample["loss"].detach().double())
        self.acc[_QN:_SIZE].scatter_add_(0, quarter, torch.ones_like(quarter, dtype=torch.float64))
        self.micro_batches += 1

    def reduce(self) -> dict[str, float]:
        """Means over the window and over all ranks (collective when distributed); resets the window."""
        acc = self.acc.clone()
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(acc)
        v = acc.tolist()
        n = max(v[_N], 1.0)
        out = {"loss": v[_LOSS] / n, "mse": v[_MSE] / n, "vb": v[_VB] / n}
        for q in range(_QUARTERS):
            if v[_QN + q] > 0:
                out[f"loss_q{q}"] = v[_QSUM + q] / v[_QN + q]
        self.acc.zero_()
        self.micro_batches = 0
        return out
