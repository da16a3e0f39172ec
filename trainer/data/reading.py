"""Reading samples inside a stream's worker: tar iteration, decoding, error accounting, tensors.

Bad data (an undecodable sample, a missing field, a truncated shard, a shard that cannot be opened) is
skipped with one warning per shard and kind and counted; samples a damaged tar drops without any
error (random bytes over a tar header look like end-of-archive to Python's tarfile) are caught by
comparing against the manifest's per-shard counts. ``DataConfig.on_error = "raise"`` turns all of
these into :class:`DataError`.
"""

from __future__ import annotations

import functools
import io
import logging
import os
import re
import tarfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from enum import Enum
from typing import Any
from urllib.parse import urlparse

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from webdataset import tariterators

from trainer.config import DataConfig
from trainer.data.manifest import DatasetInfo

log = logging.getLogger("trainer.data")

IMAGE_FIELDS = ("png", "jpg", "jpeg", "webp")


class DataError(RuntimeError):
    """A data problem that stops the stream (only under ``on_error="raise"`` or when no shard yields data)."""


class OnError(str, Enum):
    SKIP = "skip"
    RAISE = "raise"


@dataclass(frozen=True)
class Spec:
    image_size: int
    channels: int
    num_classes: int
    on_error: OnError


class Problems:
    """Per-process counters of skipped data, and warnings limited to one per (shard, kind)."""

    def __init__(self, on_error: OnError) -> None:
        self.on_error = on_error
        self.skipped = 0
        self.shard_errors = 0
        self.reading = ""
        """The shard the reader is in (samples are decoded later, after the shuffle buffer)."""
        self.last_error = ""
        self.quiet = False
        """Set while a resumed stream regenerates batches it delivered before: their problems were
        reported the first time."""
        self._warned: set[tuple[str, str]] = set()

    def warn(self, url: str, kind: str, message: str) -> None:
        self.last_error = message
        if self.on_error is OnError.RAISE:
            raise DataError(message)
        if (url, kind) not in self._warned and not self.quiet:
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


def raw_samples(url: str, problems: Problems, start: int = 0) -> Iterator[dict[str, Any]]:
    """Samples (dicts of raw bytes) of one shard from its ``start``-th on, via webdataset's opener, tar expander
    and grouper.

    Readers start mid-shard all the time (a canonical partition begins anywhere in a shard). Reaching sample
    ``start`` by reading costs a Python tar-header parse per member before it: with 64 partitions over
    10,000-sample shards that is ~7 samples read per sample delivered. A local uncompressed tar is instead
    entered with one seek to the sample's first header (:func:`sample_offsets`); anything else is read from
    its beginning and the first ``start`` samples dropped.
    """
    problems.reading = url
    handler = problems.reader_error
    index = sample_offsets(url) if start > 0 else None
    if index is not None and start < len(index[0]):
        offset, key = index[0][start], index[1][start]
        stream = None
        try:
            stream = open(_local_path(url), "rb")  # noqa: SIM115 (closed by the generator below)
            stream.seek(offset)
        except OSError:
            if stream is not None:
                stream.close()
            # gone since it was indexed: the plain read below reports it once
        else:
            files = tariterators.tar_file_expander([{"url": url, "stream": stream}], handler=handler)
            samples = tariterators.group_by_keys(files, handler=handler)
            with stream:
                first = next(samples, None)
                if first is not None and first.get("__key__") == key:
                    yield first
                    yield from samples
                    return
            # Not where the index said (a shard rewritten within the same mtime tick): read it from the start.
    streams = tariterators.url_opener([{"url": url}], handler=handler)
    files = tariterators.tar_file_expander(streams, handler=handler)
    for i, sample in enumerate(tariterators.group_by_keys(files, handler=handler)):
        if i >= start:
            yield sample


# Names webdataset's tar_file_iterator skips (its skip_meta pattern and its metadata prefix/suffix).
_META = re.compile(r"__[^/]*__($|/)")
_META_PREFIX, _META_SUFFIX = tariterators.meta_prefix, tariterators.meta_suffix


def _local_path(url: str) -> str | None:
    parsed = urlparse(url)
    if parsed.scheme == "file":
        return parsed.path
    return url if not parsed.scheme and not url.startswith("pipe:") else None


def sample_offsets(url: str) -> tuple[tuple[int, ...], tuple[str, ...]] | None:
    """(byte offset of each sample's first tar header, its key) for a local uncompressed ``.tar`` shard; None
    for anything else or a tar that does not parse to its end. Built once per process and file version (path,
    size, mtime) from the headers alone (tarfile seeks over the data), grouping members into samples by
    webdataset's rule: consecutive members with the same :func:`webdataset.tariterators.base_plus_ext` prefix,
    metadata names skipped."""
    path = _local_path(url)
    if path is None or not path.endswith(".tar"):
        return None
    try:
        st = os.stat(path)
    except OSError:
        return None
    return _tar_index(path, st.st_size, st.st_mtime_ns)


@functools.lru_cache(maxsize=1024)
def _tar_index(path: str, size: int, mtime_ns: int) -> tuple[tuple[int, ...], tuple[str, ...]] | None:
    offsets: list[int] = []
    keys: list[str] = []
    try:
        with tarfile.open(path, mode="r:") as tar:
            for member in tar:
                name = member.name
                tar.members = []  # headers only: do not keep every TarInfo of a large shard
                if not member.isreg() or _META.match(name):
                    continue
                if "/" not in name and name.startswith(_META_PREFIX) and name.endswith(_META_SUFFIX):
                    continue
                prefix, _ = tariterators.base_plus_ext(name)
                if prefix is not None and (not keys or prefix != keys[-1]):
                    offsets.append(member.offset)
                    keys.append(prefix)
    except (OSError, tarfile.TarError):
        return None
    return tuple(offsets), tuple(keys)


def decode(sample: dict[str, Any], spec: Spec, problems: Problems) -> tuple[np.ndarray, int] | None:
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


def to_tensor(images: list[np.ndarray]) -> torch.Tensor:
    """uint8 HxWxC list → float32 [B,C,H,W] in [-1, 1] (x/127.5 − 1: 0 → −1, 255 → 1)."""
    x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2)
    return x.float().div_(127.5).sub_(1.0).contiguous()


def worker_info() -> tuple[int, int]:
    info = get_worker_info()
    return (0, 1) if info is None else (info.id, info.num_workers)


class Stats:
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


def make_loader(dataset: IterableDataset, cfg: DataConfig) -> DataLoader:
    """A DataLoader over a self-batching dataset. Its own seeded generator: building the iterator draws
    a base seed, and drawing it from the global RNG would shift the training noise after a resume."""
    workers = cfg.num_workers or 0  # None (not resolved for a device): decode in this process
    return DataLoader(
        dataset,
        batch_size=None,  # the dataset batches itself
        num_workers=workers,
        prefetch_factor=cfg.prefetch_factor if workers else None,
        pin_memory=bool(cfg.pin_memory),
        generator=torch.Generator().manual_seed(0),
    )


def spec_for(cfg: DataConfig, info: DatasetInfo) -> Spec:
    return Spec(info.image_size, info.channels, info.num_classes, OnError(cfg.on_error))


def check_rank(rank: int, world_size: int) -> None:
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} / world_size {world_size}: need 0 <= rank < world_size")
