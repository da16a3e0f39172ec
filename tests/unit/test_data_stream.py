"""trainer.data: streams over real tar shards (3 uneven shards, ranks simulated by explicit rank/world_size).

The 2-process version (real gloo ranks, per-batch collectives) is tests/integration/test_data_stream_dist.py.
"""

from __future__ import annotations

import functools
import http.server
import io
import itertools
import math
import shutil
import tarfile
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from data_prep.make_shards import MakeOptions, make_shards
from data_prep.manifest import ManifestError
from data_prep.sources import SourceKind
from trainer.config import ConfigError, DataConfig
from trainer.data import (
    DataError,
    batch_sizes,
    build_eval_stream,
    build_train_stream,
    load_manifest,
    rank_segments,
)

N, S, CLASSES = 50, 8, 4
IMAGES = np.random.default_rng(7).integers(0, 256, (N, S, S, 3), dtype=np.uint8)
LABELS = np.arange(N) % CLASSES


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """50 labelled 8x8 RGB samples in 3 shards of 20, 20 and 10."""
    tmp = tmp_path_factory.mktemp("stream")
    src = tmp / "in.npz"
    np.savez(src, images=IMAGES, labels=LABELS)
    out = tmp / "ds"
    make_shards(
        MakeOptions(
            source=SourceKind.NPZ,
            input=src,
            out=out,
            image_size=S,
            channels=3,
            max_per_shard=20,
            workers=1,
            quiet=True,
        )
    )
    return out


@pytest.fixture()
def ds(shards: Path, tmp_path: Path) -> Path:
    """A private copy, for tests that damage shards."""
    return Path(shutil.copytree(shards, tmp_path / "ds"))


def cfg(root: Path, **kw) -> DataConfig:
    base = dict(root=str(root), batch_size=8, num_workers=0, shuffle_buffer=16, random_flip=False, seed=3)
    base.update(kw)
    return DataConfig(**base)


def expected(key: str) -> torch.Tensor:
    """Independent float64 reference: uint8 HWC → CHW, x/127.5 − 1."""
    a = IMAGES[int(key)].astype(np.float64).transpose(2, 0, 1) / 127.5 - 1.0
    return torch.from_numpy(a)


def take(stream, n: int) -> list:
    return list(itertools.islice(stream, n))


# --------------------------------------------------------------------------- manifest


def test_manifest_fields_and_errors(shards: Path, tmp_path: Path) -> None:
    m = load_manifest(shards)
    assert (m.image_size, m.channels, m.num_classes, m.num_train, m.num_val) == (S, 3, CLASSES, 50, 0)
    assert [Path(u).name for u in m.train_urls] == [
        "train-000000.tar",
        "train-000001.tar",
        "train-000002.tar",
    ]
    with pytest.raises(ManifestError, match=str(tmp_path / "nope" / "manifest.json")):
        load_manifest(tmp_path / "nope")
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "manifest.json").write_text('{"format": "iddpm-shards/1", "image_size": 0}')
    with pytest.raises(ManifestError, match=r"bad/manifest.json: 'image_size' must be an integer >= 1, got 0"):
        load_manifest(bad)
    with pytest.raises(ManifestError, match="no val shards"):
        build_eval_stream(cfg(shards), m, rank=0, world_size=1, split="val")


# --------------------------------------------------------------------------- evaluation: exact pass


@pytest.mark.parametrize("workers", [0, 2])
def test_eval_two_ranks_exact_cover_equal_batches(shards: Path, workers: int) -> None:
    m = load_manifest(shards)
    seen: list[str] = []
    counts = []
    for rank in range(2):
        ev = build_eval_stream(
            cfg(shards, num_workers=workers), m, rank=rank, world_size=2, split="train", return_keys=True
        )
        batches = list(ev)
        counts.append(len(batches))
        assert len(batches) == ev.num_batches == 4  # 25 per rank, batches of 8: 8, 8, 8, 1
        assert [len(b[2]) for b in batches] == [8, 8, 8, 1]
        keys = [k for b in batches for k in b[2]]
        assert len(keys) == len(set(keys)) == 25  # no duplicates within a rank's pass
        for x, y, ks in batches:
            assert x.dtype == torch.float32 and x.shape[1:] == (3, S, S) and y.dtype == torch.long
            for i, k in enumerate(ks):
                assert torch.allclose(x[i].double(), expected(k), atol=1e-6)
                assert int(y[i]) == LABELS[int(k)]
        seen += keys
        assert [b[2] for b in ev] == [b[2] for b in batches]  # a second pass reads the same again
    assert counts[0] == counts[1]
    assert sorted(seen) == [f"{i:08d}" for i in range(N)]  # every sample exactly once across ranks


def test_batch_plan_and_rank_segments() -> None:
    assert batch_sizes(8, 3, 4) == [4, 3, 1]  # one batch short: the last full one gives a sample away
    assert batch_sizes(25, 4, 8) == [8, 8, 8, 1]
    assert batch_sizes(0, 1, 4) == [0]
    for n in range(0, 40):
        for world in (1, 2, 3, 5):
            k = math.ceil(math.ceil(n / world) / 4)
            for rank in range(world):
                segs = rank_segments(["a", "b", "c"], [n // 2, n // 3, n - n // 2 - n // 3], rank, world)
                mine = sum(s.take for s in segs)
                assert mine in (n // world, -(-n // world))
                sizes = batch_sizes(mine, k, 4)
                assert len(sizes) == k and sum(sizes) == mine and max(sizes, default=0) <= 4


# --------------------------------------------------------------------------- training: the canonical order


def global_batches(c: DataConfig, world: int, n: int, accum: int = 1) -> list[list[str]]:
    """The keys of the first ``n`` global batches, put together from every rank's micro-batches."""
    m = load_manifest(c.root)
    streams = [build_train_stream(c, m, rank=r, world_size=world, global_batch=8, accum=accum) for r in range(world)]
    out = []
    for b in range(n):
        keys: list[str] = []
        for s in streams:
            for _ in range(accum):
                mb = next(s)
                assert mb.batch == b and mb.x.shape[0] == 8 // world // accum
                keys += mb.keys
        out.append(keys)
    for s in streams:
        s.close()
    return out


@pytest.mark.parametrize(("world", "workers", "accum"), [(2, 0, 1), (2, 2, 1), (4, 1, 2), (1, 3, 2)])
def test_global_batches_do_not_depend_on_ranks_workers_or_accumulation(
    shards: Path, world: int, workers: int, accum: int
) -> None:
    c = cfg(shards, partitions=4)
    ref = global_batches(cfg(shards, partitions=4, num_workers=0), 1, 14)
    assert global_batches(c.model_copy(update={"num_workers": workers}), world, 14, accum) == ref
    # Epoch 0 is the 50 samples once each (the partitions' tails roll into epoch 1 by batch 7).
    m = load_manifest(shards)
    s = build_train_stream(c, m, rank=0, world_size=1, global_batch=8)
    first = [next(s) for _ in range(14)]
    epoch0 = [k for mb in first for k, e in zip(mb.keys, mb.epoch, strict=True) if e == 0]
    assert sorted(epoch0) == [f"{i:08d}" for i in range(N)]
    for mb in first:  # flips are not the stream's business any more: exact pixels and labels
        for i, k in enumerate(mb.keys):
            assert torch.allclose(mb.x[i].double(), expected(k), atol=1e-6) and int(mb.y[i]) == LABELS[int(k)]
        assert mb.index.tolist() == list(range(8))
    stats = s.stats()
    assert stats["samples"] == 112 and stats["skipped"] == 0 and stats["epoch"] == pytest.approx(14 / 6)


@pytest.mark.parametrize(("workers", "cut"), [(0, 5), (2, 6)])
def test_train_stream_resumes_exactly(shards: Path, workers: int, cut: int) -> None:
    """State after ``cut`` consumed batches -> a new stream continues bit for bit, across segment and epoch
    boundaries, however much the loader had prefetched."""
    m = load_manifest(shards)
    c = cfg(shards, num_workers=workers, shuffle_buffer=5, partitions=4)
    straight = build_train_stream(c, m, rank=1, world_size=2)
    ref = take(straight, cut + 9)
    straight.close()
    first = build_train_stream(c, m, rank=1, world_size=2)
    assert _pixels(take(first, cut)) == _pixels(ref[:cut])
    state = first.state_dict()
    first.close()
    assert state["batch"] == cut and sorted(state["positions"]) == ["2", "3"]
    resumed = build_train_stream(c, m, rank=1, world_size=2)
    resumed.load_state_dict(state)
    assert resumed.restart_reason is None
    assert _pixels(take(resumed, 9)) == _pixels(ref[cut:])
    assert resumed.state_dict()["batch"] == cut + 9


def test_a_state_saved_on_two_ranks_continues_on_one(shards: Path) -> None:
    m = load_manifest(shards)
    c = cfg(shards, partitions=4, shuffle_buffer=5)
    ref = global_batches(c, 1, 10)
    two = [build_train_stream(c, m, rank=r, world_size=2, global_batch=8) for r in range(2)]
    for s in two:
        take(s, 4)
    states = [s.state_dict() for s in two]
    one = build_train_stream(c, m, rank=0, world_size=1, global_batch=8)
    one.load_state_dict_resharded(states)
    assert one.restart_reason is None
    assert [mb.keys for mb in take(one, 6)] == ref[4:]


def test_another_global_batch_restarts_the_order_at_the_next_epoch(shards: Path) -> None:
    m = load_manifest(shards)
    c = cfg(shards, partitions=4)
    s = build_train_stream(c, m, rank=0, world_size=1, global_batch=8)
    take(s, 3)
    state = s.state_dict()
    outs = []
    for _ in range(2):
        t = build_train_stream(c, m, rank=0, world_size=1, global_batch=16)
        t.load_state_dict(state)
        assert "global_batch 8 -> 16" in (t.restart_reason or "") and "epoch 1" in t.restart_reason
        mb = next(t)
        assert mb.batch == 3 and set(mb.epoch) == {1}
        outs.append(mb.keys)
    assert outs[0] == outs[1]  # deterministic


def test_train_stream_state_must_load_before_iterating(shards: Path) -> None:
    m = load_manifest(shards)
    s = build_train_stream(cfg(shards), m, rank=0, world_size=1)
    state = s.state_dict()
    take(s, 1)
    with pytest.raises(RuntimeError, match="before drawing"):
        s.load_state_dict(state)


def test_train_stream_continues_across_for_loops(shards: Path) -> None:
    m = load_manifest(shards)
    stream = build_train_stream(cfg(shards), m, rank=0, world_size=1)
    first = take(stream, 2)
    second = take(stream, 2)
    ref = take(build_train_stream(cfg(shards), m, rank=0, world_size=1), 4)
    assert [b.keys for b in first + second] == [b.keys for b in ref]


def test_layouts_the_order_does_not_allow_are_refused(shards: Path) -> None:
    m = load_manifest(shards)
    with pytest.raises(ConfigError, match="world size 3 does not divide the 8 canonical data partitions"):
        build_train_stream(cfg(shards, partitions=8), m, rank=0, world_size=3, global_batch=24)
    with pytest.raises(ConfigError, match="data.num_workers=3 exceeds the 2 canonical data partitions of each rank"):
        build_train_stream(cfg(shards, num_workers=3, partitions=4), m, rank=0, world_size=2, global_batch=8)


def _pixels(batches: list) -> list[bytes]:
    return [b.x.numpy().tobytes() + b.y.numpy().tobytes() for b in batches]


# --------------------------------------------------------------------------- bad data


def shard_keys(path: Path) -> set[str]:
    with tarfile.open(path) as tar:
        return {m.name.split(".")[0] for m in tar.getmembers()}


def test_truncated_shard_is_skipped_not_fatal(ds: Path) -> None:
    intact = shard_keys(ds / "train-000000.tar") | shard_keys(ds / "train-000002.tar")
    shard = ds / "train-000001.tar"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2 + 100])  # cut mid-block, like a failed copy
    m = load_manifest(ds)
    stream = build_train_stream(cfg(ds), m, rank=0, world_size=1)
    batches = take(stream, 30)  # ~5 epochs: the damaged shard comes up many times
    assert all(b.x.shape[0] == 8 for b in batches)
    # tarfile reads a cut shard without raising: the loss shows in the manifest-count check and in
    # the partial last sample (its .png is missing), both counted.
    stats = stream.stats()
    assert stats["skipped"] > 0
    # Evaluation: every sample of the intact part, once; ranks still agree on the batch count.
    got = []
    for rank in range(2):
        ev = build_eval_stream(cfg(ds), m, rank=rank, world_size=2, split="train", return_keys=True)
        batches = list(ev)
        assert len(batches) == ev.num_batches
        mine = [k for b in batches for k in b[2]]
        got += mine
        assert ev.stats()["skipped"] == 25 - len(mine)  # each rank counts only the loss in its own range
    lost = 50 - len(got)
    assert len(set(got)) == len(got) and 0 < lost < 20
    assert len(intact) == 30 and intact <= set(got)


def test_garbage_over_a_tar_header_is_counted_via_manifest(ds: Path) -> None:
    # Random bytes over a header in mid-shard: Python's tarfile sees end-of-archive and raises nothing.
    shard = ds / "train-000000.tar"
    blob = bytearray(shard.read_bytes())
    with tarfile.open(shard) as tar:
        offset = tar.getmembers()[20].offset  # header of the 11th sample (2 members per sample)
    blob[offset : offset + 512] = np.random.default_rng(0).integers(0, 256, 512, dtype=np.uint8).tobytes()
    shard.write_bytes(bytes(blob))
    m = load_manifest(ds)
    ev = build_eval_stream(cfg(ds), m, rank=0, world_size=1, split="train", return_keys=True)
    keys = [k for b in ev for k in b[2]]
    read = len(keys)
    assert read < 50
    assert ev.stats()["skipped"] == 50 - read  # the silent loss is reported, not hidden


def _rewrite_with_bad_png(path: Path, bad_key: str) -> None:
    with tarfile.open(path) as tar:
        members = [(m.name, tar.extractfile(m).read()) for m in tar.getmembers()]
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            if name == f"{bad_key}.png":
                data = b"\x89PNG not really"
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def test_corrupt_sample_skipped_or_raised(ds: Path) -> None:
    bad = sorted(shard_keys(ds / "train-000002.tar"))[3]
    _rewrite_with_bad_png(ds / "train-000002.tar", bad)
    m = load_manifest(ds)
    ev = build_eval_stream(cfg(ds), m, rank=0, world_size=1, split="train", return_keys=True)
    keys = [k for b in ev for k in b[2]]
    assert len(keys) == 49 and bad not in keys and ev.stats()["skipped"] == 1
    strict = build_eval_stream(cfg(ds, on_error="raise"), m, rank=0, world_size=1, split="train")
    with pytest.raises(DataError, match=f"train-000002.tar: sample {bad}"):
        list(strict)


def test_shard_vanishing_mid_run_is_counted(ds: Path) -> None:
    m = load_manifest(ds)
    stream = build_train_stream(cfg(ds), m, rank=0, world_size=1)
    (ds / "train-000001.tar").unlink()
    assert len(take(stream, 20)) == 20
    stats = stream.stats()
    # Every canonical partition with a piece of the vanished shard fails to open it and counts that piece lost.
    assert stats["shard_errors"] > 0 and stats["skipped"] >= 20


def test_all_shards_unreadable_raises_instead_of_hanging(ds: Path) -> None:
    m = load_manifest(ds)
    stream = build_train_stream(cfg(ds), m, rank=0, world_size=1)
    for p in ds.glob("*.tar"):
        p.unlink()
    with pytest.raises(DataError, match="gave no sample in 16 epochs in a row"):
        next(stream)


def test_bad_arguments(shards: Path) -> None:
    m = load_manifest(shards)
    with pytest.raises(ValueError, match="rank 2 / world_size 2"):
        build_train_stream(cfg(shards), m, rank=2, world_size=2)
    with pytest.raises(ManifestError, match="missing-.*tar: shard not found"):
        build_train_stream(cfg(shards, train_shards="missing-{0..1}.tar"), m, rank=0, world_size=1)


# --------------------------------------------------------------------------- URL kinds


def test_brace_pattern_and_pipe_urls(shards: Path) -> None:
    m = load_manifest(shards)
    braces = cfg(shards, train_shards="train-{000000..000002}.tar")  # relative to root
    ev = build_eval_stream(braces, m, rank=0, world_size=1, split="train", return_keys=True)
    assert ev.num_batches == 7 and len({k for b in ev for k in b[2]}) == 50
    piped = " ".join(f"pipe:cat {u}" for u in m.train_urls)
    ev = build_eval_stream(cfg(shards, train_shards=piped), m, rank=0, world_size=1, split="train", return_keys=True)
    assert ev.num_batches is None  # counts unknown for URLs outside the manifest
    assert sorted(k for b in ev for k in b[2]) == [f"{i:08d}" for i in range(N)]
    # Counts unknown: whole shards dealt to the partitions (at least one each).
    stream = build_train_stream(cfg(shards, train_shards=piped, partitions=2), m, rank=0, world_size=1)
    assert next(stream).x.shape == (8, 3, S, S)
    assert stream.batches_per_epoch is None and "epoch" not in stream.stats()
    with pytest.raises(ConfigError, match="shards without sample counts .* cannot feed 8 canonical"):
        build_train_stream(cfg(shards, train_shards=piped), m, rank=0, world_size=1)


def test_http_root(shards: Path) -> None:
    handler = functools.partial(_QuietHandler, directory=str(shards))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        root = f"http://127.0.0.1:{server.server_address[1]}"
        m = load_manifest(root)
        assert m.train_urls[0] == f"{root}/train-000000.tar" and m.num_train == 50
        ev = build_eval_stream(cfg(root), m, rank=1, world_size=2, split="train", return_keys=True)
        in_order = []  # keys in manifest order, read with the standard library
        for name in ("train-000000.tar", "train-000001.tar", "train-000002.tar"):
            with tarfile.open(shards / name) as tar:
                in_order += [mem.name.split(".")[0] for mem in tar.getmembers() if mem.name.endswith(".png")]
        assert sorted(k for b in ev for k in b[2]) == sorted(in_order[25:])  # rank 1's contiguous half
        with pytest.raises(ManifestError, match="nothing-here/manifest.json"):
            load_manifest(f"{root}/nothing-here")
    finally:
        server.shutdown()
        server.server_close()


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass


# --------------------------------------------------------------------------- mid-shard starts


def _tar(path: Path, keys: list[str], size: int) -> None:
    """Samples of two members each (the second name has two dots), a metadata member and a directory."""
    with tarfile.open(path, "w") as tar:

        def add(name: str, data: bytes) -> None:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))

        add("__meta__", b"not a sample")
        folder = tarfile.TarInfo("sub")
        folder.type = tarfile.DIRTYPE
        tar.addfile(folder)
        for i, key in enumerate(keys):
            add(f"{key}.png", bytes([i]) * (size + i))
            add(f"{key}.seg.cls", str(i).encode())


@pytest.mark.parametrize("start", [0, 1, 5, 11, 12, 20])
def test_a_reader_starting_mid_shard_gets_the_samples_a_sequential_read_gets(tmp_path: Path, start: int) -> None:
    from trainer.data.reading import OnError, Problems, raw_samples, sample_offsets

    def read(url: str, first: int) -> list[tuple]:
        out = raw_samples(url, Problems(OnError.RAISE), start=first)
        return [(s["__key__"], s["png"], s["seg.cls"]) for s in out]

    path = tmp_path / "shard.tar"
    keys = [f"k{i:03d}" for i in range(12)]
    _tar(path, keys, size=700)
    index = sample_offsets(str(path))
    assert index is not None and index[1] == tuple(keys)  # the seek path is the one taken for a local tar
    with path.open("rb") as f:  # each offset is its sample's first header (a wrong one would fall back silently)
        for offset, key in zip(*index, strict=True):
            f.seek(offset)
            assert f.read(100).rstrip(b"\0") == f"{key}.png".encode()
    reference = read(f"pipe:cat {path}", 0)  # a pipe cannot seek: read from the start
    assert [r[0] for r in reference] == keys
    assert read(str(path), start) == reference[start:]
    assert read(f"pipe:cat {path}", start) == reference[start:]
    # Rewritten with other sizes (every offset moves): the index follows the file, not a stale copy.
    _tar(path, keys, size=1500)
    assert read(str(path), start) == read(f"pipe:cat {path}", 0)[start:]
