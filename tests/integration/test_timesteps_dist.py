"""Two real gloo processes with different batch sizes share one loss history (trainer/timesteps.py)."""

from __future__ import annotations

import datetime
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from trainer.distributed import free_port
from trainer.timesteps import LossSecondMomentSampler, create_timestep_sampler

T, N, U = 8, 3, 0.01
STEPS, SAVE_AT = 10, 5
# Per-rank micro-batch sizes for each of the 2 accumulation micro-batches of a step. Rank 1 has an
# empty second micro-batch; rank 0 sends nothing at all on step 2; rank 1 sends 20 on step 4, more
# than the exchange's capacity (8 after the first step), which takes its second round and then shrinks.
MICRO = {0: (3, 5), 1: (7, 0)}


def _micro_sizes(rank: int, step: int) -> tuple[int, int]:
    if rank == 0 and step == 2:
        return (0, 0)
    if rank == 1 and step == 4:
        return (7, 13)
    return MICRO[rank]


def _worker(rank: int, world: int, port: int, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world,
        timeout=datetime.timedelta(seconds=60),
    )
    try:
        sampler = create_timestep_sampler("loss-second-moment", T, history_per_term=N, uniform_prob=U)
        gen = torch.Generator().manual_seed(1000 + rank)  # each rank its own stream
        steps: list[list[tuple[torch.Tensor, torch.Tensor]]] = []
        probs, synced = [], []
        for step in range(STEPS):
            micro = []
            for size in _micro_sizes(rank, step):
                t, _ = sampler.sample(size, generator=gen)
                loss = (3.0 / (1.0 + t.float())) * (0.5 + torch.rand(size, generator=gen)) * (1 + rank)
                sampler.record(t, loss)
                micro.append((t, loss))
            steps.append(micro)
            synced.append(sampler.sync())
            probs.append(torch.from_numpy(sampler.probabilities()))
            if step == SAVE_AT:
                torch.save(sampler.state_dict(), Path(out) / f"state_r{rank}.pt")
        assert sampler.sync() == 0  # a step in which no rank recorded anything
        final = sampler.state_dict()

        # Resume in the same 2-rank job from rank 0's saved state (what a checkpoint holds) and replay
        # this rank's later micro-batches: every rank must end bit-identical to the uninterrupted run.
        dist.barrier()
        resumed = LossSecondMomentSampler(T, history_per_term=N, uniform_prob=U)
        resumed.load_state_dict(torch.load(Path(out) / "state_r0.pt", weights_only=True))
        for micro in steps[SAVE_AT + 1 :]:
            for t, loss in micro:
                resumed.record(t, loss)
            resumed.sync()
        again = resumed.state_dict()
        assert torch.equal(again["history"], final["history"]) and torch.equal(again["writes"], final["writes"])
        assert resumed.probabilities().tobytes() == sampler.probabilities().tobytes()

        torch.save(
            {
                "final": final,
                "probs": torch.stack(probs),
                "synced": torch.tensor(synced),
                "t": [[t for t, _ in micro] for micro in steps],
                "loss": [[loss for _, loss in micro] for micro in steps],
            },
            Path(out) / f"rank{rank}.pt",
        )
    finally:
        dist.destroy_process_group()


def _spawn(world: int, out: Path, deadline_s: float = 90.0) -> None:
    ctx = mp.start_processes(_worker, args=(world, free_port(), str(out)), nprocs=world, join=False)
    end = time.monotonic() + deadline_s
    while not ctx.join(timeout=1.0):
        if time.monotonic() > end:
            for p in ctx.processes:
                p.kill()
            pytest.fail(f"2-rank gloo workers did not finish within {deadline_s:.0f} s")


@pytest.mark.slow
def test_two_ranks_share_one_history(tmp_path: Path) -> None:
    _spawn(2, tmp_path)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2))

    # Identical history and p_t on both ranks after every update, though their draws differ.
    assert r0["probs"].numpy().tobytes() == r1["probs"].numpy().tobytes()
    for key in ("history", "writes"):
        assert r0["final"][key].numpy().tobytes() == r1["final"][key].numpy().tobytes()
    assert not torch.equal(r0["t"][0][0], r1["t"][0][0][:3])
    expected_counts = [sum(_micro_sizes(0, s)) + sum(_micro_sizes(1, s)) for s in range(STEPS)]
    assert r0["synced"].tolist() == r1["synced"].tolist() == expected_counts
    # Importance sampling actually switched on during the run (not a trivially uniform p).
    assert r0["probs"][SAVE_AT].max() > 2 * r0["probs"][SAVE_AT].min()

    # One process replaying the gathered pairs in rank-major, then micro-batch, order reproduces the
    # 2-rank history bit for bit after every step: the gather loses nothing and orders deterministically.
    replay = LossSecondMomentSampler(T, history_per_term=N, uniform_prob=U)
    for step in range(STEPS):
        for rank_out in (r0, r1):
            for t, loss in zip(rank_out["t"][step], rank_out["loss"][step], strict=True):
                replay.record(t, loss)
        replay.sync()
        assert replay.probabilities().tobytes() == r0["probs"][step].numpy().tobytes(), f"step {step}"
        if step == SAVE_AT:
            # A state saved by the 2-rank job loads into a 1-rank sampler unchanged.
            single = LossSecondMomentSampler(T, history_per_term=N, uniform_prob=U)
            single.load_state_dict(torch.load(tmp_path / "state_r1.pt", weights_only=True))
            assert single.probabilities().tobytes() == replay.probabilities().tobytes()
            assert torch.equal(single.state_dict()["history"], replay.state_dict()["history"])
            assert torch.equal(single.state_dict()["writes"], replay.state_dict()["writes"])
    assert torch.equal(replay.state_dict()["history"], r0["final"]["history"])
    assert torch.equal(replay.state_dict()["writes"], r0["final"]["writes"])
    # Both ranks saved the same checkpoint state.
    s0, s1 = (torch.load(tmp_path / f"state_r{r}.pt", weights_only=True) for r in range(2))
    assert torch.equal(s0["history"], s1["history"]) and torch.equal(s0["writes"], s1["writes"])
