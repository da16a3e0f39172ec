"""``python -m data_prep verify DIR``: check every shard against the manifest.

Per shard: present, size and SHA-256 as recorded, a readable tar whose sample count matches, and
every sample a decodable PNG of the manifest's size and channels with a valid class. Problems are
returned one per line, each naming the shard (and sample key where there is one).
"""

from __future__ import annotations

import io
import multiprocessing
import re
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from data_prep.manifest import MANIFEST_NAME, Manifest, ManifestError, ShardInfo, read_manifest, sha256_file

_SHARD_NAME = re.compile(r"^(train|val)-\d{6}\.tar$")


@dataclass(frozen=True)
class _Expect:
    image_size: int
    channels: int
    num_classes: int


def _samples(path: Path) -> Iterator[tuple[str, dict[str, bytes]]]:
    """(key, {extension: bytes}) in tar order; raises tarfile/OSError errors on a damaged tar."""
    key, fields = None, {}
    with tarfile.open(path, mode="r|") as tar:
        for member in tar:
            if not member.isreg():
                continue
            base, _, ext = member.name.partition(".")
            if base != key and key is not None:
                yield key, fields
                fields = {}
            key = base
            f = tar.extractfile(member)
            fields[ext] = f.read() if f is not None else b""
    if key is not None:
        yield key, fields


def _check_sample(shard: str, key: str, fields: dict[str, bytes], expect: _Expect) -> list[str]:
    where = f"{shard}: sample {key}"
    problems = []
    if "png" not in fields:
        return [f"{where}: no .png (has {', '.join(sorted(fields)) or 'nothing'})"]
    try:
        img = Image.open(io.BytesIO(fields["png"]))
        img.load()
    except Exception as err:
        return [f"{where}: undecodable PNG ({type(err).__name__}: {' '.join(str(err).split())})"]
    mode = "L" if expect.channels == 1 else "RGB"
    if img.mode != mode:
        problems.append(f"{where}: mode {img.mode}, expected {mode}")
    if img.size != (expect.image_size, expect.image_size):
        problems.append(f"{where}: size {img.size[0]}x{img.size[1]}, expected {expect.image_size}x{expect.image_size}")
    if expect.num_classes:
        raw = fields.get("cls")
        try:
            label = int(raw.decode()) if raw is not None else None
        except (UnicodeDecodeError, ValueError):
            label = None
        if label is None or not 0 <= label < expect.num_classes:
            problems.append(f"{where}: class {raw!r} is not an integer in [0, {expect.num_classes})")
    return problems


def check_shard(root: Path, shard: ShardInfo, expect: _Expect, deep: bool = True) -> tuple[list[str], list[str]]:
    """(problems, keys) for one shard."""
    path = root / shard.name
    if not path.is_file():
        return [f"{shard.name}: missing"], []
    problems = []
    size = path.stat().st_size
    if size != shard.bytes:
        problems.append(f"{shard.name}: size {size} bytes, manifest says {shard.bytes}")
    digest = sha256_file(path)
    if digest != shard.sha256:
        problems.append(f"{shard.name}: sha256 mismatch (manifest {shard.sha256[:12]}…, file {digest[:12]}…)")
    if not deep and not problems:
        return problems, []
    keys: list[str] = []
    try:
        for key, fields in _samples(path):
            keys.append(key)
            problems.extend(_check_sample(shard.name, key, fields, expect))
    except (tarfile.TarError, OSError, EOFError) as err:
        problems.append(
            f"{shard.name}: damaged tar after {len(keys)} samples ({type(err).__name__}: {' '.join(str(err).split())})"
        )
    if len(keys) != shard.count:
        problems.append(f"{shard.name}: {len(keys)} samples, manifest says {shard.count}")
    return problems, keys


def _check_task(args: tuple[Path, ShardInfo, _Expect, bool]) -> tuple[list[str], list[str]]:
    return check_shard(*args)


def verify_dir(root: str | Path, workers: int = 1, deep: bool = True) -> tuple[list[str], Manifest]:
    """Problems found (empty when all is well) and the manifest. Raises ManifestError if it is unreadable
    or lists no training samples (every shard could check out and the dataset still be useless)."""
    root = Path(root)
    manifest = read_manifest(root)
    if manifest.split("train").count == 0:
        raise ManifestError(f"{root / MANIFEST_NAME}: no train samples (re-run `python -m data_prep make`)")
    expect = _Expect(manifest.image_size, manifest.channels, manifest.num_classes)
    shards = [s for split in manifest.splits.values() for s in split.shards]
    tasks = [(root, s, expect, deep) for s in shards]
    if workers > 1 and len(tasks) > 1:
        with multiprocessing.get_context().Pool(min(workers, len(tasks))) as pool:
            results = pool.map(_check_task, tasks)
    else:
        results = [_check_task(t) for t in tasks]
    problems: list[str] = []
    seen: dict[str, str] = {}
    for shard, (found, keys) in zip(shards, results, strict=True):
        problems.extend(found)
        for key in keys:
            if key in seen:
                problems.append(f"{shard.name}: sample {key} duplicates one in {seen[key]}")
            else:
                seen[key] = shard.name
    listed = {s.name for s in shards}
    for path in sorted(root.iterdir()):
        if _SHARD_NAME.match(path.name) and path.name not in listed:
            problems.append(f"{path.name}: shard file not listed in the manifest")
    return problems, manifest
