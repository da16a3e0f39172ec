"""Two real gloo ranks read 3 uneven shards: equal batch counts under per-batch collectives, exact cover."""

from __future__ import annotations

import datetime
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from data_prep.make_shards import MakeOptions, make_shards
from data_prep.sources import SourceKind

N, B, WORLD = 49, 8, 2  # ranks get 24 and 25 samples: 3 vs 4 batches of 8 unless the plan evens them out


def _rank(rank: int, root: str, store: str, out: str) -> None:
    from trainer.config import DataConfig
    from trainer.data import build_eval_stream, build_train_stream, load_manifest

    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"file://{store}",
        rank=rank,
        world_size=WORLD,
        timeout=datetime.timedelta(seconds=60),
    )
    try:
        cfg = DataConfig(root=root, batch_size=B, num_workers=1, shuffle_buffer=8, random_flip=True, seed=5)
        m = load_manifest(root)
        ev = build_eval_stream(cfg, m, rank=rank, world_size=WORLD, split="train", return_keys=True)
        keys, sizes = [], []
        for x, _, k in ev:
            n = torch.tensor([x.shape[0]])
            dist.all_reduce(n)  # a rank with fewer batches would leave the other blocked here
            sizes.append(x.shape[0])
            keys += k
        everyone: list = [None] * WORLD
        dist.all_gather_object(everyone, keys)

        train = build_train_stream(cfg, m, rank=rank, world_size=WORLD)
        steps, epoch0 = 0, []
        for _, mb in zip(range(2 * train.batches_per_epoch), train, strict=False):
            n = torch.tensor([mb.x.shape[0]])
            dist.all_reduce(n)
            assert int(n) == WORLD * B
            epoch0 += [k for k, e in zip(mb.keys, mb.epoch, strict=True) if e == 0]
            steps += 1
        train.close()
        trained: list = [None] * WORLD
        dist.all_gather_object(trained, epoch0)
        result = {
            "eval_sizes": sizes,
            "num_batches": ev.num_batches,
            "all_keys": everyone,
            "train_steps": steps,
            "train_epoch0": trained,
            "bpe": train.batches_per_epoch,
        }
        Path(out, f"r{rank}.json").write_text(json.dumps(result))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_two_ranks_equal_batches_and_exact_cover(tmp_path: Path) -> None:
    src = tmp_path / "in.npz"
    images = np.random.default_rng(0).integers(0, 256, (N, 8, 8, 3), dtype=np.uint8)
    np.savez(src, images=images, labels=np.arange(N) % 3)
    root = tmp_path / "ds"
    m = make_shards(
        MakeOptions(
            source=SourceKind.NPZ,
            input=src,
            out=root,
            image_size=8,
            channels=3,
            max_per_shard=20,
            workers=1,
            quiet=True,
        )
    ).manifest
    assert [s.count for s in m.split("train").shards] == [20, 20, 9]
    # fork: the ranks inherit the imported modules (spawn re-imports torch per rank: ~30 s on a loaded box).
    mp.start_processes(
        _rank,
        args=(str(root), str(tmp_path / "store"), str(tmp_path)),
        nprocs=WORLD,
        start_method="fork",
        join=True,
    )
    r = [json.loads((tmp_path / f"r{i}.json").read_text()) for i in range(WORLD)]
    assert r[0]["num_batches"] == r[1]["num_batches"] == 4
    assert r[0]["eval_sizes"] == [8, 8, 7, 1] and r[1]["eval_sizes"] == [8, 8, 8, 1]
    keys0, keys1 = r[0]["all_keys"]
    assert len(set(keys0)) == len(keys0) and len(set(keys1)) == len(keys1)  # no duplicates within a rank
    assert not set(keys0) & set(keys1)
    assert sorted(keys0 + keys1) == [f"{i:08d}" for i in range(N)]  # every sample seen across ranks
    assert r[0]["train_steps"] == r[1]["train_steps"] == 2 * r[0]["bpe"] == 2 * (N // (B * WORLD))
    # Training: the canonical order's epoch 0 is every sample once, split between the ranks without overlap.
    t0, t1 = r[0]["train_epoch0"]
    assert not set(t0) & set(t1) and sorted(t0 + t1) == [f"{i:08d}" for i in range(N)]
