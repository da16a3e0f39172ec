"""Detecting a non-finite training step: the loss, or any gradient, on any rank.

A NaN or inf must never reach the weights. Two ways to see every gradient, chosen by where DeepSpeed
leaves them:

- **In ``.grad`` after backward** (ZeRO-0 without bf16: DeepSpeed's plain torch path). One fused kernel
  per dtype after the last micro-batch, the AMP grad scaler's own check
  (``torch._amp_foreach_non_finite_check_and_unscale_`` with a scale of 1, which multiplies by 1: exact).
  Accumulated micro-batches are covered too: NaN + x = NaN and inf - inf = NaN.
- **As autograd produces them** (ZeRO 1-3 reduce and partition gradients into private flat buffers,
  and bf16 moves them into fp32 buffers, during backward). A tensor hook on every parameter keeps
  ``torch.aminmax`` of each local gradient (a tensor holds a NaN or inf exactly when its min or max is
  non-finite: both propagate NaN, and a finite tensor's extrema are finite); :attr:`NonFiniteGuard.flag`
  folds them when read.

A non-finite local gradient on any rank makes the reduced one non-finite, so the OR over ranks of the
local flags is the global answer. The flag stays on the device: the trainer all-reduces it there and
reads the agreed copy a step later.

Cost on the quickstart UNet, one CPU thread, a 250 ms step: the hooks cost ~14 ms per step (measured by
removing them: Python in the middle of backward for each of 128 parameters, and 256 small kernels),
where they are timed at ~1 ms alone; the fused check after backward ~0.3 ms. An earlier per-hook
``isfinite(grad).all()`` plus a flag update was ~10x the aminmax hook.
"""

from __future__ import annotations

import torch


class NonFiniteGuard:
    """``hooks=False``: the gradients are checked in ``.grad`` by :meth:`check_grads` after backward (only
    where they stay there); ``hooks=True``: each one as autograd produces it."""

    def __init__(self, module: torch.nn.Module, device: torch.device, hooks: bool = True) -> None:
        self._count = torch.zeros((), dtype=torch.float32, device=device)
        # Per checked gradient, its (min, max) as 0-d tensors on the gradient's device; folded lazily.
        self._mins: list[torch.Tensor] = []
        self._maxs: list[torch.Tensor] = []
        self._params = [p for p in module.parameters() if p.requires_grad]
        self.hooks = hooks
        self._handles = [p.register_hook(self._check) for p in self._params] if hooks else []
        self._found = torch.zeros((), dtype=torch.float32, device=device)
        self._one = torch.ones((), dtype=torch.float32, device=device)

    @torch.no_grad()
    def check_grads(self) -> None:
        """Without hooks: every ``.grad`` now, one fused kernel per (device, dtype). A no-op with hooks."""
        if self.hooks:
            return
        groups: dict[tuple[torch.device, torch.dtype], list[torch.Tensor]] = {}
        for p in self._params:
            if p.grad is not None:
                groups.setdefault((p.grad.device, p.grad.dtype), []).append(p.grad)
        self._found.zero_()
        for grads in groups.values():
            # Sets _found to 1 when any value is non-finite; the "unscale" multiplies by 1 (exact).
            torch._amp_foreach_non_finite_check_and_unscale_(grads, self._found, self._one)
        self._count.add_(self._found)

    @torch.no_grad()
    def _check(self, grad: torch.Tensor) -> None:
        if grad.numel() == 0:  # aminmax rejects empty tensors; an empty gradient is finite
            return
        lo, hi = torch.aminmax(grad)
        self._mins.append(lo)
        self._maxs.append(hi)

    @torch.no_grad()
    def check_loss(self, loss: torch.Tensor) -> None:
        self._count.add_((~torch.isfinite(loss).all()).to(self._count.dtype))

    @property
    @torch.no_grad()
    def flag(self) -> torch.Tensor:
        """Number of non-finite tensors (losses and gradients) seen since :meth:`reset`: a 0-d float32
        tensor on the device, > 0 when the step must be skipped. Reading it does not sync the host."""
        if self._mins:
            extrema = torch.stack([_same_dtype(self._mins), _same_dtype(self._maxs)])  # [2, n]
            self._count.add_((~torch.isfinite(extrema).all(dim=0)).sum().to(self._count.dtype))
            self._mins, self._maxs = [], []
        return self._count

    def reset(self) -> None:
        self._count.zero_()
        self._mins, self._maxs = [], []

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []


def _same_dtype(values: list[torch.Tensor]) -> torch.Tensor:
    """Stack 0-d tensors, widening to float32 only when gradients of several dtypes were mixed."""
    if len({v.dtype for v in values}) > 1:
        values = [v.float() for v in values]  # bf16/fp16 → fp32 keeps NaN and inf as they are
    return torch.stack(values)
