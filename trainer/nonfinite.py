"""Detecting a non-finite training step: the loss, or any gradient, on any rank.

A NaN or inf must never reach the weights. The check has to see gradients before DeepSpeed reduces
and partitions them (ZeRO 1-3 keep them in private flat buffers), so a tensor hook on every
parameter tests each local gradient as autograd produces it; a non-finite local gradient on any rank
makes the reduced one non-finite, so the OR over ranks of the local flags is the global answer. The
flag stays on the device (no host sync) until the trainer's per-step agreement reads it.
"""

from __future__ import annotations

import torch


class NonFiniteGuard:
    def __init__(self, module: torch.nn.Module, device: torch.device) -> None:
        self.flag = torch.zeros((), dtype=torch.float32, device=device)
        self._handles = [p.register_hook(self._check) for p in module.parameters() if p.requires_grad]

    @torch.no_grad()
    def _check(self, grad: torch.Tensor) -> None:
        self.flag.add_((~torch.isfinite(grad).all()).to(self.flag.dtype))

    @torch.no_grad()
    def check_loss(self, loss: torch.Tensor) -> None:
        self.flag.add_((~torch.isfinite(loss).all()).to(self.flag.dtype))

    def reset(self) -> None:
        self.flag.zero_()

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
