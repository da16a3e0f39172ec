"""Shard directories: the manifest, shard URLs and their per-shard sample counts.

Shards are read with webdataset's URL openers, so local paths, ``file://``, brace patterns
(``train-{000000..000127}.tar``), ``pipe:CMD`` and ``http(s)://`` URLs all work (``pipe:`` runs CMD
through a shell, webdataset's design: use it with trusted configs only).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from urllib.parse import urlparse

import webdataset as wds

from data_prep.manifest import MANIFEST_NAME, Manifest, ManifestError, parse_manifest, read_manifest
from trainer.config import DataConfig


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


def load_manifest(root: str | os.PathLike[str]) -> DatasetInfo:
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


def split_urls(cfg: DataConfig, info: DatasetInfo, split: str) -> list[str]:
    override = cfg.train_shards if split == "train" else cfg.val_shards
    urls = expand_shard_spec(override, info.root) if override else list(info.urls(split))
    where = f"data.{split}_shards={override!r}" if override else f"{info.root}/{MANIFEST_NAME}"
    if not urls:
        raise ManifestError(f"{where}: no {split} shards")
    for url in urls:
        if not urlparse(url).scheme and not url.startswith("pipe:") and not os.path.isfile(url):
            raise ManifestError(f"{url}: shard not found (from {where})")
    return urls
