"""data_prep: shards from real PNG/JPEG folders, arrays and digits; manifest; resume; verify."""

from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from data_prep.__main__ import cli
from data_prep.images import Resample
from data_prep.make_shards import MakeOptions, make_shards
from data_prep.manifest import read_manifest
from data_prep.sources import SourceKind

# --------------------------------------------------------------------------- helpers


def shard_samples(path: Path) -> dict[str, dict[str, bytes]]:
    """{key: {ext: bytes}} read with the standard library only."""
    out: dict[str, dict[str, bytes]] = {}
    with tarfile.open(path) as tar:
        for m in tar.getmembers():
            key, _, ext = m.name.partition(".")
            out.setdefault(key, {})[ext] = tar.extractfile(m).read()
    return out


def all_samples(root: Path, split: str) -> dict[str, dict[str, bytes]]:
    out: dict[str, dict[str, bytes]] = {}
    for shard in read_manifest(root).split(split).shards:
        out.update(shard_samples(root / shard.name))
    return out


def decode(png: bytes) -> Image.Image:
    img = Image.open(io.BytesIO(png))
    img.load()
    return img


def save(img: Image.Image, path: Path, **kw) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, **kw)


def stripes(w: int, h: int) -> Image.Image:
    """Three vertical stripes red | green | blue: a centre crop keeps only green."""
    a = np.zeros((h, w, 3), np.uint8)
    a[:, : w // 3, 0] = 255
    a[:, w // 3 : 2 * w // 3, 1] = 255
    a[:, 2 * w // 3 :, 2] = 255
    return Image.fromarray(a)


@pytest.fixture()
def image_folder(tmp_path: Path) -> Path:
    """Two classes of real files in mixed sizes, formats and modes, plus two corrupt ones."""
    root = tmp_path / "imgs"
    save(stripes(96, 32), root / "cat" / "a_stripes.png")  # RGB PNG, wide
    save(Image.new("L", (25, 50), 77), root / "cat" / "b_gray.jpg", quality=95)  # L JPEG, tall
    rgba = Image.new("RGBA", (33, 33), (10, 20, 30, 0))  # fully transparent → white
    save(rgba, root / "cat" / "c_clear.png")
    pal = Image.new("RGB", (20, 20), (200, 100, 50)).convert("P", palette=Image.Palette.ADAPTIVE)
    save(pal, root / "dog" / "d_palette.png")
    save(Image.fromarray(np.full((24, 24), 32768, np.uint16)), root / "dog" / "e_16bit.png")  # I;16
    save(Image.new("CMYK", (40, 30), (0, 0, 0, 0)), root / "dog" / "f_cmyk.jpg", quality=95)
    save(Image.new("LA", (18, 40), (120, 255)), root / "dog" / "g_la.png")
    (root / "dog" / "h_corrupt.png").write_bytes(os.urandom(300))
    good = io.BytesIO()
    Image.new("RGB", (64, 64), (1, 2, 3)).save(good, format="JPEG")
    (root / "dog" / "i_truncated.jpg").write_bytes(good.getvalue()[: len(good.getvalue()) // 3])
    (root / "dog" / "notes.txt").write_text("not an image")
    return root


def opts(out: Path, **kw) -> MakeOptions:
    base = dict(source=SourceKind.FOLDER, out=out, image_size=16, channels=3, max_per_shard=3, workers=1, quiet=True)
    base.update(kw)
    return MakeOptions(**base)


# --------------------------------------------------------------------------- folder source


def test_folder_shards_manifest_and_pixels(image_folder: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    code = cli(
        [
            "make",
            "--source",
            "folder",
            "--input",
            str(image_folder),
            "--out",
            str(out),
            "--image-size",
            "16",
            "--channels",
            "3",
            "--max-per-shard",
            "3",
            "--workers",
            "1",
            "--no-shuffle",
            "--quiet",
        ]
    )
    assert code == 0
    data = json.loads((out / "manifest.json").read_text())
    m = read_manifest(out)
    assert (m.image_size, m.channels, m.class_names) == (16, 3, ("cat", "dog"))
    assert data["num_classes"] == 2 and "--source folder" in data["command"]
    assert m.split("train").count == 7 and m.split("val").count == 0
    assert [s.count for s in m.split("train").shards] == [3, 3, 1]
    assert data["splits"]["train"]["pattern"] == "train-{000000..000002}.tar"
    for s in m.split("train").shards:
        blob = (out / s.name).read_bytes()
        assert s.sha256 == hashlib.sha256(blob).hexdigest() and s.bytes == len(blob)
    # The two corrupt inputs are skipped and listed, never a crash.
    assert m.skipped_count == 2
    assert sorted(x["source"] for x in m.skipped) == ["dog/h_corrupt.png", "dog/i_truncated.jpg"]
    assert "dog/h_corrupt.png" in (out / "skipped.txt").read_text()

    samples = all_samples(out, "train")
    # Keys are the index in sorted relative-path order (corrupt files keep their index: 7 and 8).
    assert sorted(samples) == [f"{i:08d}" for i in range(7)]
    labels = {k: int(v["cls"]) for k, v in samples.items()}
    assert labels == {f"{i:08d}": (0 if i < 3 else 1) for i in range(7)}
    imgs = {k: np.asarray(decode(v["png"])) for k, v in samples.items()}
    for k, a in imgs.items():
        assert a.shape == (16, 16, 3) and a.dtype == np.uint8, k
    # Centre crop of red|green|blue keeps green (away from the filter's reach of the borders).
    inner = imgs["00000000"][:, 3:13].astype(int)
    assert np.abs(inner - [0, 255, 0]).max() <= 2
    # L → RGB replicates the gray value (JPEG: ±2).
    assert np.abs(imgs["00000001"].astype(int) - 77).max() <= 2
    # Fully transparent RGBA is composited over white.
    assert (imgs["00000002"] == 255).all()
    # Palette keeps its colour; 16-bit 32768 scales to round(32768·255/65535) = 128; CMYK 0 = white.
    assert np.abs(imgs["00000003"].astype(int) - [200, 100, 50]).max() <= 3
    assert (imgs["00000004"] == round(32768 * 255 / 65535)).all()
    assert np.abs(imgs["00000005"].astype(int) - 255).max() <= 2
    # LA with opaque alpha: its gray value.
    assert (imgs["00000006"] == 120).all()


def test_grayscale_luma_and_resample_filter(tmp_path: Path) -> None:
    root = tmp_path / "flat"
    colour = (200, 30, 90)
    save(Image.new("RGB", (50, 20), colour), root / "x.png")
    out = tmp_path / "g"
    m = make_shards(opts(out, input=root, channels=1, resample=Resample.BICUBIC)).manifest
    assert m.num_classes == 0 and m.channels == 1
    (sample,) = all_samples(out, "train").values()
    assert "cls" not in sample
    img = decode(sample["png"])
    assert img.mode == "L" and img.size == (16, 16)
    luma = 0.299 * colour[0] + 0.587 * colour[1] + 0.114 * colour[2]  # ITU-R 601-2, float64
    assert np.abs(np.asarray(img).astype(float) - luma).max() <= 1.0


def test_folder_errors_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli(["make", "--source", "folder", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "error: --source folder needs --input"
    missing = tmp_path / "nope"
    assert cli(["make", "--source", "folder", "--input", str(missing), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert str(missing) in err and "\n" not in err
    mixed = tmp_path / "mixed"
    save(Image.new("RGB", (4, 4)), mixed / "top.png")
    save(Image.new("RGB", (4, 4)), mixed / "cls" / "a.png")
    assert cli(["make", "--source", "folder", "--input", str(mixed), "--out", str(tmp_path / "o")]) == 2
    assert "subfolder" in capsys.readouterr().err


# --------------------------------------------------------------------------- arrays + digits


def test_npz_channel_first_floats_labels_and_names(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    x = rng.random((12, 3, 8, 8))  # float [0,1], channel-first
    y = np.arange(12) % 3
    path = tmp_path / "a.npz"
    np.savez(path, x=x, y=y, class_names=np.array(["a", "b", "c"]))
    out = tmp_path / "o"
    m = make_shards(opts(out, source=SourceKind.NPZ, input=path, image_size=8, max_per_shard=5, shuffle=False)).manifest
    assert m.class_names == ("a", "b", "c") and m.split("train").count == 12
    samples = all_samples(out, "train")
    for i in range(12):
        s = samples[f"{i:08d}"]
        expect = np.rint(x[i].transpose(1, 2, 0) * 255.0)  # float64 reference, no resize at 8x8
        assert np.array_equal(np.asarray(decode(s["png"])), expect.astype(np.uint8))
        assert int(s["cls"]) == y[i]


def test_npy_unlabeled(tmp_path: Path) -> None:
    path = tmp_path / "a.npy"
    np.save(path, np.zeros((4, 10, 10), np.uint8))
    m = make_shards(opts(tmp_path / "o", source=SourceKind.NPZ, input=path, image_size=5)).manifest
    assert m.num_classes == 0 and m.split("train").count == 4


def test_digits_counts_split_and_exact_pixels(tmp_path: Path) -> None:
    from sklearn.datasets import load_digits

    out = tmp_path / "d8"
    code = cli(
        [
            "make",
            "--source",
            "digits",
            "--out",
            str(out),
            "--image-size",
            "8",
            "--channels",
            "1",
            "--val-fraction",
            "0.1",
            "--max-per-shard",
            "256",
            "--quiet",
        ]
    )
    assert code == 0
    m = read_manifest(out)
    assert m.split("train").count == 1617 and m.split("val").count == 180  # round(1797·0.1) = 180
    assert [s.count for s in m.split("train").shards] == [256] * 6 + [81]
    assert m.class_names == tuple(str(i) for i in range(10))
    train, val = all_samples(out, "train"), all_samples(out, "val")
    assert not set(train) & set(val) and len(train) + len(val) == 1797
    digits = load_digits()
    for key, s in {**train, **val}.items():
        i = int(key)
        expect = np.rint(digits.images[i].astype(np.float64) * 255.0 / 16.0)  # 0..16 → 0..255
        assert np.array_equal(np.asarray(decode(s["png"])), expect.astype(np.uint8)), key
        assert int(s["cls"]) == digits.target[i]


# --------------------------------------------------------------------------- idempotence, resume, parallel


def npz_input(tmp_path: Path, n: int = 100) -> Path:
    rng = np.random.default_rng(1)
    path = tmp_path / "in.npz"
    np.savez(path, images=rng.integers(0, 256, (n, 12, 12, 3), dtype=np.uint8), labels=np.arange(n) % 10)
    return path


def shas(out: Path) -> list[tuple[str, str]]:
    m = read_manifest(out)
    return [(s.name, s.sha256) for split in ("train", "val") for s in m.split(split).shards]


def test_rerun_is_up_to_date_and_other_settings_need_overwrite(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    src = npz_input(tmp_path)
    out = tmp_path / "o"
    args = [
        "make",
        "--source",
        "npz",
        "--input",
        str(src),
        "--out",
        str(out),
        "--image-size",
        "8",
        "--max-per-shard",
        "30",
        "--val-fraction",
        "0.2",
        "--workers",
        "1",
    ]
    assert cli(args) == 0
    capsys.readouterr()
    stamps = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    assert cli(args) == 0
    assert "up to date" in capsys.readouterr().out
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == stamps  # nothing rewritten
    assert cli([*args[:-2], "--workers", "1", "--seed", "5"]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert cli([*args, "--seed", "5", "--overwrite", "--quiet"]) == 0
    assert read_manifest(out).source["settings"]["seed"] == 5


def test_interrupted_run_resumes_to_identical_shards(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import data_prep.make_shards as ms

    src = npz_input(tmp_path)
    o = dict(source=SourceKind.NPZ, input=src, image_size=8, max_per_shard=10, val_fraction=0.2, workers=1)
    reference = tmp_path / "ref"
    make_shards(opts(reference, **o))

    real = ms._encode_item
    calls = {"n": 0}

    def dying(item, spec):
        calls["n"] += 1
        if calls["n"] == 75:
            raise KeyboardInterrupt
        return real(item, spec)

    monkeypatch.setattr(ms, "_encode_item", dying)
    out = tmp_path / "o"
    with pytest.raises(KeyboardInterrupt):
        make_shards(opts(out, **o))
    monkeypatch.setattr(ms, "_encode_item", real)
    # Items are encoded in chunks: the writer got every full chunk before call 75 (64 with chunks of 32),
    # so 6 shards of 10 are complete and the 7th is open.
    written = (74 // ms._CHUNK) * ms._CHUNK
    assert written % 10 and written < 80
    # Interrupted: no manifest; final names only on complete shards (the open one is *.tmp).
    assert not (out / "manifest.json").exists()
    finals = sorted(p.name for p in out.glob("*.tar"))
    assert finals == [f"train-{i:06d}.tar" for i in range(written // 10)]
    for name in finals:
        assert len(shard_samples(out / name)) == 10
    assert list(out.glob("*.tar.tmp"))

    result = make_shards(opts(out, **o))
    assert result.status == "resumed" and result.encoded == 100 - (written // 10) * 10
    assert shas(out) == shas(reference)
    assert not list(out.glob("*.tmp")) and not (out / ".progress.json").exists()


def test_parallel_workers_give_identical_shards(tmp_path: Path) -> None:
    src = npz_input(tmp_path)
    o = dict(source=SourceKind.NPZ, input=src, image_size=8, max_per_shard=16, val_fraction=0.1)
    a = make_shards(opts(tmp_path / "a", workers=1, **o)).manifest
    make_shards(opts(tmp_path / "b", workers=2, **o))
    assert shas(tmp_path / "a") == shas(tmp_path / "b")
    assert a.split("train").count == 90
    c = make_shards(opts(tmp_path / "c", workers=1, seed=9, **o)).manifest
    order = lambda root: list(all_samples(root, "train"))  # noqa: E731
    assert c.split("train").count == 90 and order(tmp_path / "c") != order(tmp_path / "a")


# --------------------------------------------------------------------------- verify


def test_verify_detects_flipped_byte_and_missing_shard(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "o"
    make_shards(opts(out, source=SourceKind.NPZ, input=npz_input(tmp_path), image_size=8, max_per_shard=25))
    assert cli(["verify", str(out)]) == 0
    assert "OK (4 shards, 100 samples)" in capsys.readouterr().out

    shard = out / "train-000001.tar"
    blob = bytearray(shard.read_bytes())
    blob[len(blob) // 2] ^= 0x01
    shard.write_bytes(bytes(blob))
    (out / "train-000002.tar").unlink()
    assert cli(["verify", str(out)]) == 1
    lines = capsys.readouterr().out.strip().splitlines()
    assert "train-000002.tar: missing" in lines
    assert any(line.startswith("train-000001.tar: sha256 mismatch") for line in lines)
    assert all(line.startswith(("train-000001.tar", "train-000002.tar")) for line in lines)


def test_verify_reports_undecodable_sample_and_bad_manifest(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "o"
    make_shards(opts(out, source=SourceKind.NPZ, input=npz_input(tmp_path, 10), image_size=8, max_per_shard=10))
    shard = out / "train-000000.tar"
    samples = shard_samples(shard)
    with tarfile.open(shard, "w") as tar:  # same members, one PNG replaced by garbage
        for key, fields in samples.items():
            for ext, data in fields.items():
                data = b"garbage" if (key, ext) == ("00000003", "png") else data
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    assert cli(["verify", str(out)]) == 1
    out_lines = capsys.readouterr().out
    assert "train-000000.tar: sample 00000003: undecodable PNG" in out_lines
    (out / "manifest.json").write_text("{not json")
    assert cli(["verify", str(out)]) == 2  # an unusable manifest is bad input, not a shard problem
    err = capsys.readouterr().err.strip()
    assert str(out / "manifest.json") in err and "invalid JSON" in err


# --------------------------------------------------------------------------- inputs with no images


def _one_error_line(capsys: pytest.CaptureFixture[str]) -> str:
    captured = capsys.readouterr()
    lines = [ln for ln in captured.err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), captured.err
    return lines[0]


def _make_args(kind: str, src: Path, out: Path, *extra: str) -> list[str]:
    return ["make", "--source", kind, "--input", str(src), "--out", str(out), "--image-size", "8", "--quiet", *extra]


def test_folder_without_images_writes_nothing(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = tmp_path / "in"
    (src / "sub").mkdir(parents=True)
    (src / "notes.txt").write_text("not an image")
    out = tmp_path / "new" / "o"  # neither it nor its parent exist yet
    assert cli(_make_args("folder", src, out)) == 2
    line = _one_error_line(capsys)
    assert str(src) in line and "no image files" in line and ".png" in line
    assert not (tmp_path / "new").exists()


def test_only_unreadable_images_is_an_error_and_leaves_no_manifest(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    src = tmp_path / "in"
    src.mkdir()
    (src / "a.png").write_bytes(b"not a png")
    (src / "b.jpg").write_bytes(os.urandom(64))
    out = tmp_path / "new" / "o"
    assert cli(_make_args("folder", src, out)) == 2
    line = _one_error_line(capsys)
    assert f"--input {src}: no readable images for the train split (2 of 2 inputs unreadable, e.g. a.png:" in line
    assert not (tmp_path / "new").exists()  # created by make, removed again with its parent

    # A directory the user already had keeps its other content; only make's own files go.
    kept = tmp_path / "kept"
    kept.mkdir()
    (kept / "README").write_text("mine")
    assert cli(_make_args("folder", src, kept)) == 2
    _one_error_line(capsys)
    assert sorted(p.name for p in kept.iterdir()) == ["README"]
    # An empty directory the user made is theirs too: it stays.
    empty = tmp_path / "empty_out"
    empty.mkdir()
    assert cli(_make_args("folder", src, empty)) == 2
    _one_error_line(capsys)
    assert empty.is_dir() and not any(empty.iterdir())


def test_empty_npz_and_all_val_split_write_nothing(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    empty = tmp_path / "empty.npz"
    np.savez(empty, images=np.zeros((0, 8, 8), np.uint8))
    out = tmp_path / "o"
    assert cli(_make_args("npz", empty, out)) == 2
    assert _one_error_line(capsys) == f"error: {empty}: no images"
    assert not out.exists()

    three = tmp_path / "three.npz"
    np.savez(three, images=np.zeros((3, 8, 8), np.uint8))
    assert cli(_make_args("npz", three, out, "--val-fraction", "0.9")) == 2  # round(3 * 0.9) = 3 to val
    assert "--val-fraction 0.9: leaves no training samples of 3 inputs" in _one_error_line(capsys)
    assert not out.exists()


def test_out_that_is_a_file_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "afile"
    out.write_text("x")
    assert cli(_make_args("npz", npz_input(tmp_path, 4), out)) == 2
    assert _one_error_line(capsys) == f"error: --out {out}: exists and is not a directory"
    assert out.read_text() == "x"


def test_verify_rejects_a_manifest_without_train_samples(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "o"
    make_shards(opts(out, source=SourceKind.NPZ, input=npz_input(tmp_path, 10), image_size=8, max_per_shard=10))
    # What `make` wrote before it refused empty inputs: a well-formed manifest listing nothing.
    data = json.loads((out / "manifest.json").read_text())
    for split in data["splits"].values():
        split.update(count=0, pattern=None, shards=[])
    (out / "manifest.json").write_text(json.dumps(data))
    (out / "train-000000.tar").unlink()
    assert cli(["verify", str(out)]) == 2
    captured = capsys.readouterr()
    assert (
        captured.err.strip() == f"error: {out / 'manifest.json'}: no train samples (re-run `python -m data_prep make`)"
    )
    assert captured.out == ""
