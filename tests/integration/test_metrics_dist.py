"""Two real gloo ranks: the logged window means and the data-error counters cover every rank."""

from __future__ import annotations

import datetime
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from trainer.distributed import HostCopy, all_max, free_port
from trainer.metrics import LossWindow


def _worker(rank: int, world: int, port: int, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world, timeout=datetime.timedelta(60)
    )
    try:
        w = LossWindow(4, torch.device("cpu"))
        per = torch.full((2,), float(rank + 1))
        w.begin_step()
        w.add(per.mean(), {"loss": per, "mse": per, "vb": per}, torch.tensor([0, 3]), torch.ones(2))
        w.begin_step()  # a second step, staged while the first is unsettled, then skipped: not counted
        w.add(per.mean() * 100, {"loss": per * 100, "mse": per, "vb": per}, torch.tensor([1, 2]), torch.ones(2))
        w.settle(keep=True)
        w.settle(keep=False)
        # Only rank 1 met corrupt data: the logged count must still show it.
        out_metrics = w.reduce(extra={"data/skipped": 5.0 * rank, "data/shard_errors": float(rank == 0)})
        # A flag raised on one rank only is seen by both; a flag raised nowhere by neither.
        flags = [v > 0 for v in HostCopy(all_max(torch.tensor([float(rank == 1), 0.0]))).get().tolist()]
        torch.save({"metrics": out_metrics, "flags": flags}, Path(out) / f"r{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_window_and_data_counters_are_reduced_over_ranks(tmp_path: Path) -> None:
    mp.spawn(_worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    for r in range(2):
        got = torch.load(tmp_path / f"r{r}.pt", weights_only=True)
        m = got["metrics"]
        assert m["loss"] == 1.5 and m["data/skipped"] == 5.0 and m["data/shard_errors"] == 1.0
        assert got["flags"] == [True, False]
