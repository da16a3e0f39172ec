"""The training stream: infinite, resampled, equal batches per rank, resumable to the exact batch.

Every (rank, DataLoader worker) draws shards with replacement ("resampled", webdataset's recipe for
multi-node training) from its own seeded generator, so no rank can run out of data before another and
every rank yields the same number of batches whatever the number of shards or workers. One nominal
epoch is ``train samples // (batch_size · world_size)`` batches per rank; shards are drawn with
replacement, so per epoch each sample is seen once in expectation, not exactly once.

Rounds and exact resume
    A worker's stream is a sequence of rounds. Round r draws its shards, shuffle-buffer swaps and flips
    from one generator seeded by (data.seed, rank, worker, num_workers, world_size, origin, r); it reads
    ``batches_per_round · batch_size`` samples, drains its shuffle buffer, and yields the full batches
    (a partial last batch is dropped). A batch's position is (round, index within the round). The state
    (:meth:`TrainStream.state_dict`) holds, per worker, the position of the last batch the trainer
    *consumed* (batches prefetched by the loader do not count). Loading it restarts each worker at its
    round and re-generates, then drops, the batches it had delivered in that round: the resumed stream
    continues bit for bit, at the cost of re-reading at most one round per worker.
    The DataLoader asks its workers in strict rotation starting at worker 0; after n consumed batches
    the next one is due from worker n mod W, so a resumed loader's physical worker i plays logical
    worker (i + n) mod W.

Another layout
    A state saved with other stream settings (world size, num_workers, batch size, shards, seed,
    buffer, flip, round size) cannot be continued position by position. The stream then starts over
    with a new ``origin`` derived from the saved one and its consumed count, so it is deterministic and
    does not replay the earlier stream's rounds; :attr:`TrainStream.restart_reason` says why.
"""

from __future__ import annotations

import hashlib
import random
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.data import IterableDataset

from trainer.config import DataConfig
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

MAX_EMPTY_SHARDS_MIN = 16
"""A training worker gives up (raises) after max(16, 4 × number of shards) shards in a row yield nothing."""


def stream_seed(seed: int, rank: int, worker: int, num_workers: int, world_size: int, origin: int, round_: int) -> int:
    """One 64-bit seed per (seed, rank, worker, num_workers, world_size, origin, round)."""
    entropy = [seed % 2**63, rank, worker, num_workers, world_size, origin % 2**63, round_]
    return int(np.random.SeedSequence(entropy).generate_state(1, np.uint64)[0])


@dataclass(frozen=True)
class WorkerPosition:
    """Where a worker's stream stands: ``offset`` batches of round ``round`` delivered, and its
    cumulative problem counters at that point."""

    round: int = 0
    offset: int = 0
    skipped: int = 0
    shard_errors: int = 0

    def as_list(self) -> list[int]:
        return [self.round, self.offset, self.skipped, self.shard_errors]


class _TrainDataset(IterableDataset):
    """Infinite stream of full batches for one rank; each DataLoader worker runs its own copy."""

    def __init__(
        self,
        urls: list[str],
        counts: dict[str, int],
        spec: Spec,
        cfg: DataConfig,
        rank: int,
        world_size: int,
        seed: int,
        return_keys: bool,
    ) -> None:
        super().__init__()
        self.urls, self.counts, self.spec = urls, counts, spec
        self.batch_size, self.buffer, self.flip = cfg.batch_size, cfg.shuffle_buffer, cfg.random_flip
        self.round_samples = cfg.batches_per_round * cfg.batch_size
        self.rank, self.world_size, self.seed, self.return_keys = rank, world_size, seed, return_keys
        # Set by TrainStream before each loader is built (workers get a pickled copy).
        self.origin = 0
        self.shift = 0
        self.positions: dict[int, WorkerPosition] = {}

    def _round_samples(self, rng: random.Random, problems: Problems, empty: list[int]) -> Iterator[dict[str, Any]]:
        """``round_samples`` raw samples from shards drawn with replacement."""
        empty_limit = max(MAX_EMPTY_SHARDS_MIN, 4 * len(self.urls))
        read = 0
        while read < self.round_samples:
            url = self.urls[rng.randrange(len(self.urls))]
            samples = raw_samples(url, problems)
            seen, exhausted = 0, False
            while read < self.round_samples:
                try:
                    sample = next(samples)
                except StopIteration:
                    exhausted = True
                    break
                seen += 1
                read += 1
                yield sample
            if not exhausted:
                samples.close()  # the round is full; the rest of this shard is not read
                return
            expected = self.counts.get(url)
            if expected is not None and seen < expected:
                problems.lost(url, seen, expected, expected - seen)
            empty[0] = 0 if seen else empty[0] + 1
            if empty[0] >= empty_limit:
                raise DataError(
                    f"no samples from {empty[0]} shards in a row (last problem: {problems.last_error or 'none'}); "
                    f"check the shard URLs, e.g. {self.urls[0]}"
                )

    @staticmethod
    def _shuffled(src: Iterator[dict[str, Any]], size: int, rng: random.Random) -> Iterator[dict[str, Any]]:
        """Buffer shuffle that drains the buffer when the source ends (a round leaves nothing behind)."""
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

    def __iter__(self) -> Iterator[tuple[Any, ...]]:
        physical, num_workers = worker_info()
        worker = (physical + self.shift) % num_workers
        start = self.positions.get(worker, WorkerPosition())
        problems = Problems(self.spec.on_error)
        empty = [0]
        round_ = start.round
        while True:
            rng = random.Random(
                stream_seed(self.seed, self.rank, worker, num_workers, self.world_size, self.origin, round_)
            )
            replay = start.offset if round_ == start.round else 0
            problems.quiet = replay > 0  # the replayed part warned the first time round
            if round_ == start.round and replay == 0:
                problems.skipped, problems.shard_errors = start.skipped, start.shard_errors
            index = 0
            images: list[np.ndarray] = []
            labels: list[int] = []
            keys: list[str] = []
            src = self._round_samples(rng, problems, empty)
            for sample in self._shuffled(src, min(self.buffer, self.round_samples), rng):
                decoded = decode(sample, self.spec, problems)
                if decoded is None:
                    continue
                arr, label = decoded
                if self.flip and rng.random() < 0.5:
                    arr = arr[:, ::-1]
                images.append(arr)
                labels.append(label)
                keys.append(sample.get("__key__", ""))
                if len(images) < self.batch_size:
                    continue
                index += 1
                if index <= replay:  # delivered before the checkpoint: regenerate, drop
                    if index == replay:
                        problems.skipped, problems.shard_errors = start.skipped, start.shard_errors
                        problems.quiet = False
                    images, labels, keys = [], [], []
                    continue
                info = {"worker": worker, "round": round_, "offset": index, **problems.counts()}
                yield (
                    to_tensor(images),
                    torch.tensor(labels, dtype=torch.long),
                    info,
                    keys if self.return_keys else None,
                )
                images, labels, keys = [], [], []
            round_ += 1


class TrainStream:
    """Infinite iterator of ``(x, y)`` (or ``(x, y, keys)``); iterating again continues, never restarts.

    ``x``: float32 [B, C, H, W] in [-1, 1], B == batch_size always; ``y``: int64 [B] (zeros if unlabeled).
    Stateful: :meth:`state_dict` / :meth:`load_state_dict` (see the module docstring).
    """

    def __init__(self, dataset: _TrainDataset, cfg: DataConfig, batches_per_epoch: int | None) -> None:
        self._dataset = dataset
        self._cfg = cfg
        self.batches_per_epoch = batches_per_epoch
        """Batches per rank in one nominal epoch: train samples // (batch_size · world_size), at least 1;
        None when ``train_shards`` names shards the manifest does not list (sample count unknown)."""
        self._it: Iterator | None = None
        self._stats = Stats()
        self.consumed = 0
        """Batches delivered to the trainer since the stream's origin."""
        self.origin = 0
        self.positions: dict[int, WorkerPosition] = {}
        self.restart_reason: str | None = None
        """Why a loaded state could not be continued (None when it was, or nothing was loaded)."""

    def __iter__(self) -> TrainStream:
        return self

    def __next__(self) -> tuple[torch.Tensor, ...]:
        if self._it is None:
            workers = max(1, self._cfg.num_workers or 0)
            self._dataset.origin = self.origin
            self._dataset.shift = self.consumed % workers
            self._dataset.positions = dict(self.positions)
            self._it = iter(make_loader(self._dataset, self._cfg))
            self._stats.started = time.perf_counter()
        t0 = time.perf_counter()
        x, y, info, keys = next(self._it)
        self._stats.record(x.shape[0], time.perf_counter() - t0, info)
        self.consumed += 1
        self.positions[int(info["worker"])] = WorkerPosition(
            int(info["round"]), int(info["offset"]), int(info["skipped"]), int(info["shard_errors"])
        )
        return (x, y) if keys is None else (x, y, keys)

    # ------------------------------------------------------------------ state
    def fingerprint(self) -> dict[str, Any]:
        """The settings a saved position is only valid under."""
        d, cfg = self._dataset, self._cfg
        return {
            "world_size": d.world_size,
            "num_workers": cfg.num_workers or 0,
            "batch_size": cfg.batch_size,
            "seed": d.seed,
            "shuffle_buffer": cfg.shuffle_buffer,
            "random_flip": cfg.random_flip,
            "batches_per_round": cfg.batches_per_round,
            "shards": hashlib.sha256("\n".join(d.urls).encode()).hexdigest()[:16],
        }

    def state_dict(self) -> dict[str, Any]:
        return {
            "fingerprint": self.fingerprint(),
            "origin": self.origin,
            "consumed": self.consumed,
            "positions": {str(w): p.as_list() for w, p in sorted(self.positions.items())},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from ``state`` (call before the first batch is drawn)."""
        if self._it is not None:
            raise RuntimeError("TrainStream.load_state_dict: load the state before drawing batches")
        saved, mine = dict(state["fingerprint"]), self.fingerprint()
        changed = [f"{k} {saved.get(k)!r} -> {v!r}" for k, v in mine.items() if saved.get(k) != v]
        if changed:
            # Deterministic, and distinct from every origin the earlier stream used.
            self.origin = int(state["origin"]) + int(state["consumed"]) + 1
            self.consumed, self.positions = 0, {}
            self.restart_reason = f"data stream settings changed ({', '.join(changed)}): stream restarted"
            return
        self.origin = int(state["origin"])
        self.consumed = int(state["consumed"])
        self.positions = {int(w): WorkerPosition(*map(int, p)) for w, p in state["positions"].items()}
        self.restart_reason = None
        self._stats.per_worker = {
            w: {"skipped": p.skipped, "shard_errors": p.shard_errors} for w, p in self.positions.items()
        }

    def load_state_dict_resharded(self, states: list[dict[str, Any]]) -> None:
        """A state saved at another world size: every rank restarts from rank 0's origin (see above)."""
        self.load_state_dict(states[0])

    # ------------------------------------------------------------------ monitoring
    def stats(self) -> dict[str, float]:
        """Counters: samples, batches (this process), skipped (samples), shard_errors (cumulative),
        wait_s (time blocked waiting for data), last_wait_s, wait_per_batch_s, samples_per_s (since the
        first batch was requested), epoch (consumed / batches_per_epoch; absent when unknown)."""
        out = self._stats.as_dict()
        if self.batches_per_epoch:
            out["epoch"] = self.consumed / self.batches_per_epoch
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
    seed: int | None = None,
    return_keys: bool = False,
) -> TrainStream:
    """The infinite, resampled training stream of one rank (see the module docstring for guarantees).

    ``seed`` defaults to ``cfg.seed``. To resume, :meth:`TrainStream.load_state_dict` before iterating.
    """
    check_rank(rank, world_size)
    urls = split_urls(cfg, info, "train")
    counts = {u: info.shard_counts[u] for u in urls if u in info.shard_counts}
    known = sum(counts.values()) if len(counts) == len(urls) else None
    per_epoch = max(1, known // (cfg.batch_size * world_size)) if known is not None else None
    dataset = _TrainDataset(
        urls, counts, spec_for(cfg, info), cfg, rank, world_size, cfg.seed if seed is None else seed, return_keys
    )
    return TrainStream(dataset, cfg, per_epoch)
