"""Webdataset streams for training and evaluation: rank/worker split, decode, augment, batches.

Shards are read with webdataset's URL openers and tar iterators, so local paths, ``file://``,
brace patterns (``train-{000000..000127}.tar``), ``pipe:CMD`` and ``http(s)://`` URLs all work
(``pipe:`` runs CMD through a shell, webdataset's design: use it with trusted configs only).
Rank and world size are parameters; nothing here reads RANK/WORLD_SIZE from the environment.

Training stream (:func:`build_train_stream`): infinite, batches of exactly ``batch_size``.
  Every (rank, DataLoader worker) draws shards with replacement ("resampled", webdataset's recipe for
  multi-node training) from its own seeded generator, so no rank can run out of data before another
  and every rank yields the same number of batches, whatever the number of shards or workers. One
  epoch is ``batches_per_epoch = train samples // (batch_size · world_size)`` batches per rank.

  Determinism and resume guarantee: the batch sequence is a pure function of (seed, rank,
  num_workers, start_step, the shard list, batch_size, shuffle_buffer, random_flip): the same values
  give the same batches, bit for bit. Each worker's generator is seeded from all of them, so a
  resumed run (start_step = the step it resumes at; any value that differs from the earlier
  segments' works) draws an independent stream and does not replay the samples the interrupted run
  began with. It does not continue the interrupted run's exact
  sequence either: shards are sampled with replacement, so per epoch each sample is seen once in
  expectation, not exactly once.

Evaluation stream (:func:`build_eval_stream`): one exact pass over a split. The split's samples, in
  manifest order, are cut into ``world_size`` contiguous ranges whose sizes differ by at most one;
  each rank reads only the shards overlapping its range. Every sample is seen exactly once across
  ranks and every rank yields exactly ``num_batches`` batches of at most ``batch_size`` (the last
  ones may be smaller) so per-batch collectives cannot hang. With ``world_size > 1`` a rank whose
  share was lost to corrupt data still yields ``num_batches`` batches: the missing ones are empty.

Bad data: an undecodable sample, a missing field, a truncated shard or a shard that cannot be opened
is skipped with one warning per shard and kind, and counted (``stats()["skipped"]`` samples,
``stats()["shard_errors"]``). Samples a damaged tar drops without any error (random bytes over a tar
header look like end-of-archive to Python's tarfile, and a shard cut short reads short silently) are
caught by comparing against the manifest's per-shard counts (so only for shards the manifest lists).
``DataConfig.on_error = "raise"`` turns all of these into exceptions instead.
"""

from __future__ import annotations

import io
import logging
import math
import os
import random
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import numpy as np
import torch
import webdataset as wds
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from webdataset import tariterators

from data_prep.manifest import MANIFEST_NAME, Manifest, ManifestError, parse_manifest, read_manifest
from trainer.config import DataConfig

log = logging.getLogger(__name__)

IMAGE_FIELDS = ("png", "jpg", "jpeg", "webp")
MAX_EMPTY_SHARDS_MIN = 16
"""A training worker gives up (raises) after max(16, 4 × number of shards) shards in a row yield nothing."""


class DataError(RuntimeError):
    """A data problem that stops the stream (only under ``on_error="raise"`` or when no shard yields data)."""


class OnError(str, Enum):
    SKIP = "skip"
    RAISE = "raise"


# --------------------------------------------------------------------------- manifest + URLs


@dataclass(frozen=True)
class DatasetInfo:
    """What the streams (and the model builder) need to know about a shard directory."""

    root: str
    image_size: int
    channels: int
    class_names: tuple[str, ...]
    train_urls: tuple[str, ...]
    val_urls: tuple[str, ...]
    shard_counts: dict[str, int] = field(repr=False)
    """Samples per shard URL, from the manifest."""
    manifest: Manifest = field(repr=False)

    @property
    def num_classes(self) -> int:
        """0 when the dataset is unlabeled."""
        return len(self.class_names)

    @property
    def num_train(self) -> int:
        return sum(self.shard_counts[u] for u in self.train_urls)

    @property
    def num_val(self) -> int:
        return sum(self.shard_counts[u] for u in self.val_urls)

    def urls(self, split: str) -> tuple[str, ...]:
        if split not in ("train", "val"):
            raise ValueError(f"split must be 'train' or 'val', got {split!r}")
        return self.train_urls if split == "train" else self.val_urls


def _is_remote(spec: str) -> bool:
    return urlparse(spec).scheme in ("http", "https")


def _join(root: str, name: str) -> str:
    scheme = urlparse(name).scheme
    if scheme or name.startswith("pipe:") or os.path.isabs(name):
        return name
    return f"{root.rstrip('/')}/{name}" if _is_remote(root) else os.path.join(root, name)


def load_manifest(root: str | Path) -> DatasetInfo:
    """Read ``root/manifest.json`` (a local directory or an http(s) URL prefix).

    Raises :class:`data_prep.manifest.ManifestError` with a one-line message naming the path.
    """
    root = str(root)
    if _is_remote(root):
        where = f"{root.rstrip('/')}/{MANIFEST_NAME}"
        try:
            with wds.gopen(where, "rb") as f:
                manifest = parse_manifest(f.read().decode(), where)
        except (OSError, ValueError) as err:
            if isinstance(err, ManifestError):
                raise
            raise ManifestError(f"{where}: cannot fetch ({' '.join(str(err).split())})") from None
    else:
        manifest = read_manifest(root)
    counts: dict[str, int] = {}
    urls: dict[str, tuple[str, ...]] = {}
    for split in ("train", "val"):
        shards = manifest.split(split).shards
        urls[split] = tuple(_join(root, s.name) for s in shards)
        counts.update({_join(root, s.name): s.count for s in shards})
    return DatasetInfo(
        root=root,
        image_size=manifest.image_size,
        channels=manifest.channels,
        class_names=manifest.class_names,
        train_urls=urls["train"],
        val_urls=urls["val"],
        shard_counts=counts,
        manifest=manifest,
    )


def expand_shard_spec(spec: str, root: str) -> list[str]:
    """Space-separated URLs/patterns → URL list (braces expanded, relative paths joined to ``root``)."""
    out: list[str] = []
    for part in spec.split():
        out.extend(_join(root, u) for u in wds.shardlists.expand_urls(part))
    return out


def _split_urls(cfg: DataConfig, info: DatasetInfo, split: str) -> list[str]:
    override = cfg.train_shards if split == "train" else cfg.val_shards
    urls = expand_shard_spec(override, info.root) if override else list(info.urls(split))
    where = f"data.{split}_shards={override!r}" if override else f"{info.root}/{MANIFEST_NAME}"
    if not urls:
        raise ManifestError(f"{where}: no {split} shards")
    for url in urls:
        if not urlparse(url).scheme and not url.startswith("pipe:") and not os.path.isfile(url):
            raise ManifestError(f"{url}: shard not found (from {where})")
    return urls


# --------------------------------------------------------------------------- reading samples (worker side)


@dataclass(frozen=True)
class _Spec:
    image_size: int
    channels: int
    num_classes: int
    on_error: OnError


class _Problems:
    """Per-process counters of skipped data, and warnings limited to one per (shard, kind)."""

    def __init__(self, on_error: OnError) -> None:
        self.on_error = on_error
        self.skipped = 0
        self.shard_errors = 0
        self.reading = ""
        """The shard the reader is in (samples are decoded later, after the shuffle buffer)."""
        self.last_error = ""
        self._warned: set[tuple[str, str]] = set()

    def warn(self, url: str, kind: str, message: str) -> None:
        self.last_error = message
        if self.on_error is OnError.RAISE:
            raise DataError(message)
        if (url, kind) not in self._warned:
            self._warned.add((url, kind))
            log.warning("%s (skipped; further %s problems in this shard are only counted)", message, kind)

    def reader_error(self, exn: Exception) -> bool:
        """webdataset handler: True = skip and continue."""
        self.shard_errors += 1
        text = " ".join(str(exn.args[0] if exn.args else exn).split()) or "no details"
        self.warn(self.reading, "read", f"{self.reading}: {type(exn).__name__}: {text}")
        return True

    def lost(self, url: str, read: int, expected: int, missing: int) -> None:
        """Samples the manifest lists but the tar did not deliver (truncated or damaged shard)."""
        self.skipped += missing
        self.warn(url, "count", f"{url}: read {read} of {expected} samples listed in the manifest (damaged shard)")

    def counts(self) -> dict[str, int]:
        return {"skipped": self.skipped, "shard_errors": self.shard_errors}


def _raw_samples(url: str, problems: _Problems) -> Iterator[dict[str, Any]]:
    """Samples (dicts of raw bytes) of one shard, via webdataset's opener, tar expander and grouper."""
    problems.reading = url
    handler = problems.reader_error
    streams = tariterators.url_opener([{"url": url}], handler=handler)
    files = tariterators.tar_file_expander(streams, handler=handler)
    yield from tariterators.group_by_keys(files, handler=handler)


def _decode(sample: dict[str, Any], spec: _Spec, problems: _Problems) -> tuple[np.ndarray, int] | None:
    """→ (uint8 HxWxC image, label) or None (counted, warned) for a bad sample."""
    key = sample.get("__key__", "?")
    url = sample.get("__url__", problems.reading)
    try:
        data = next((sample[f] for f in IMAGE_FIELDS if f in sample), None)
        if data is None:
            raise ValueError(f"no image field (has {', '.join(k for k in sample if not k.startswith('__'))})")
        img = Image.open(io.BytesIO(data))
        mode = "L" if spec.channels == 1 else "RGB"
        if img.mode != mode:
            img = img.convert(mode)
        if img.size != (spec.image_size, spec.image_size):
            raise ValueError(f"image is {img.size[0]}x{img.size[1]}, manifest says {spec.image_size}")
        arr = np.asarray(img)
        if arr.ndim == 2:
            arr = arr[:, :, None]
        label = 0
        if spec.num_classes:
            label = int(sample["cls"])
            if not 0 <= label < spec.num_classes:
                raise ValueError(f"class {label} outside [0, {spec.num_classes})")
        return arr, label
    except Exception as err:
        problems.skipped += 1
        problems.warn(url, "sample", f"{url}: sample {key}: {type(err).__name__}: {' '.join(str(err).split())}")
        return None


def _to_tensor(images: list[np.ndarray]) -> torch.Tensor:
    """uint8 HxWxC list → float32 [B,C,H,W] in [-1, 1] (x/127.5 − 1: 0 → −1, 255 → 1)."""
    x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2)
    return x.float().div_(127.5).sub_(1.0).contiguous()


def _worker() -> tuple[int, int]:
    info = get_worker_info()
    return (0, 1) if info is None else (info.id, info.num_workers)


def stream_seed(seed: int, rank: int, worker: int, num_workers: int, start_step: int) -> int:
    """One 64-bit seed per (seed, rank, worker, num_workers, start_step)."""
    entropy = [seed % 2**63, rank, worker, num_workers, start_step % 2**63]
    return int(np.random.SeedSequence(entropy).generate_state(1, np.uint64)[0])


class _TrainDataset(IterableDataset):
    """Infinite stream of full batches for one rank; each DataLoader worker runs its own copy."""

    def __init__(
        self,
        urls: list[str],
        counts: dict[str, int],
        spec: _Spec,
        cfg: DataConfig,
        rank: int,
        seed: int,
        start_step: int,
        return_keys: bool,
    ) -> None:
        super().__init__()
        self.urls, self.counts, self.spec = urls, counts, spec
        self.batch_size, self.buffer, self.flip = cfg.batch_size, cfg.shuffle_buffer, cfg.random_flip
        self.rank, self.seed, self.start_step, self.return_keys = rank, seed, start_step, return_keys

    def _resampled(self, rng: random.Random, problems: _Problems) -> Iterator[dict[str, Any]]:
        empty_limit = max(MAX_EMPTY_SHARDS_MIN, 4 * len(self.urls))
        empty_run = 0
        while True:
            url = self.urls[rng.randrange(len(self.urls))]
            seen = 0
            for sample in _raw_samples(url, problems):
                seen += 1
                yield sample
            expected = self.counts.get(url)
            if expected is not None and seen < expected:
                problems.lost(url, seen, expected, expected - seen)
            empty_run = 0 if seen else empty_run + 1
            if empty_run >= empty_limit:
                raise DataError(
                    f"no samples from {empty_run} shards in a row "
                    f"(last problem: {problems.last_error or 'none'}); "
                    f"check the shard URLs, e.g. {self.urls[0]}"
                )

    @staticmethod
    def _shuffled(src: Iterator[dict[str, Any]], size: int, rng: random.Random) -> Iterator[dict[str, Any]]:
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

    def __iter__(self) -> Iterator[tuple[Any, ...]]:
        worker, num_workers = _worker()
        rng = random.Random(stream_seed(self.seed, self.rank, worker, num_workers, self.start_step))
        problems = _Problems(self.spec.on_error)
        images: list[np.ndarray] = []
        labels: list[int] = []
        keys: list[str] = []
        for sample in self._shuffled(self._resampled(rng, problems), self.buffer, rng):
            decoded = _decode(sample, self.spec, problems)
            if decoded is None:
                continue
            arr, label = decoded
            if self.flip and rng.random() < 0.5:
                arr = arr[:, ::-1]
            images.append(arr)
            labels.append(label)
            keys.append(sample.get("__key__", ""))
            if len(images) == self.batch_size:
                info = {"worker": worker, **problems.counts()}
                yield (
                    _to_tensor(images),
                    torch.tensor(labels, dtype=torch.long),
                    info,
                    keys if self.return_keys else None,
                )
                images, labels, keys = [], [], []


@dataclass(frozen=True)
class _Segment:
    url: str
    skip: int
    """Samples at the start of the shard that belong to another rank."""
    take: int | None
    """Samples this rank reads after ``skip`` (None: to the end; used when counts are unknown)."""
    expected: int | None
    """Samples the shard holds according to the manifest."""


class _EvalDataset(IterableDataset):
    """One exact pass over this rank's segments; yields chunks of up to ``batch_size`` samples."""

    def __init__(self, segments: list[_Segment], spec: _Spec, batch_size: int, return_keys: bool) -> None:
        super().__init__()
        self.segments, self.spec, self.batch_size, self.return_keys = segments, spec, batch_size, return_keys

    def __iter__(self) -> Iterator[tuple[Any, ...]]:
        worker, num_workers = _worker()
        problems = _Problems(self.spec.on_error)
        images: list[np.ndarray] = []
        labels: list[int] = []
        keys: list[str] = []

        def chunk() -> tuple[Any, ...]:
            info = {"worker": worker, **problems.counts()}
            return _to_tensor(images), torch.tensor(labels, dtype=torch.long), info, list(keys)

        for seg in self.segments[worker::num_workers]:
            end = None if seg.take is None else seg.skip + seg.take
            index = 0
            for sample in _raw_samples(seg.url, problems):
                index += 1
                if index > seg.skip:
                    decoded = _decode(sample, self.spec, problems)
                    if decoded is not None:
                        images.append(decoded[0])
                        labels.append(decoded[1])
                        keys.append(sample.get("__key__", ""))
                        if len(images) == self.batch_size:
                            yield chunk()
                            images, labels, keys = [], [], []
                if end is not None and index >= end:
                    break
            if end is not None and index < end and seg.expected is not None:
                # Only the shortfall inside this rank's range is this rank's loss.
                problems.lost(seg.url, index, seg.expected, end - max(index, seg.skip))
        if images:
            yield chunk()
        # A worker that had nothing to read still reports its counters.
        yield torch.empty(0), torch.empty(0, dtype=torch.long), {"worker": worker, **problems.counts()}, []


# --------------------------------------------------------------------------- main-process streams


class _Stats:
    def __init__(self) -> None:
        self.samples = 0
        self.batches = 0
        self.wait_s = 0.0
        self.last_wait_s = 0.0
        self.started: float | None = None
        self.per_worker: dict[int, dict[str, int]] = {}

    def record(self, n: int, wait: float, info: dict[str, int]) -> None:
        self.samples += n
        self.batches += 1 if n else 0
        self.wait_s += wait
        self.last_wait_s = wait
        self.per_worker[int(info["worker"])] = {
            "skipped": int(info["skipped"]),
            "shard_errors": int(info["shard_errors"]),
        }

    def as_dict(self) -> dict[str, float]:
        elapsed = time.perf_counter() - self.started if self.started is not None else 0.0
        return {
            "samples": self.samples,
            "batches": self.batches,
            "skipped": sum(w["skipped"] for w in self.per_worker.values()),
            "shard_errors": sum(w["shard_errors"] for w in self.per_worker.values()),
            "wait_s": self.wait_s,
            "last_wait_s": self.last_wait_s,
            "wait_per_batch_s": self.wait_s / self.batches if self.batches else 0.0,
            "samples_per_s": self.samples / elapsed if elapsed > 0 else 0.0,
        }


def _loader(dataset: IterableDataset, cfg: DataConfig) -> DataLoader:
    workers = cfg.num_workers
    return DataLoader(
        dataset,
        batch_size=None,  # the dataset batches itself
        num_workers=workers,
        prefetch_factor=cfg.prefetch_factor if workers else None,
        pin_memory=cfg.pin_memory,
    )


class TrainStream:
    """Infinite iterator of ``(x, y)`` (or ``(x, y, keys)``); iterating again continues, never restarts.

    ``x``: float32 [B, C, H, W] in [-1, 1], B == batch_size always; ``y``: int64 [B] (zeros if unlabeled).
    """

    def __init__(self, dataset: _TrainDataset, cfg: DataConfig, batches_per_epoch: int | None) -> None:
        self._dataset = dataset
        self._cfg = cfg
        self.batches_per_epoch = batches_per_epoch
        """Batches per rank in one nominal epoch: train samples // (batch_size · world_size), at least 1;
        None when ``train_shards`` names shards the manifest does not list (sample count unknown)."""
        self._it: Iterator | None = None
        self._stats = _Stats()

    def __iter__(self) -> TrainStream:
        return self

    def __next__(self) -> tuple[torch.Tensor, ...]:
        if self._it is None:
            self._it = iter(_loader(self._dataset, self._cfg))
            self._stats.started = time.perf_counter()
        t0 = time.perf_counter()
        x, y, info, keys = next(self._it)
        self._stats.record(x.shape[0], time.perf_counter() - t0, info)
        return (x, y) if keys is None else (x, y, keys)

    def stats(self) -> dict[str, float]:
        """Cumulative counters: samples, batches, skipped (samples), shard_errors, wait_s (time blocked
        waiting for data), last_wait_s, wait_per_batch_s, samples_per_s (since the first batch was
        requested), epoch (batches / batches_per_epoch; absent when the sample count is unknown)."""
        out = self._stats.as_dict()
        if self.batches_per_epoch:
            out["epoch"] = self._stats.batches / self.batches_per_epoch
        return out

    def close(self) -> None:
        """Stop the loader's worker processes (they also stop when the stream is garbage-collected)."""
        self._it = None


class EvalStream:
    """Each iteration is one exact pass: ``num_batches`` batches of ``(x, y)`` (or ``(x, y, keys)``)."""

    def __init__(self, dataset: _EvalDataset, cfg: DataConfig, sizes: list[int] | None, pad: bool) -> None:
        self._dataset = dataset
        self._cfg = cfg
        self._sizes = sizes
        self._pad = pad
        self._stats = _Stats()
        self.num_samples = sum(sizes) if sizes is not None else None
        """Samples this rank reads in one pass (None when the shards' counts are unknown)."""
        self.num_batches = len(sizes) if sizes is not None else None
        """Batches every rank yields per pass (None when the shards' counts are unknown)."""

    def __len__(self) -> int:
        if self.num_batches is None:
            raise TypeError("batch count unknown: the shards are not listed in the manifest")
        return self.num_batches

    def _chunks(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, list[str]]]:
        it = iter(_loader(self._dataset, self._cfg))
        while True:
            t0 = time.perf_counter()
            try:
                x, y, info, keys = next(it)
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


# --------------------------------------------------------------------------- planning + builders


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
    lo, hi = rank * total // world_size, (rank + 1) * total // world_size
    segments, start = [], 0
    for url, count in zip(urls, counts, strict=True):
        a, b = max(lo, start), min(hi, start + count)
        if a < b:
            segments.append(_Segment(url, a - start, b - a, count))
        start += count
    return segments


def _spec(cfg: DataConfig, info: DatasetInfo) -> _Spec:
    return _Spec(info.image_size, info.channels, info.num_classes, OnError(cfg.on_error))


def _check_rank(rank: int, world_size: int) -> None:
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} / world_size {world_size}: need 0 <= rank < world_size")


def build_train_stream(
    cfg: DataConfig,
    info: DatasetInfo,
    *,
    rank: int,
    world_size: int,
    seed: int | None = None,
    start_step: int = 0,
    return_keys: bool = False,
) -> TrainStream:
    """The infinite, resampled training stream of one rank (see the module docstring for guarantees).

    ``seed`` defaults to ``cfg.seed``; ``start_step`` is the step the run starts (or resumes) at.
    """
    _check_rank(rank, world_size)
    urls = _split_urls(cfg, info, "train")
    counts = {u: info.shard_counts[u] for u in urls if u in info.shard_counts}
    known = sum(counts.values()) if len(counts) == len(urls) else None
    per_epoch = max(1, known // (cfg.batch_size * world_size)) if known is not None else None
    dataset = _TrainDataset(
        urls, counts, _spec(cfg, info), cfg, rank, cfg.seed if seed is None else seed, start_step, return_keys
    )
    return TrainStream(dataset, cfg, per_epoch)


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
    _check_rank(rank, world_size)
    urls = _split_urls(cfg, info, split)
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
    dataset = _EvalDataset(segments, _spec(cfg, info), B, return_keys)
    return EvalStream(dataset, cfg, sizes, pad=world_size > 1)
