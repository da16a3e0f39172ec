"""The evaluation stream: one exact pass over a split, every sample once across ranks.

The split's samples, in manifest order, are cut into ``world_size`` contiguous ranges whose sizes
differ by at most one; each rank reads only the shards overlapping its range. Every rank yields
exactly ``num_batches`` batches of at most ``batch_size`` (the last ones may be smaller) so per-batch
collectives cannot hang. With ``world_size > 1`` a rank whose share was lost to corrupt data still
yields ``num_batches`` batches: the missing ones are empty.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.data import IterableDataset

from data_prep.manifest import MANIFEST_NAME
from trainer.config import DataConfig
from trainer.data.manifest import DatasetInfo, split_urls
from trainer.data.reading import (
    DataError,
    Problems,
    Spec,
    Stats,
    check_rank,
    decode,
    log,
    make_loader,
    raw_samples,
    spec_for,
    to_tensor,
    worker_info,
)


@dataclass(frozen=True)
class _Segment:
    url: str
    skip: int
    """Samples at the start of the shard that belong to another rank."""
    take: int | None
    """Samples this rank reads after ``skip`` (None: to the end; used when counts are unknown)."""
    expected: int | None
    """Samples the shard holds according to the manifest."""
    first: int = -1
    """Position in the split of the first sample taken (-1: unknown, the counts are not listed)."""


class _EvalDataset(IterableDataset):
    """One exact pass over this rank's segments; yields chunks of up to ``batch_size`` samples."""

    def __init__(self, segments: list[_Segment], spec: Spec, batch_size: int, return_keys: bool) -> None:
        super().__init__()
        self.segments, self.spec, self.batch_size, self.return_keys = segments, spec, batch_size, return_keys

    def __iter__(self) -> Iterator[tuple[Any, ...]]:
        worker, num_workers = worker_info()
        problems = Problems(self.spec.on_error)
        images: list[np.ndarray] = []
        labels: list[int] = []
        keys: list[str] = []
        positions: list[int] = []

        def chunk() -> tuple[Any, ...]:
            info = {"worker": worker, **problems.counts()}
            return (
                to_tensor(images),
                torch.tensor(labels, dtype=torch.long),
                info,
                list(keys),
                torch.tensor(positions, dtype=torch.long),
            )

        for seg in self.segments[worker::num_workers]:
            end = None if seg.take is None else seg.skip + seg.take
            index = seg.skip
            for sample in raw_samples(seg.url, problems, start=seg.skip):
                index += 1
                decoded = decode(sample, self.spec, problems)
                if decoded is not None:
                    images.append(decoded[0])
                    labels.append(decoded[1])
                    keys.append(sample.get("__key__", ""))
                    positions.append(seg.first + index - 1 - seg.skip if seg.first >= 0 else -1)
                    if len(images) == self.batch_size:
                        yield chunk()
                        images, labels, keys, positions = [], [], [], []
                if end is not None and index >= end:
                    break
            if end is not None and index < end and seg.expected is not None:
                # Only the shortfall inside this rank's range is this rank's loss.
                problems.lost(seg.url, index, seg.expected, end - max(index, seg.skip))
        if images:
            yield chunk()
        # A worker that had nothing to read still reports its counters.
        empty = torch.empty(0, dtype=torch.long)
        yield torch.empty(0), empty, {"worker": worker, **problems.counts()}, [], empty


class EvalStream:
    """Each iteration is one exact pass: ``num_batches`` batches of ``(x, y)`` (or ``(x, y, keys)``)."""

    def __init__(self, dataset: _EvalDataset, cfg: DataConfig, sizes: list[int] | None, pad: bool) -> None:
        self._dataset = dataset
        self._cfg = cfg
        self._sizes = sizes
        self._pad = pad
        self._stats = Stats()
        self.num_samples = sum(sizes) if sizes is not None else None
        """Samples this rank reads in one pass (None when the shards' counts are unknown)."""
        self.num_batches = len(sizes) if sizes is not None else None
        """Batches every rank yields per pass (None when the shards' counts are unknown)."""

    def __len__(self) -> int:
        if self.num_batches is None:
            raise TypeError("batch count unknown: the shards are not listed in the manifest")
        return self.num_batches

    def _chunks(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, list[str]]]:
        it = iter(make_loader(self._dataset, self._cfg))
        while True:
            t0 = time.perf_counter()
            try:
                x, y, info, keys, _ = next(it)
            except StopIteration:
                return
            self._stats.record(0, time.perf_counter() - t0, info)
            if x.shape[0]:
                yield x, y, keys

    def __iter__(self) -> Iterator[tuple[Any, ...]]:
        if self._stats.started is None:
            self._stats.started = time.perf_counter()
        B = self._cfg.batch_size
        sizes = iter(self._sizes) if self._sizes is not None else None
        xs: list[torch.Tensor] = []
        ys: list[torch.Tensor] = []
        ks: list[str] = []
        have = 0
        emitted = 0

        def cut(n: int) -> tuple[Any, ...]:
            nonlocal xs, ys, ks, have
            x, y = torch.cat(xs) if xs else None, torch.cat(ys) if ys else None
            if x is None:
                C, S = self._dataset.spec.channels, self._dataset.spec.image_size
                x, y = torch.empty(0, C, S, S), torch.empty(0, dtype=torch.long)
            out = (x[:n], y[:n], ks[:n])
            xs, ys, ks = ([x[n:]], [y[n:]], ks[n:]) if have > n else ([], [], [])
            have -= min(n, have)
            self._stats.samples += out[0].shape[0]
            self._stats.batches += 1
            return out if self._dataset.return_keys else out[:2]

        target = next(sizes, None) if sizes is not None else B
        for x, y, keys in self._chunks():
            xs.append(x)
            ys.append(y)
            ks.extend(keys)
            have += x.shape[0]
            while target is not None and target > 0 and have >= target:
                yield cut(target)
                emitted += 1
                target = next(sizes, None) if sizes is not None else B
        # The data ran out (end of the pass, or samples lost to corruption).
        if sizes is None:
            if have:
                yield cut(have)
            return
        while target is not None:
            if have or target == 0 or self._pad:
                yield cut(min(have, target))
            target = next(sizes, None)

    def stats(self) -> dict[str, float]:
        return self._stats.as_dict()


def batch_sizes(n: int, num_batches: int, batch_size: int) -> list[int]:
    """Split ``n`` samples into exactly ``num_batches`` batches of at most ``batch_size``: full batches
    first, then the remainder; when that is one batch short, the last batch larger than one gives
    up a sample to a final batch of one; zeros pad when n < num_batches."""
    sizes = [batch_size] * (n // batch_size) + ([n % batch_size] if n % batch_size else [])
    if len(sizes) > num_batches:
        raise ValueError(f"{n} samples do not fit in {num_batches} batches of {batch_size}")
    while len(sizes) < num_batches:
        big = [i for i, s in enumerate(sizes) if s > 1]
        if not big:
            sizes.append(0)
            continue
        sizes[big[-1]] -= 1
        sizes.insert(big[-1] + 1, 1)
    return sizes


def rank_segments(urls: list[str], counts: list[int], rank: int, world_size: int) -> list[_Segment]:
    """The shards (with skip/take) covering rank's contiguous share [r·N/W, (r+1)·N/W) of the samples."""
    total = sum(counts)
    return range_segments(urls, counts, rank * total // world_size, (rank + 1) * total // world_size)


def range_segments(urls: list[str], counts: list[int], lo: int, hi: int) -> list[_Segment]:
    """The shards (with skip/take) covering the split's samples [lo, hi) in manifest order."""
    segments, start = [], 0
    for url, count in zip(urls, counts, strict=True):
        a, b = max(lo, start), min(hi, start + count)
        if a < b:
            segments.append(_Segment(url, a - start, b - a, count, first=a))
        start += count
    return segments


def split_size(cfg: DataConfig, info: DatasetInfo, split: str) -> int:
    """Samples in ``split`` according to the manifest (DataError when its shards are not all counted)."""
    urls = split_urls(cfg, info, split)
    missing = [u for u in urls if u not in info.shard_counts]
    if missing:
        raise DataError(f"{info.root}/{MANIFEST_NAME}: no sample count for {missing[0]} (re-run data_prep make)")
    return sum(info.shard_counts[u] for u in urls)


def read_ranges(
    cfg: DataConfig, info: DatasetInfo, split: str, ranges: list[tuple[int, int]]
) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """``(x, y, position)`` chunks of the split's samples in ``ranges`` (positions in manifest order).

    With several loader workers chunks arrive interleaved; a caller that needs whole ranges groups the
    samples by position. Samples lost to corrupt data are simply absent (and counted in the log)."""
    urls = split_urls(cfg, info, split)
    counts = [info.shard_counts[u] for u in urls]
    segments = [seg for lo, hi in ranges for seg in range_segments(urls, counts, lo, hi)]
    dataset = _EvalDataset(segments, spec_for(cfg, info), cfg.batch_size, return_keys=False)
    for x, y, _, _, pos in make_loader(dataset, cfg):
        if x.shape[0]:
            yield x, y, pos


def build_eval_stream(
    cfg: DataConfig,
    info: DatasetInfo,
    *,
    rank: int,
    world_size: int,
    split: str = "val",
    return_keys: bool = False,
) -> EvalStream:
    """One exact pass over ``split`` per iteration, every sample once across ranks (module docstring)."""
    check_rank(rank, world_size)
    urls = split_urls(cfg, info, split)
    B = cfg.batch_size
    if all(u in info.shard_counts for u in urls):
        counts = [info.shard_counts[u] for u in urls]
        total = sum(counts)
        segments = rank_segments(urls, counts, rank, world_size)
        mine = sum(s.take or 0 for s in segments)
        num_batches = math.ceil(math.ceil(total / world_size) / B)
        sizes = batch_sizes(mine, num_batches, B)
    else:
        log.warning(
            "%s shards are not all listed in %s/%s: reading whole shards round-robin per rank; ranks may "
            "yield different batch counts",
            split,
            info.root,
            MANIFEST_NAME,
        )
        segments = [_Segment(u, 0, None, None) for u in urls[rank::world_size]]
        sizes = None
    dataset = _EvalDataset(segments, spec_for(cfg, info), B, return_keys)
    return EvalStream(dataset, cfg, sizes, pad=world_size > 1)
