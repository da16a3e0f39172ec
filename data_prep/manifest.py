"""The ``manifest.json`` format: what a shard directory holds, and how to read it back safely.

``data_prep`` writes it (last, atomically); ``trainer.data`` and ``data_prep verify`` read it.
Keeping both sides in this one module means the writer and the readers cannot drift apart.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

FORMAT = "iddpm-shards/1"
MANIFEST_NAME = "manifest.json"
SHARD_PATTERN = "{split}-{index:06d}.tar"
"""Shard file names inside the output directory."""


class ManifestError(ValueError):
    """A missing or malformed manifest, with a one-line message naming the file."""


@dataclass(frozen=True)
class ShardInfo:
    name: str
    """File name relative to the dataset directory."""
    count: int
    """Samples in the shard."""
    bytes: int
    sha256: str


@dataclass(frozen=True)
class SplitInfo:
    shards: tuple[ShardInfo, ...] = ()

    @property
    def count(self) -> int:
        return sum(s.count for s in self.shards)

    def brace_pattern(self, split: str) -> str | None:
        """``train-{000000..000007}.tar`` when the names are contiguous (they are, when written here)."""
        if not self.shards:
            return None
        first = SHARD_PATTERN.format(split=split, index=0)
        names = [SHARD_PATTERN.format(split=split, index=i) for i in range(len(self.shards))]
        if [s.name for s in self.shards] != names:
            return None
        if len(names) == 1:
            return first
        return f"{split}-{{{0:06d}..{len(names) - 1:06d}}}.tar"


@dataclass(frozen=True)
class Manifest:
    image_size: int
    channels: int
    class_names: tuple[str, ...]
    """Empty for an unlabeled dataset."""
    splits: dict[str, SplitInfo]
    command: str = ""
    fingerprint: str = ""
    """Hash of every setting and input that determines the shards' bytes ("up to date" check)."""
    source: dict[str, Any] = field(default_factory=dict)
    skipped_count: int = 0
    skipped: tuple[dict[str, str], ...] = ()
    """Up to :data:`MAX_SKIPPED_LISTED` unreadable inputs ({"source", "error"}); all are in skipped.txt."""
    created: str = ""

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def split(self, name: str) -> SplitInfo:
        return self.splits.get(name, SplitInfo())

    def to_json(self) -> dict[str, Any]:
        splits = {}
        for name, info in self.splits.items():
            splits[name] = {
                "count": info.count,
                "pattern": info.brace_pattern(name),
                "shards": [vars(s) for s in info.shards],
            }
        return {
            "format": FORMAT,
            "created": self.created,
            "command": self.command,
            "fingerprint": self.fingerprint,
            "source": self.source,
            "image_size": self.image_size,
            "channels": self.channels,
            "image_format": "png",
            "num_classes": self.num_classes,
            "class_names": list(self.class_names),
            "splits": splits,
            "skipped": {"count": self.skipped_count, "items": list(self.skipped)},
        }


MAX_SKIPPED_LISTED = 1000


def _require(cond: bool, where: str, msg: str) -> None:
    if not cond:
        raise ManifestError(f"{where}: {msg}")


def _int(data: dict[str, Any], key: str, where: str, minimum: int = 0) -> int:
    value = data.get(key)
    _require(
        isinstance(value, int) and not isinstance(value, bool) and value >= minimum,
        where,
        f"'{key}' must be an integer >= {minimum}, got {value!r}",
    )
    return value


def parse_manifest(text: str, where: str) -> Manifest:
    """Validate the JSON text of a manifest; ``where`` names it in error messages."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise ManifestError(f"{where}: invalid JSON ({err.msg} at line {err.lineno})") from None
    _require(isinstance(data, dict), where, "top level must be an object")
    _require(data.get("format") == FORMAT, where, f"'format' must be {FORMAT!r}, got {data.get('format')!r}")
    image_size = _int(data, "image_size", where, 1)
    channels = _int(data, "channels", where, 1)
    _require(channels in (1, 3), where, f"'channels' must be 1 or 3, got {channels}")
    names = data.get("class_names", [])
    _require(
        isinstance(names, list) and all(isinstance(n, str) for n in names),
        where,
        "'class_names' must be a list of strings",
    )
    raw_splits = data.get("splits")
    _require(isinstance(raw_splits, dict), where, "'splits' must be an object")
    splits: dict[str, SplitInfo] = {}
    for split, raw in raw_splits.items():
        at = f"{where}: splits.{split}"
        _require(isinstance(raw, dict) and isinstance(raw.get("shards"), list), at, "'shards' must be a list")
        shards = []
        for i, s in enumerate(raw["shards"]):
            sat = f"{at}.shards[{i}]"
            _require(isinstance(s, dict), sat, "must be an object")
            name = s.get("name")
            _require(isinstance(name, str) and name != "", sat, f"'name' must be a non-empty string, got {name!r}")
            sha = s.get("sha256")
            _require(isinstance(sha, str) and len(sha) == 64, sat, f"'sha256' must be 64 hex digits, got {sha!r}")
            shards.append(ShardInfo(name, _int(s, "count", sat), _int(s, "bytes", sat), sha))
        info = SplitInfo(tuple(shards))
        if "count" in raw:
            _require(
                raw["count"] == info.count,
                at,
                f"'count' {raw['count']!r} != sum of shard counts {info.count}",
            )
        splits[split] = info
    skipped = data.get("skipped", {}) or {}
    return Manifest(
        image_size=image_size,
        channels=channels,
        class_names=tuple(names),
        splits=splits,
        command=str(data.get("command", "")),
        fingerprint=str(data.get("fingerprint", "")),
        source=dict(data.get("source", {}) or {}),
        skipped_count=int(skipped.get("count", 0)),
        skipped=tuple(skipped.get("items", [])),
        created=str(data.get("created", "")),
    )


def read_manifest(root: str | Path) -> Manifest:
    """Read ``root/manifest.json`` (``root`` may also name the file itself)."""
    path = Path(root)
    if path.is_dir() or path.name != MANIFEST_NAME:
        path = path / MANIFEST_NAME
    if not path.is_file():
        raise ManifestError(f"{path}: manifest not found (run `python -m data_prep make ... --out {path.parent}`)")
    try:
        text = path.read_text()
    except OSError as err:
        raise ManifestError(f"{path}: cannot read ({err.strerror})") from None
    return parse_manifest(text, str(path))


def write_json_atomic(path: Path, data: Any) -> None:
    """Write to a temporary name, fsync, then rename: readers see the old file or the new one, never half."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        json.dump(data, f, indent=2)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def sha256_file(path: str | Path, bufsize: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(bufsize):
            h.update(chunk)
    return h.hexdigest()
