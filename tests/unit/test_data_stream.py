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
from trainer.config import DataConfig
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


# --------------------------------------------------------------------------- training: resampled, infinite


@pytest.mark.parametrize("workers", [0, 2])
def test_train_full_batches_per_rank_and_determinism(shards: Path, workers: int) -> None:
    m = load_manifest(shards)
    c = cfg(shards, num_workers=workers)
    per_rank = []
    for rank in range(2):
        stream = build_train_stream(c, m, rank=rank, world_size=2, seed=11, return_keys=True)
        assert stream.batches_per_epoch == 50 // (8 * 2)
        batches = take(stream, 2 * stream.batches_per_epoch)
        assert len(batches) == 6
        for x, y, keys in batches:
            assert x.shape == (8, 3, S, S) and y.shape == (8,)
            for i, k in enumerate(keys):  # flips off: exact pixels and labels
                assert torch.allclose(x[i].double(), expected(k), atol=1e-6)
                assert int(y[i]) == LABELS[int(k)]
        stats = stream.stats()
        assert stats["samples"] == 48 and stats["batches"] == 6 and stats["skipped"] == 0
        assert stats["epoch"] == pytest.approx(2.0) and stats["samples_per_s"] > 0 and stats["wait_s"] > 0
        per_rank.append([k for b in batches for k in b[2]])
        stream.close()
    assert per_rank[0] != per_rank[1]  # each rank its own stream
    again = build_train_stream(c, m, rank=0, world_size=2, seed=11, return_keys=True)
    assert [k for b in take(again, 6) for k in b[2]] == per_rank[0]  # same (seed, rank): same stream


def _pixels(batches: list) -> list[bytes]:
    return [b[0].numpy().tobytes() + b[1].numpy().tobytes() for b in batches]


@pytest.mark.parametrize(("workers", "cut"), [(0, 5), (2, 5), (2, 6), (3, 7)])
def test_train_stream_resumes_exactly(shards: Path, workers: int, cut: int) -> None:
    """State after `cut` consumed batches → a new stream continues bit for bit, across round boundaries
    (rounds of 2 batches), whatever the worker that is due next and however much was prefetched."""
    m = load_manifest(shards)
    c = cfg(shards, num_workers=workers, batches_per_round=2, random_flip=True, shuffle_buffer=5)
    straight = build_train_stream(c, m, rank=1, world_size=2, return_keys=True)
    ref = take(straight, cut + 9)
    straight.close()
    first = build_train_stream(c, m, rank=1, world_size=2, return_keys=True)
    assert _pixels(take(first, cut)) == _pixels(ref[:cut])
    state = first.state_dict()
    first.close()
    assert state["consumed"] == cut and len(state["positions"]) == max(1, workers)
    resumed = build_train_stream(c, m, rank=1, world_size=2, return_keys=True)
    resumed.load_state_dict(state)
    assert resumed.restart_reason is None
    assert _pixels(take(resumed, 9)) == _pixels(ref[cut:])
    assert resumed.state_dict()["consumed"] == cut + 9


def test_train_stream_restarts_deterministically_on_other_layout(shards: Path) -> None:
    m = load_manifest(shards)
    c = cfg(shards, num_workers=0, batches_per_round=2)
    s2 = build_train_stream(c, m, rank=0, world_size=2, return_keys=True)
    ref = take(s2, 3)
    state = s2.state_dict()
    outs = []
    for _ in range(2):
        s1 = build_train_stream(c, m, rank=0, world_size=1, return_keys=True)
        s1.load_state_dict_resharded([state, state])
        assert "world_size 2 -> 1" in (s1.restart_reason or "")
        outs.append(_pixels(take(s1, 3)))
    assert outs[0] == outs[1]  # deterministic for the new layout
    fresh = build_train_stream(c, m, rank=0, world_size=1, return_keys=True)
    assert outs[0] != _pixels(take(fresh, 3)) != _pixels(ref)  # a new origin: no replay of either stream


def test_train_stream_state_must_load_before_iterating(shards: Path) -> None:
    m = load_manifest(shards)
    s = build_train_stream(cfg(shards), m, rank=0, world_size=1)
    state = s.state_dict()
    take(s, 1)
    with pytest.raises(RuntimeError, match="before drawing"):
        s.load_state_dict(state)


def test_train_stream_continues_across_for_loops(shards: Path) -> None:
    m = load_manifest(shards)
    stream = build_train_stream(cfg(shards), m, rank=0, world_size=1, return_keys=True)
    first = take(stream, 2)
    second = take(stream, 2)
    ref = take(build_train_stream(cfg(shards), m, rank=0, world_size=1, return_keys=True), 4)
    assert [b[2] for b in first + second] == [b[2] for b in ref]


def test_random_flip(shards: Path) -> None:
    m = load_manifest(shards)
    stream = build_train_stream(cfg(shards, random_flip=True), m, rank=0, world_size=1, return_keys=True)
    flipped = kept = 0
    for x, _, keys in take(stream, 8):
        for i, k in enumerate(keys):
            ref = expected(k)
            if torch.allclose(x[i].double(), ref, atol=1e-6):
                kept += 1
            else:
                assert torch.allclose(x[i].double(), ref.flip(-1), atol=1e-6)
                flipped += 1
    assert flipped > 10 and kept > 10  # p = 0.5 each over 64 samples


# --------------------------------------------------------------------------- bad data


def shard_keys(path: Path) -> set[str]:
    with tarfile.open(path) as tar:
        return {m.name.split(".")[0] for m in tar.getmembers()}


def test_truncated_shard_is_skipped_not_fatal(ds: Path) -> None:
    intact = shard_keys(ds / "train-000000.tar") | shard_keys(ds / "train-000002.tar")
    shard = ds / "train-000001.tar"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2 + 100])  # cut mid-block, like a failed copy
    m = load_manifest(ds)
    stream = build_train_stream(cfg(ds), m, rank=0, world_size=1, return_keys=True)
    batches = take(stream, 30)  # ~5 epochs: the damaged shard comes up many times
    assert all(b[0].shape[0] == 8 for b in batches)
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
    assert stats["shard_errors"] > 0 and stats["skipped"] == 20 * stats["shard_errors"]  # 20 per failed open


def test_all_shards_unreadable_raises_instead_of_hanging(ds: Path) -> None:
    m = load_manifest(ds)
    stream = build_train_stream(cfg(ds), m, rank=0, world_size=1)
    for p in ds.glob("*.tar"):
        p.unlink()
    with pytest.raises(DataError, match="no samples from"):
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
    stream = build_train_stream(cfg(shards, train_shards=piped), m, rank=0, world_size=1)
    assert next(stream)[0].shape == (8, 3, S, S)
    assert stream.batches_per_epoch is None and "epoch" not in stream.stats()


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
