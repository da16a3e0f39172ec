"""The training stream: the canonical data order (:mod:`trainer.data.canonical`), read by the ranks that own
each part of it, resumable to the exact sample on any world size the order allows.

Rank ``r`` reads its canonical partitions, split among its loader workers (worker ``k`` takes the rank's
partitions ``k, k + K, ...``). For every global batch each worker sends one chunk: ``B / P`` decoded samples
of each of its partitions. The DataLoader hands the workers' chunks over in strict rotation, so the rank puts
batch ``b`` together from ``K`` consecutive chunks, in partition order: its slice ``[r·B/W, (r+1)·B/W)`` of the
global batch, cut into ``accum`` micro-batches. Every micro-batch carries its samples' places (batch number and
index in the batch), the key of their randomness (:mod:`trainer.per_sample`), and their keys and epochs.

State (:meth:`TrainStream.state_dict`): the number of global batches consumed, and per partition of this rank
its position: (epoch, segment, samples of the segment delivered) plus its problem counters, as of the last
batch the trainer *consumed* (batches prefetched by the loader do not count). The union over ranks is the
whole stream's state, so a checkpoint resumes on any world size that divides ``data.partitions``: each rank
takes its partitions' positions and restarts each partition at its segment, re-reading and re-shuffling that
segment and dropping what it had delivered (at most one segment, i.e. one shard's worth, per partition). A
state saved under another global batch, partition count, seed or shard list cannot be continued sample by
sample: the stream then starts the next epoch afresh and says why (:attr:`TrainStream.restart_reason`).
"""

from __future__ import annotations

import random
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
import torch
from torch.utils.data import IterableDataset

from trainer.config import DataConfig
from trainer.data.canonical import CanonicalOrder, Segment, check_layout, default_partitions
from trainer.data.manifest import DatasetInfo, split_urls
from trainer.data.reading import (
    DataError,
    Problems,
    Spec,
    Stats,
    check_rank,
    decode,
    make_loader,
    raw_samples,
    spec_for,
    to_tensor,
    worker_info,
)

MAX_EMPTY_EPOCHS = 16
"""A partition gives up (raises) after this many whole epochs without one readable sample."""


@dataclass(frozen=True)
class PartitionPosition:
    """Where a partition's stream stands: ``offset`` samples of segment ``segment`` of epoch ``epoch``
    delivered, and its cumulative problem counters at that point."""

    epoch: int = 0
    segment: int = 0
    offset: int = 0
    skipped: int = 0
    shard_errors: int = 0

    def as_list(self) -> list[int]:
        return [self.epoch, self.segment, self.offset, self.skipped, self.shard_errors]


class MicroBatch(NamedTuple):
    """One micro-batch of this rank: ``x`` float32 [n, C, H, W] in [-1, 1], ``y`` int64 [n] (zeros unlabeled),
    the samples' ``keys``, their ``index`` in the global batch (int64 [n]), the global ``batch`` number and each
    sample's ``epoch``."""

    x: torch.Tensor
    y: torch.Tensor
    keys: list[str]
    index: torch.Tensor
    batch: int
    epoch: list[int]


def _segment_samples(seg: Segment, problems: Problems) -> Iterator[dict[str, Any]]:
    """The raw samples of one segment, read sequentially from its first (see :func:`raw_samples`)."""
    end = None if seg.take is None else seg.skip + seg.take
    index = seg.skip
    samples = raw_samples(seg.url, problems, start=seg.skip)
    for sample in samples:
        index += 1
        yield sample
        if end is not None and index >= end:
            samples.close()
            return
    if end is not None and seg.expected is not None and index < end:
        problems.lost(seg.url, index, seg.expected, end - max(index, seg.skip))


def _shuffled(src: Iterator[dict[str, Any]], size: int, rng: random.Random) -> Iterator[dict[str, Any]]:
    """Buffer shuffle that drains the buffer when the source ends (a segment leaves nothing behind)."""
    if size < 2:
        yield from src
        return
    buf: list[dict[str, Any]] = []
    for sample in src:
        if len(buf) < size:
            buf.append(sample)
            continue
        i = rng.randrange(size)
        buf[i], sample = sample, buf[i]
        yield sample
    rng.shuffle(buf)
    yield from buf


def partition_samples(
    order: CanonicalOrder, partition: int, spec: Spec, buffer: int, start: PartitionPosition
) -> Iterator[tuple[np.ndarray, int, str, int, PartitionPosition]]:
    """One partition's decoded samples in canonical order from ``start``, epoch after epoch, each with its key,
    epoch and the position after it."""
    problems = Problems(spec.on_error)
    problems.skipped, problems.shard_errors = start.skipped, start.shard_errors
    epoch, first, replay = start.epoch, start.segment, start.offset
    empty_epochs = 0
    while True:
        decoded_in_epoch = 0  # replayed samples count: they are readable
        segments = order.segments(epoch, partition)
        for s in range(first, len(segments)):
            rng = random.Random(order.segment_seed(epoch, partition, s))
            problems.quiet = replay > 0  # the replayed part warned and was counted the first time round
            n = 0
            for sample in _shuffled(_segment_samples(segments[s], problems), buffer, rng):
                decoded = decode(sample, spec, problems)
                if decoded is None:
                    continue
                n += 1
                decoded_in_epoch += 1
                if n <= replay:
                    if n == replay:  # back where the saved stream stood: its counters, not the replay's
                        problems.skipped, problems.shard_errors = start.skipped, start.shard_errors
                        problems.quiet = False
                    continue
                pos = PartitionPosition(epoch, s, n, problems.skipped, problems.shard_errors)
                yield decoded[0], decoded[1], str(sample.get("__key__", "")), epoch, pos
            replay = 0
        # A small partition can fall wholly into a damaged shard for one epoch (the next epoch puts it elsewhere);
        # many whole epochs without one readable sample mean the data is gone.
        empty_epochs = empty_epochs + 1 if decoded_in_epoch == 0 and first == 0 else 0
        if empty_epochs >= MAX_EMPTY_EPOCHS:
            raise DataError(
                f"canonical data partition {partition} gave no sample in {empty_epochs} epochs in a row (last "
                f"problem: {problems.last_error or 'none'}); check the shards, e.g. {order.urls[0]}"
            )
        epoch, first = epoch + 1, 0


class Chunk(NamedTuple):
    """What one loader worker sends for one global batch: ``share`` samples of each of its ``partitions`` in
    turn (partition-major), and each partition's position after them."""

    partitions: list[int]
    x: torch.Tensor
    y: torch.Tensor
    keys: list[str]
    epochs: list[int]
    positions: list[list[int]]


class _CanonicalDataset(IterableDataset):
    """One rank's partitions; each DataLoader worker runs a copy and reads its share of them."""

    def __init__(self, order: CanonicalOrder, spec: Spec, partitions: list[int], share: int, buffer: int) -> None:
        super().__init__()
        self.order, self.spec, self.partitions, self.share, self.buffer = order, spec, partitions, share, buffer
        # Set by TrainStream before each loader is built (workers get a pickled copy).
        self.positions: dict[int, PartitionPosition] = {}
        self.start_batch = 0

    def __iter__(self) -> Iterator[tuple[int, dict[int, Any]]]:
        worker, num_workers = worker_info()
        mine = self.partitions[worker::num_workers]
        streams = {
            j: partition_samples(self.order, j, self.spec, self.buffer, self.positions.get(j, PartitionPosition()))
            for j in mine
        }
        batch = self.start_batch
        while True:
            # One tensor pair per chunk, not one per partition: a worker passes every tensor through its own
            # shared-memory segment, ~0.5 ms each, and 64 partitions made that 30 ms a batch.
            items = [next(streams[j]) for j in mine for _ in range(self.share)]
            yield (
                batch,
                Chunk(
                    mine,
                    to_tensor([it[0] for it in items]),
                    torch.tensor([it[1] for it in items], dtype=torch.long),
                    [it[2] for it in items],
                    [it[3] for it in items],
                    [items[(i + 1) * self.share - 1][4].as_list() for i in range(len(mine))],
                ),
            )
            batch += 1


class TrainStream:
    """Infinite iterator of :class:`MicroBatch` (see the module docstring); iterating again continues."""

    def __init__(
        self,
        dataset: _CanonicalDataset,
        cfg: DataConfig,
        rank: int,
        world_size: int,
        global_batch: int,
        accum: int,
    ) -> None:
        self._dataset, self._cfg = dataset, cfg
        self.rank, self.world_size, self.global_batch, self.accum = rank, world_size, global_batch, accum
        self.order = dataset.order
        self.partitions = dataset.partitions
        n = self.order.num_samples
        self.batches_per_epoch = max(1, n // global_batch) if n is not None else None
        """Global batches in one nominal epoch (train samples // global batch); None when counts are unknown."""
        self.batch = 0
        """Global batches consumed since the run began (the number of the next one)."""
        self.positions: dict[int, PartitionPosition] = {j: PartitionPosition() for j in self.partitions}
        self.restart_reason: str | None = None
        """Why a loaded state could not be continued (None when it was, or nothing was loaded)."""
        self._it: Iterator | None = None
        self._queue: list[MicroBatch] = []
        self._stats = Stats()

    def __iter__(self) -> TrainStream:
        return self

    def __next__(self) -> MicroBatch:
        if not self._queue:
            self._fill()
        return self._queue.pop(0)

    def _fill(self) -> None:
        if self._it is None:
            self._dataset.positions = dict(self.positions)
            self._dataset.start_batch = self.batch
            self._it = iter(make_loader(self._dataset, self._cfg))
            self._stats.started = time.perf_counter()
        t0 = time.perf_counter()
        chunks: list[Chunk] = []
        for _ in range(max(1, self._cfg.num_workers or 0)):
            batch, chunk = next(self._it)
            if batch != self.batch:  # the DataLoader's rotation is broken: never train on a misplaced sample
                raise RuntimeError(f"train stream: got a chunk of batch {batch} while assembling batch {self.batch}")
            chunks.append(chunk)
        # The workers' chunks back into partition order (worker k sent partitions k, k + K, ...).
        arrived = [j for c in chunks for j in c.partitions]
        share = self._dataset.share
        where = {j: i for i, j in enumerate(arrived)}
        order = [where[j] * share + s for j in self.partitions for s in range(share)]
        x = torch.cat([c.x for c in chunks])
        y = torch.cat([c.y for c in chunks])
        if arrived != self.partitions:
            x, y = x[order], y[order]
        keys_in = [k for c in chunks for k in c.keys]
        epochs_in = [e for c in chunks for e in c.epochs]
        keys = [keys_in[i] for i in order]
        epochs = [epochs_in[i] for i in order]
        for c in chunks:
            for j, pos in zip(c.partitions, c.positions, strict=True):
                self.positions[j] = PartitionPosition(*pos)
        counts = {
            "worker": 0,
            "skipped": sum(p.skipped for p in self.positions.values()),
            "shard_errors": sum(p.shard_errors for p in self.positions.values()),
        }
        self._stats.record(x.shape[0], time.perf_counter() - t0, counts)
        per_rank = self.global_batch // self.world_size
        micro = per_rank // self.accum
        first = self.rank * per_rank
        for a in range(self.accum):
            lo, hi = a * micro, (a + 1) * micro
            index = torch.arange(first + lo, first + hi, dtype=torch.long)
            self._queue.append(MicroBatch(x[lo:hi], y[lo:hi], keys[lo:hi], index, self.batch, epochs[lo:hi]))
        self.batch += 1

    # ------------------------------------------------------------------ state
    def fingerprint(self) -> dict[str, Any]:
        """The settings a saved position is only valid under."""
        return {**self.order.fingerprint(), "global_batch": self.global_batch}

    def state_dict(self) -> dict[str, Any]:
        if self._queue:
            raise RuntimeError("train stream: state_dict() with micro-batches of a step still unconsumed")
        return {
            "fingerprint": self.fingerprint(),
            "batch": self.batch,
            "positions": {str(j): self.positions[j].as_list() for j in self.partitions},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from ``state`` (call before the first batch is drawn)."""
        self.load_state_dict_resharded([state])

    def load_state_dict_resharded(self, states: list[dict[str, Any]]) -> None:
        """Continue from the states every saving rank wrote (any world size the canonical order allows)."""
        if self._it is not None:
            raise RuntimeError("TrainStream.load_state_dict: load the state before drawing batches")
        saved, mine = dict(states[0]["fingerprint"]), self.fingerprint()
        merged = {int(j): PartitionPosition(*map(int, p)) for s in states for j, p in s["positions"].items()}
        self.batch = int(states[0]["batch"])
        changed = [f"{k} {saved.get(k)!r} -> {v!r}" for k, v in mine.items() if saved.get(k) != v]
        if changed:
            epoch = max((p.epoch for p in merged.values()), default=-1) + 1
            self.positions = {j: PartitionPosition(epoch) for j in self.partitions}
            self.restart_reason = (
                f"data stream settings changed ({', '.join(changed)}): the data order starts afresh at epoch {epoch}"
            )
            return
        missing = [j for j in self.partitions if j not in merged]
        if missing:
            raise ValueError(f"train stream state has no position for canonical partition {missing[0]}")
        self.positions = {j: merged[j] for j in self.partitions}
        self.restart_reason = None

    # ------------------------------------------------------------------ monitoring
    def stats(self) -> dict[str, float]:
        """Counters: samples, batches (this process), skipped (samples), shard_errors (cumulative), wait_s (time
        blocked waiting for data), last_wait_s, wait_per_batch_s, samples_per_s (since the first batch was
        requested), epoch (global batches / batches per epoch; absent when unknown)."""
        out = self._stats.as_dict()
        if self.batches_per_epoch:
            out["epoch"] = self.batch / self.batches_per_epoch
        return out

    def close(self) -> None:
        """Stop the loader's worker processes (they also stop when the stream is garbage-collected)."""
        self._it = None


def build_train_stream(
    cfg: DataConfig,
    info: DatasetInfo,
    *,
    rank: int,
    world_size: int,
    global_batch: int | None = None,
    accum: int = 1,
    partitions: int | None = None,
) -> TrainStream:
    """This rank's part of the canonical training stream. ``cfg`` carries the loader settings of this rank
    (``batch_size`` is the micro-batch); ``global_batch`` defaults to micro-batch × ``accum`` × ``world_size``;
    ``partitions`` to ``cfg.partitions``, else :func:`~trainer.data.canonical.default_partitions`. A world size
    or worker count the canonical order does not allow is a one-line ConfigError."""
    check_rank(rank, world_size)
    batch = global_batch if global_batch is not None else cfg.batch_size * accum * world_size
    P = partitions or cfg.partitions or default_partitions(batch)
    check_layout(P, batch, world_size, cfg.num_workers or 0)
    urls = split_urls(cfg, info, "train")
    known = all(u in info.shard_counts for u in urls)
    counts = tuple(info.shard_counts[u] for u in urls) if known else None
    order = CanonicalOrder(tuple(urls), counts, P, cfg.seed)
    per_rank = P // world_size
    mine = list(range(rank * per_rank, (rank + 1) * per_rank))
    dataset = _CanonicalDataset(order, spec_for(cfg, info), mine, batch // P, cfg.shuffle_buffer)
    return TrainStream(dataset, cfg, rank, world_size, batch, accum)
