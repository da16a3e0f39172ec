"""The canonical data order: which training sample sits where in every global batch, whatever the world size.

Nothing here depends on ranks or loader workers. Per epoch ``e``:

1. the shards are permuted by a generator seeded by ``(data.seed, e)``;
2. the epoch's sample sequence is the permuted shards' samples in file order, cut into ``P`` canonical
   partitions (``data.partitions``): contiguous ranges whose sizes differ by at most one (with per-shard
   counts from the manifest), or whole shards dealt round-robin (counts unknown: URLs outside it);
3. a partition's range is read sequentially, one *segment* (its piece of one shard) at a time; each segment
   passes through a shuffle buffer of ``data.shuffle_buffer`` samples seeded by ``(seed, e, partition,
   segment)`` and drained at the segment's end;
4. global batch ``b`` is the concatenation, in partition order, of the next ``B / P`` samples of each
   partition (``B``: the global batch). A partition that reaches the end of its range continues with its
   range of the next epoch, so every batch is full and every rank's count of batches is the same.

Rank ``r`` of ``W`` owns partitions ``[r·P/W, (r+1)·P/W)``, i.e. the contiguous slice ``[r·B/W, (r+1)·B/W)``
of every global batch, and reads only those, with its loader workers taking its partitions in turn. A sample's
place in the run, (batch, index in the batch), is therefore the same on any world size that divides ``P``, and
the per-sample randomness keyed by it (:mod:`trainer.per_sample`) is too.

Why contiguous ranges rather than whole shards: they balance the partitions to one sample, also when there
are fewer shards than partitions. The price is that a partition may begin in the middle of a shard: a local
uncompressed shard is entered with one seek (a header index built once per process,
:func:`trainer.data.reading.sample_offsets`); any other URL is read from its start and the samples before the
partition dropped undecoded, at most one shard's worth per partition and epoch.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from trainer.config import ConfigError

MAX_DEFAULT_PARTITIONS = 64
"""``data.partitions`` unset: the largest divisor of the global batch that is at most this."""


def default_partitions(global_batch: int) -> int:
    return max(d for d in range(1, min(global_batch, MAX_DEFAULT_PARTITIONS) + 1) if global_batch % d == 0)


def check_layout(partitions: int, global_batch: int, world_size: int, workers: int) -> None:
    """The world sizes and loader-worker counts the canonical order allows; one-line ConfigErrors."""
    if global_batch % partitions:
        raise ConfigError(
            f"data.partitions={partitions} does not divide the global batch of {global_batch} "
            "(every partition gives the same number of samples to each batch)"
        )
    if partitions % world_size:
        allowed = [w for w in range(1, partitions + 1) if partitions % w == 0]
        raise ConfigError(
            f"world size {world_size} does not divide the {partitions} canonical data partitions (data.partitions): "
            f"run on {', '.join(map(str, allowed))} ranks, or set data.partitions to a multiple of {world_size} that "
            f"divides the global batch {global_batch}"
        )
    per_rank = partitions // world_size
    if workers > per_rank:
        raise ConfigError(
            f"data.num_workers={workers} exceeds the {per_rank} canonical data partitions of each rank "
            f"({partitions} partitions over {world_size} ranks): use at most {per_rank} loader workers, or raise "
            "data.partitions"
        )


def _seed(*key: int) -> int:
    return int(np.random.SeedSequence([int(k) % 2**63 for k in key]).generate_state(1, np.uint64)[0])


@dataclass(frozen=True)
class Segment:
    """A partition's piece of one shard in one epoch."""

    url: str
    skip: int
    """Samples of the shard before the segment (read, not decoded)."""
    take: int | None
    """Samples in the segment; None: to the shard's end (counts unknown)."""
    expected: int | None
    """Samples the shard holds according to the manifest (None: unknown)."""


@dataclass(frozen=True)
class CanonicalOrder:
    """The epoch plans of a training set (see the module docstring)."""

    urls: tuple[str, ...]
    counts: tuple[int, ...] | None
    """Samples per shard, or None when some shard is not in the manifest."""
    partitions: int
    seed: int

    def __post_init__(self) -> None:
        if self.counts is not None and sum(self.counts) < self.partitions:
            raise ConfigError(
                f"the training set has {sum(self.counts)} samples, fewer than its {self.partitions} canonical data "
                "partitions: lower data.partitions (or the global batch)"
            )
        if self.counts is None and len(self.urls) < self.partitions:
            raise ConfigError(
                f"data.train_shards: {len(self.urls)} shards without sample counts (not in the manifest) cannot feed "
                f"{self.partitions} canonical data partitions: list them in the manifest, or use at least "
                f"{self.partitions} shards"
            )

    @property
    def num_samples(self) -> int | None:
        return sum(self.counts) if self.counts is not None else None

    def shard_order(self, epoch: int) -> np.ndarray:
        return np.random.default_rng(_seed(self.seed, 1, epoch)).permutation(len(self.urls))

    def segments(self, epoch: int, partition: int) -> list[Segment]:
        """The segments partition ``partition`` reads in epoch ``epoch``, in order."""
        order = self.shard_order(epoch)
        if self.counts is None:
            return [Segment(self.urls[s], 0, None, None) for s in order[partition :: self.partitions]]
        counts = np.asarray(self.counts, dtype=np.int64)[order]
        total, P = int(counts.sum()), self.partitions
        lo, hi = partition * total // P, (partition + 1) * total // P
        starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
        out = []
        for shard, start, count in zip(order.tolist(), starts.tolist(), counts.tolist(), strict=True):
            a, b = max(lo, start), min(hi, start + count)
            if a < b:
                out.append(Segment(self.urls[shard], a - start, b - a, count))
        return out

    def segment_seed(self, epoch: int, partition: int, segment: int) -> int:
        return _seed(self.seed, 2, epoch, partition, segment)

    def fingerprint(self) -> dict[str, object]:
        """What a saved position is only valid under."""
        import hashlib

        return {
            "partitions": self.partitions,
            "seed": self.seed,
            "shards": hashlib.sha256("\n".join(self.urls).encode()).hexdigest()[:16],
        }
