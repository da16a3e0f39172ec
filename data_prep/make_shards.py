"""Build webdataset shards (PNG + class + key) from a source, in parallel, resumably.

Guarantees:

* Deterministic: the same options and inputs give byte-identical shards (fixed tar mtimes, ordered
  results from the worker pool, seeded shuffle/split), whatever ``--workers`` is.
* No half-written shard ever carries a final name: each shard is written to ``NAME.tmp`` and renamed
  when closed. Progress (completed shards and where they end in the input order) is saved atomically
  to ``.progress.json`` after every shard, and ``manifest.json`` is written last.
* Resumable: re-running with the same options after an interruption keeps the completed shards and
  continues from the first unfinished one; the result equals an uninterrupted run.
* Idempotent: re-running on a complete output directory prints "up to date" and writes nothing.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import re
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
from tqdm import tqdm

from data_prep import images
from data_prep.images import Resample
from data_prep.manifest import (
    FORMAT,
    MANIFEST_NAME,
    MAX_SKIPPED_LISTED,
    SHARD_PATTERN,
    Manifest,
    ManifestError,
    ShardInfo,
    SplitInfo,
    read_manifest,
    sha256_file,
    write_json_atomic,
)
from data_prep.sources import (
    DIGITS_FINGERPRINT,
    DataPrepError,
    Item,
    SourceData,
    SourceKind,
    file_fingerprint,
    load_array_source,
    load_digits_source,
    load_folder_source,
)

PROGRESS_NAME = ".progress.json"
SKIPPED_NAME = "skipped.txt"
_OWNED_FILE = re.compile(r"^(train|val)-\d{6}\.tar(\.tmp)?$")
_CHUNK = 32
"""Items per task sent to a worker process."""


@dataclass(frozen=True)
class MakeOptions:
    source: SourceKind
    out: Path
    input: Path | None = None
    image_size: int = 32
    channels: int = 3
    val_fraction: float = 0.0
    max_per_shard: int = 10_000
    max_shard_bytes: int = 1 << 30
    """Payload bytes after which a shard is closed (webdataset's ``maxsize``; tar headers not counted)."""
    shuffle: bool = True
    seed: int = 0
    resample: Resample = Resample.LANCZOS
    workers: int = 1
    images_key: str | None = None
    labels_key: str | None = None
    class_names: list[str] | None = None
    overwrite: bool = False
    quiet: bool = False
    command: str = ""

    def validate(self) -> None:
        if self.source in (SourceKind.FOLDER, SourceKind.NPZ) and self.input is None:
            raise DataPrepError(f"--source {self.source.value} needs --input")
        checks = [
            (self.image_size >= 1, "--image-size", self.image_size, "must be >= 1"),
            (self.channels in (1, 3), "--channels", self.channels, "must be 1 or 3"),
            (0.0 <= self.val_fraction < 1.0, "--val-fraction", self.val_fraction, "must lie in [0, 1)"),
            (self.max_per_shard >= 1, "--max-per-shard", self.max_per_shard, "must be >= 1"),
            (self.max_shard_bytes >= 1, "--max-shard-bytes", self.max_shard_bytes, "must be >= 1"),
            (self.workers >= 1, "--workers", self.workers, "must be >= 1"),
        ]
        for ok, flag, value, msg in checks:
            if not ok:
                raise DataPrepError(f"{flag} {value}: {msg}")

    def output_settings(self) -> dict[str, Any]:
        """Every option that changes the shards' bytes (not workers, paths or verbosity)."""
        return {
            "format": FORMAT,
            "source": self.source.value,
            "image_size": self.image_size,
            "channels": self.channels,
            "val_fraction": self.val_fraction,
            "max_per_shard": self.max_per_shard,
            "max_shard_bytes": self.max_shard_bytes,
            "shuffle": self.shuffle,
            "seed": self.seed,
            "resample": self.resample.value,
            "images_key": self.images_key,
            "labels_key": self.labels_key,
            "class_names": self.class_names,
        }


@dataclass
class MakeResult:
    status: str
    """"up to date", "written" or "resumed"."""
    manifest: Manifest
    seconds: float = 0.0
    encoded: int = 0
    """Images encoded by this call (0 when up to date)."""


@dataclass
class _SplitProgress:
    next_position: int = 0
    """Position in the split's item order just after the last item covered by a completed shard."""
    shards: list[ShardInfo] = field(default_factory=list)
    skipped: list[dict[str, str]] = field(default_factory=list)


# --------------------------------------------------------------------------- encoding (worker side)


@dataclass(frozen=True)
class _EncodeSpec:
    size: int
    channels: int
    resample: Resample


def _encode_item(item: Item, spec: _EncodeSpec) -> tuple[bytes | None, str | None]:
    try:
        if item.path is not None:
            with open(item.path, "rb") as f:
                img = images.open_image_bytes(f.read(), spec.size)
        else:
            img = images.array_to_image(item.pixels)
        return images.encode_png(images.prepare(img, spec.size, spec.channels, spec.resample)), None
    except Exception as err:  # any decoder failure means "skip this input", never a crash
        msg = " ".join(str(err).split()) or "unreadable"
        return None, f"{type(err).__name__}: {msg}"


def _encode_chunk(chunk: list[Item], spec: _EncodeSpec) -> list[tuple[bytes | None, str | None]]:
    return [_encode_item(item, spec) for item in chunk]


def _chunks(items: list[Item], size: int) -> Iterator[list[Item]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _encoded(
    items: list[Item], spec: _EncodeSpec, pool: Any, workers: int
) -> Iterator[tuple[bytes | None, str | None]]:
    """Results in input order; at most a few chunks per worker in flight (bounded memory)."""
    if pool is None:
        for chunk in _chunks(items, _CHUNK):
            yield from _encode_chunk(chunk, spec)
        return
    pending: deque = deque()
    limit = 4 * workers
    for chunk in _chunks(items, _CHUNK):
        pending.append(pool.apply_async(_encode_chunk, (chunk, spec)))
        if len(pending) >= limit:
            yield from pending.popleft().get()
    while pending:
        yield from pending.popleft().get()


# --------------------------------------------------------------------------- writing


class _SplitWriter:
    """A ``wds.ShardWriter`` that writes ``NAME.tmp``, renames on close and records each finished shard."""

    def __init__(self, out: Path, split: str, opts: MakeOptions, progress: _SplitProgress, on_shard) -> None:
        self.out = out
        self.split = split
        self.opts = opts
        self.progress = progress
        self.on_shard = on_shard
        self.writer: Any = None
        self.file: BinaryIO | None = None
        self.count = 0
        self.position = progress.next_position
        self.pending_skips: list[dict[str, str]] = []

    def _open(self, fname: str) -> BinaryIO:
        # Not a context manager: ShardWriter owns the stream until it calls _finished (or abort runs).
        self.file = open(fname + ".tmp", "wb")  # noqa: SIM115
        return self.file

    def _finished(self, fname: str) -> None:
        # Called by ShardWriter when it closes a shard: either on rotation, from inside write() of
        # the first sample of the next shard (at ``self.position``), or from close().
        assert self.file is not None
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()
        self.file = None
        os.replace(fname + ".tmp", fname)
        path = Path(fname)
        info = ShardInfo(path.name, self.count, path.stat().st_size, sha256_file(path))
        self.count = 0
        self.progress.shards.append(info)
        self.progress.next_position = self.position
        self.progress.skipped.extend(self.pending_skips)
        self.pending_skips = []
        self.on_shard()

    def write(self, position: int, item: Item, png: bytes) -> None:
        self.position = position
        if self.writer is None:
            # SHARD_PATTERN in printf form; "%" in the directory name is escaped for ShardWriter's "%".
            pattern = str(self.out).replace("%", "%%") + "/" + SHARD_PATTERN.replace("{split}", self.split)
            pattern = pattern.replace("{index:06d}", "%06d")
            import webdataset as wds  # imported here: it pulls in torch (seconds), needless for "up to date"

            self.writer = wds.ShardWriter(
                pattern,
                maxcount=self.opts.max_per_shard,
                maxsize=self.opts.max_shard_bytes,
                start_shard=len(self.progress.shards),
                verbose=0,
                opener=self._open,
                post=self._finished,
                encoder=False,
                # Fixed integer mtime: reproducible bytes, and no per-member PAX header (a float mtime,
                # e.g. webdataset's default time.time(), adds a 1 KiB PAX header to every file).
                mtime=0,
            )
        sample = {"__key__": f"{item.index:08d}", "png": png}
        if item.label >= 0:
            sample["cls"] = str(item.label).encode()
        self.writer.write(sample)
        self.count += 1

    def skip(self, item: Item, error: str) -> None:
        self.pending_skips.append({"source": item.name, "error": error})

    def abort(self) -> None:
        """After an interruption: end the open shard's tar stream but leave it under its ``.tmp`` name."""
        if self.writer is not None and self.writer.tarstream is not None:
            self.writer.tarstream.close()
            self.writer.tarstream = None
        if self.file is not None:
            self.file.close()
            self.file = None
        self.writer = None

    def close(self, end_position: int) -> None:
        self.position = end_position
        if self.writer is not None:
            self.writer.close()
            self.writer = None
        if self.pending_skips or self.progress.next_position != end_position:
            # Trailing skipped inputs after the last shard (or a split where every input was skipped).
            self.progress.skipped.extend(self.pending_skips)
            self.pending_skips = []
            self.progress.next_position = end_position
            self.on_shard()


# --------------------------------------------------------------------------- planning


def load_source(opts: MakeOptions) -> SourceData:
    if opts.source is SourceKind.DIGITS:
        return load_digits_source()
    assert opts.input is not None
    if opts.source is SourceKind.FOLDER:
        return load_folder_source(opts.input)
    return load_array_source(opts.input, opts.images_key, opts.labels_key, opts.class_names)


def split_order(n: int, val_fraction: float, shuffle: bool, seed: int) -> dict[str, list[int]]:
    """Item indices per split. The validation set is a seeded random subset of round(n·fraction)
    items whether or not the order is shuffled, so a class-sorted folder still gets every class in val."""
    rng = np.random.default_rng(seed)
    n_val = int(round(n * val_fraction))
    is_val = np.zeros(n, dtype=bool)
    if n_val:
        is_val[rng.choice(n, size=n_val, replace=False)] = True
    order = rng.permutation(n) if shuffle else np.arange(n)
    return {
        "train": [int(i) for i in order if not is_val[i]],
        "val": [int(i) for i in order if is_val[i]],
    }


def _fingerprint(opts: MakeOptions, input_fingerprint: str) -> str:
    payload = json.dumps({"settings": opts.output_settings(), "input": input_fingerprint}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()


def _is_complete(out: Path, manifest: Manifest) -> bool:
    for info in manifest.splits.values():
        for shard in info.shards:
            path = out / shard.name
            if not path.is_file() or path.stat().st_size != shard.bytes:
                return False
    return True


def _remove_owned_files(out: Path) -> None:
    for path in out.iterdir():
        if _OWNED_FILE.match(path.name) or path.name in (PROGRESS_NAME, MANIFEST_NAME, SKIPPED_NAME):
            path.unlink()


def _discard_output(out: Path, created: list[Path]) -> None:
    """Remove what ``make`` wrote to ``out``, then the directories this run ``created`` (deepest first)
    while they are empty: a directory the user already had, or one holding anything else, is kept."""
    _remove_owned_files(out)
    for d in created:
        if not d.is_dir() or any(d.iterdir()):
            break
        d.rmdir()


def _load_progress(out: Path, fingerprint: str) -> dict[str, _SplitProgress] | None:
    path = out / PROGRESS_NAME
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    if data.get("fingerprint") != fingerprint:
        return None
    result = {}
    for split, raw in data.get("splits", {}).items():
        shards = [ShardInfo(**s) for s in raw["shards"]]
        for s in shards:
            p = out / s.name
            if not p.is_file() or p.stat().st_size != s.bytes:
                return None
        result[split] = _SplitProgress(int(raw["next_position"]), shards, list(raw["skipped"]))
    return result


def _save_progress(out: Path, fingerprint: str, progress: dict[str, _SplitProgress]) -> None:
    data = {
        "fingerprint": fingerprint,
        "splits": {
            split: {
                "next_position": p.next_position,
                "shards": [asdict(s) for s in p.shards],
                "skipped": p.skipped,
            }
            for split, p in progress.items()
        },
    }
    write_json_atomic(out / PROGRESS_NAME, data)


def _say(opts: MakeOptions, text: str) -> None:
    if not opts.quiet:
        print(text, flush=True)


# --------------------------------------------------------------------------- entry point


def make_shards(opts: MakeOptions) -> MakeResult:
    """Build (or resume, or confirm up to date) the shard directory ``opts.out``."""
    start = time.perf_counter()
    opts.validate()
    # Folder: the listing is the fingerprint (no decoding). Digits/arrays: cheap identity, load later.
    source: SourceData | None = None
    if opts.source is SourceKind.FOLDER:
        source = load_source(opts)
        input_fp = source.fingerprint
    elif opts.source is SourceKind.NPZ:
        assert opts.input is not None
        input_fp = file_fingerprint(opts.input)
    else:
        input_fp = DIGITS_FINGERPRINT
    fingerprint = _fingerprint(opts, input_fp)
    out = opts.out
    if out.exists() and not out.is_dir():
        raise DataPrepError(f"--out {out}: exists and is not a directory")
    # Created only once the inputs are known to hold images: a failed run leaves no empty directory.
    created = [d for d in (out, *out.parents) if not d.exists()]

    if (out / MANIFEST_NAME).is_file():
        try:
            existing = read_manifest(out)
        except ManifestError:
            existing = None
        if existing is not None and existing.fingerprint == fingerprint and _is_complete(out, existing):
            _say(
                opts,
                f"{out}: up to date ({existing.split('train').count} train, {existing.split('val').count} val)",
            )
            return MakeResult("up to date", existing, time.perf_counter() - start)
        if existing is not None and existing.fingerprint != fingerprint and not opts.overwrite:
            raise DataPrepError(
                f"--out {out}: holds shards made from other inputs or settings ({existing.command!r}); "
                "pass --overwrite or choose another --out"
            )

    if source is None:
        source = load_source(opts)
    order = split_order(len(source.items), opts.val_fraction, opts.shuffle, opts.seed)
    if not order["train"]:
        raise DataPrepError(
            f"--val-fraction {opts.val_fraction}: leaves no training samples of {len(source.items)} inputs"
        )
    out.mkdir(parents=True, exist_ok=True)
    progress = _load_progress(out, fingerprint)
    resumed = progress is not None and any(p.next_position for p in progress.values())
    if progress is None:
        _remove_owned_files(out)
        progress = {"train": _SplitProgress(), "val": _SplitProgress()}
    else:
        for tmp in out.glob("*.tar.tmp"):
            tmp.unlink()
        (out / MANIFEST_NAME).unlink(missing_ok=True)

    remaining = sum(len(order[s]) - progress[s].next_position for s in order)
    if resumed:
        _say(opts, f"{out}: resuming, {remaining} of {len(source.items)} inputs left")
    spec = _EncodeSpec(opts.image_size, opts.channels, opts.resample)
    save = lambda: _save_progress(out, fingerprint, progress)  # noqa: E731
    _save_progress(out, fingerprint, progress)

    workers = min(opts.workers, max(1, remaining // _CHUNK))
    pool = multiprocessing.get_context().Pool(workers) if workers > 1 else None
    encoded = 0
    writers: list[_SplitWriter] = []
    try:
        with tqdm(total=remaining, unit="img", disable=opts.quiet, desc="encoding", dynamic_ncols=True) as bar:
            for split in ("train", "val"):
                p = progress[split]
                items = [source.items[i] for i in order[split][p.next_position :]]
                writer = _SplitWriter(out, split, opts, p, save)
                writers.append(writer)
                skipped_before = sum(len(q.skipped) for q in progress.values())
                position = p.next_position
                for position, item, (png, error) in zip(
                    range(p.next_position, len(order[split])),
                    items,
                    _encoded(items, spec, pool, workers),
                    strict=True,
                ):
                    if png is None:
                        writer.skip(item, error or "unreadable")
                    else:
                        writer.write(position, item, png)
                        encoded += 1
                    bar.update(1)
                    if error is not None:
                        bar.set_postfix(skipped=skipped_before + len(writer.pending_skips), refresh=False)
                writer.close(len(order[split]))
    except BaseException:
        for w in writers:
            w.abort()
        raise
    finally:
        if pool is not None:
            pool.terminate()
            pool.join()

    if not progress["train"].shards:
        # Every training input was unreadable: a manifest with 0 samples would pass for a dataset.
        _discard_output(out, created)
        where = f"--input {opts.input}" if opts.input is not None else f"--source {opts.source.value}"
        bad = progress["train"].skipped
        example = f", e.g. {bad[0]['source']}: {bad[0]['error']}" if bad else ""
        raise DataPrepError(
            f"{where}: no readable images for the train split "
            f"({len(bad)} of {len(order['train'])} inputs unreadable{example}); nothing written"
        )
    skipped = [s for split in ("train", "val") for s in progress[split].skipped]
    (out / SKIPPED_NAME).write_text("".join(f"{s['source']}\t{s['error']}\n" for s in skipped))
    manifest = Manifest(
        image_size=opts.image_size,
        channels=opts.channels,
        class_names=tuple(source.class_names),
        splits={split: SplitInfo(tuple(progress[split].shards)) for split in ("train", "val")},
        command=opts.command,
        fingerprint=fingerprint,
        source={**source.description, "settings": opts.output_settings()},
        skipped_count=len(skipped),
        skipped=tuple(skipped[:MAX_SKIPPED_LISTED]),
        created=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    )
    write_json_atomic(out / MANIFEST_NAME, manifest.to_json())
    (out / PROGRESS_NAME).unlink(missing_ok=True)
    seconds = time.perf_counter() - start
    status = "resumed" if resumed else "written"
    _say(
        opts,
        f"{out}: {status} {manifest.split('train').count} train / "
        f"{manifest.split('val').count} val samples in "
        f"{len(manifest.split('train').shards)}+{len(manifest.split('val').shards)} shards, "
        f"{len(skipped)} inputs skipped, {seconds:.1f} s",
    )
    for s in skipped[:20]:
        _say(opts, f"  skipped {s['source']}: {s['error']}")
    if len(skipped) > 20:
        _say(opts, f"  ... {len(skipped) - 20} more in {out / SKIPPED_NAME}")
    return MakeResult(status, manifest, seconds, encoded)
