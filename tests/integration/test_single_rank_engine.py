"""One data-parallel rank under ZeRO-0: the engine skips DeepSpeed's gradient all-reduce with itself
(flatten, all-reduce, copy back), and training is bit for bit what it is with that all-reduce."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from tests.conftest import REPO, TINY_MODEL
from trainer.distributed import free_port

pytestmark = pytest.mark.slow


def _train(env: object, precision: str, allreduce: bool) -> tuple[bool, list[torch.Tensor]]:
    from trainer.config import load_config
    from trainer.diffusion import diffusion_from_config
    from trainer.engine import build_engine, model_fn
    from trainer.models.unet import build_unet
    from trainer.runtime import resolve

    cfg = load_config(
        REPO / "configs" / "quickstart.yaml",
        [*TINY_MODEL, "diffusion.steps=20", f"train.precision={precision}", "train.zero_stage=0", "data.batch_size=4"],
    )
    torch.manual_seed(0)
    model = build_unet(cfg.model, image_size=8, in_channels=1, learn_sigma=True)
    engine = build_engine(cfg, resolve(cfg, env), model)
    skipped = not engine.enable_backward_allreduce
    engine.enable_backward_allreduce = allreduce
    call, diffusion = model_fn(engine), diffusion_from_config(cfg.diffusion)
    gen = torch.Generator().manual_seed(1)
    for _ in range(3):
        x = torch.randn(4, 1, 8, 8, generator=gen)
        t = torch.randint(0, 20, (4,), generator=gen)
        noise = torch.randn(4, 1, 8, 8, generator=gen)
        engine.backward(diffusion.training_losses(call, x, t, noise=noise)["loss"].mean())
        engine.step()
    return skipped, [p.detach().float().clone() for p in engine.module.parameters()]


def _worker(rank: int, port: int, out: str) -> None:
    from trainer import distributed

    # The launcher contract for a world of one (the trainer's own setup, which skips DeepSpeed's JIT builds).
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    env = distributed.init_distributed()
    torch.set_num_threads(1)
    try:
        result = {}
        for precision in ("fp32", "bf16"):
            skipped, without = _train(env, precision, allreduce=False)
            _, with_allreduce = _train(env, precision, allreduce=True)
            result[precision] = {"skipped": skipped, "without": without, "with": with_allreduce}
        torch.save(result, Path(out) / "r.pt")
    finally:
        dist.destroy_process_group()


def test_one_rank_skips_the_allreduce_and_trains_identically(tmp_path: Path) -> None:
    mp.spawn(_worker, args=(free_port(), str(tmp_path)), nprocs=1, join=True)
    got = torch.load(tmp_path / "r.pt", weights_only=True)
    for precision, r in got.items():
        assert r["skipped"], f"{precision}: the engine still all-reduces at world size 1"
        assert len(r["without"]) == len(r["with"]) > 0
        for a, b in zip(r["without"], r["with"], strict=True):
            assert torch.equal(a, b), precision
