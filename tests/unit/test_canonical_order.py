"""The canonical data order and per-sample randomness as pure functions: what makes a run independent of its
world size (the multi-process check is tests/integration/test_world_size_invariance.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from trainer.config import ConfigError
from trainer.data.canonical import CanonicalOrder, check_layout, default_partitions
from trainer.per_sample import SampleRandomness, flip_images, sample_seeds
from trainer.timesteps import LossSecondMomentSampler, UniformSampler

COUNTS = (20, 20, 10, 7)
URLS = tuple(f"s{i}.tar" for i in range(len(COUNTS)))


def _samples(order: CanonicalOrder, epoch: int, partition: int) -> list[tuple[str, int]]:
    out = []
    for seg in order.segments(epoch, partition):
        out += [(seg.url, seg.skip + i) for i in range(seg.take)]
    return out


@pytest.mark.parametrize("partitions", [1, 3, 8, 57])
def test_partitions_cover_each_epoch_once_in_balanced_contiguous_ranges(partitions: int) -> None:
    order = CanonicalOrder(URLS, COUNTS, partitions, seed=5)
    for epoch in (0, 1):
        perm = order.shard_order(epoch)
        # Independent derivation: the epoch's sequence is the permuted shards' samples in file order.
        sequence = [(URLS[s], i) for s in perm for i in range(COUNTS[s])]
        parts = [_samples(order, epoch, j) for j in range(partitions)]
        assert [x for p in parts for x in p] == sequence
        sizes = [len(p) for p in parts]
        assert max(sizes) - min(sizes) <= 1 and sum(sizes) == 57
    assert list(order.shard_order(0)) != list(order.shard_order(1)) or len(URLS) < 2


def test_unknown_counts_deal_whole_shards() -> None:
    order = CanonicalOrder(URLS, None, 2, seed=1)
    segs = [order.segments(0, j) for j in range(2)]
    assert sorted(s.url for p in segs for s in p) == sorted(URLS)
    assert all(s.skip == 0 and s.take is None for p in segs for s in p)
    with pytest.raises(ConfigError, match="4 shards without sample counts .* cannot feed 8 canonical"):
        CanonicalOrder(URLS, None, 8, seed=1)
    with pytest.raises(ConfigError, match="has 57 samples, fewer than its 64 canonical"):
        CanonicalOrder(URLS, COUNTS, 64, seed=1)


def test_layout_rules_are_one_line_each() -> None:
    assert default_partitions(128) == 64 and default_partitions(16) == 16 and default_partitions(96) == 48
    check_layout(16, 16, 4, 4)
    with pytest.raises(ConfigError, match=r"^world size 3 does not divide the 16 canonical data partitions"):
        check_layout(16, 48, 3, 0)
    with pytest.raises(ConfigError, match=r"^data.num_workers=3 exceeds the 2 canonical data partitions of each"):
        check_layout(16, 16, 8, 3)
    with pytest.raises(ConfigError, match=r"^data.partitions=6 does not divide the global batch of 16"):
        check_layout(6, 16, 1, 0)


def test_sample_seeds_depend_on_the_sample_alone() -> None:
    whole = sample_seeds(7, 3, np.arange(16))
    halves = np.concatenate([sample_seeds(7, 3, np.arange(8)), sample_seeds(7, 3, np.arange(8, 16))])
    assert np.array_equal(whole, halves) and len(set(whole.tolist())) == 16
    assert (whole >= 0).all()  # 63-bit: a valid torch seed
    assert not np.array_equal(whole, sample_seeds(7, 4, np.arange(16)))
    assert not np.array_equal(whole, sample_seeds(8, 3, np.arange(16)))


def test_draws_do_not_depend_on_how_the_batch_is_split() -> None:
    rng = SampleRandomness(seed=11, device=torch.device("cpu"))
    whole = rng.draw(5, torch.arange(8), (1, 4, 4))
    parts = [rng.draw(5, torch.arange(lo, lo + 2), (1, 4, 4)) for lo in range(0, 8, 2)]
    assert torch.equal(whole.uniform, torch.cat([p.uniform for p in parts]))
    assert torch.equal(whole.noise, torch.cat([p.noise for p in parts]))
    assert ((whole.uniform >= 0) & (whole.uniform < 1)).all() and whole.uniform.dtype == torch.float64
    # Each sample's generator, seeded from its key, draws three uniforms and then its noise.
    g = torch.Generator().manual_seed(int(sample_seeds(11, 5, np.array([6]))[0]))
    assert torch.equal(whole.uniform[6], torch.rand(3, generator=g, dtype=torch.float64))
    assert torch.equal(whole.noise[6], torch.randn((1, 4, 4), generator=g))


def test_flip_follows_each_samples_uniform() -> None:
    x = torch.arange(2 * 1 * 2 * 3, dtype=torch.float32).reshape(2, 1, 2, 3)
    out = flip_images(x, torch.tensor([0.2, 0.7], dtype=torch.float64))
    assert torch.equal(out[0], x[0].flip(-1)) and torch.equal(out[1], x[1])


def test_timesteps_by_inverse_transform_match_a_float64_derivation() -> None:
    T = 10
    t, w = UniformSampler(T).draw(torch.tensor([0.0, 0.05, 0.1, 0.999999], dtype=torch.float64))
    assert t.tolist() == [0, 0, 1, 9] and w.tolist() == [1.0] * 4
    s = LossSecondMomentSampler(T, history_per_term=1, uniform_prob=0.0)
    losses = np.linspace(1.0, 10.0, T)
    s.record(torch.arange(T), torch.from_numpy(losses))
    s.sync()
    p = losses / losses.sum()  # sqrt(mean of one square) = the value itself
    u = torch.tensor([0.0, 0.3, 0.5, 0.99], dtype=torch.float64)
    t, w = s.draw(u)
    cdf = np.cumsum(p)
    want = [int(np.searchsorted(cdf, x, side="right")) for x in u.tolist()]
    assert t.tolist() == want
    assert w.tolist() == pytest.approx([1.0 / (T * p[i]) for i in want], rel=1e-6)
