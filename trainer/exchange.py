"""The all-gather of every rank's rows of (t, loss) pairs, started at once and read later.

:class:`Exchange` concatenates every rank's ``[n_r, 2]`` float64 rows in rank order, where ``n_r`` may
differ between ranks (uneven batches), without pickling. One all-gather in the steady state: each rank
sends a header row holding its count plus up to ``capacity`` rows, padded. Only when some rank has more
rows does a second, blocking all-gather carry the remainder. The result also gives the capacity for the
next exchange: the smallest power of two that held this one's largest count. Every rank derives it from
the same gathered counts, so the buffers of later exchanges agree in size on all ranks (which a
collective requires).

The exchange is started by the timestep sampler after a step and read after the next one
(:mod:`trainer.step`), so the device is never drained for it: on NCCL the collective and the copy to the
host are queued on the stream; on gloo the wait happens in :meth:`Exchange.result`.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.distributed as dist

from trainer.distributed import HostCopy


class LocalExchange:
    """A world of one: the rows only travel to the host (queued now, read when collected)."""

    def __init__(self, local: torch.Tensor) -> None:
        self.copy, self.capacity, self.rejected = HostCopy(local), 0, False

    def result(self) -> tuple[np.ndarray, int]:
        return self.copy.get().numpy(), self.capacity


class Exchange:
    """An all-gather of [n_r, 2] rows in flight (the protocol is in the module docstring)."""

    def __init__(self, local: torch.Tensor, group: dist.ProcessGroup | None, capacity: int) -> None:
        self.local, self.group, self.capacity = local, group, capacity
        self.rejected = False
        world = dist.get_world_size(group)
        n = local.shape[0]
        send = torch.zeros((capacity + 1, 2), dtype=torch.float64, device=local.device)
        send[0, 0] = n
        send[1 : 1 + min(n, capacity)] = local[:capacity]
        self.parts = [torch.empty_like(send) for _ in range(world)]
        self.work = dist.all_gather(self.parts, send, group=group, async_op=True)
        self.copy: HostCopy | None = None
        if send.is_cuda:
            # NCCL: wait() only orders the current stream after the collective (the host goes on), and the
            # copy to the host is queued behind it; gloo's wait() would block, so it waits in result().
            self.work.wait()
            self.copy = HostCopy(torch.stack(self.parts))

    def result(self) -> tuple[np.ndarray, int]:
        """Every rank's rows in rank order, and the capacity for the next exchange. Collective only
        when some rank outgrew the capacity (a second, blocking round)."""
        if self.copy is not None:
            first = self.copy.get().numpy()
        else:
            self.work.wait()
            first = torch.stack(self.parts).numpy()
        world, capacity, local = len(self.parts), self.capacity, self.local
        counts = first[:, 0, 0].astype(np.int64)
        longest = int(counts.max())
        rest = None
        if longest > capacity:
            n = local.shape[0]
            extra = torch.zeros((longest - capacity, 2), dtype=torch.float64, device=local.device)
            extra[: max(n - capacity, 0)] = local[capacity:]
            parts = [torch.empty_like(extra) for _ in range(world)]
            dist.all_gather(parts, extra, group=self.group)
            rest = torch.stack(parts).cpu().numpy()
        rows = []
        for r, count in enumerate(counts.tolist()):
            rows.append(first[r, 1 : 1 + min(count, capacity)])
            if rest is not None and count > capacity:
                rows.append(rest[r, : count - capacity])
        next_capacity = 1 << (longest - 1).bit_length() if longest > 0 else capacity
        return np.concatenate(rows), next_capacity
