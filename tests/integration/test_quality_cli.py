"""``evaluate.py stats`` and ``evaluate.py quality`` end to end on the digits shards, with a feature network
the test trains (the Inception weights cannot be downloaded here)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.conftest import run_cmd

pytestmark = pytest.mark.slow

EVALUATE = [sys.executable, "trainer/evaluate.py"]


@pytest.fixture(scope="module")
def classifier(digits_shards: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from trainer.data import load_manifest
    from trainer.evaluation.features import train_classifier
    from trainer.evaluation.scoring import read_split_uint8

    images = read_split_uint8(str(digits_shards), "train", None, 256)
    labels = _labels(digits_shards, len(images))
    net = train_classifier(images, labels, load_manifest(str(digits_shards)).num_classes, epochs=3, seed=0)
    path = tmp_path_factory.mktemp("features") / "digits_classifier.pt"
    net.save(path)
    return path


def _labels(root: Path, n: int) -> np.ndarray:
    from trainer.config import DataConfig
    from trainer.data import load_manifest, read_ranges

    cfg = DataConfig(root=str(root), batch_size=256, num_workers=0, pin_memory=False, random_flip=False)
    out = np.zeros(n, dtype=np.int64)
    for _, y, pos in read_ranges(cfg, load_manifest(str(root)), "train", [(0, n)]):
        out[pos.numpy()] = y.numpy()
    return out


def ok(proc: subprocess.CompletedProcess[str]) -> subprocess.CompletedProcess[str]:
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    return proc


def test_stats_then_quality(digits_shards: Path, classifier: Path, tmp_path: Path) -> None:
    from trainer.evaluation.scoring import read_split_uint8

    ref = tmp_path / "ref.npz"
    ok(run_cmd([*EVALUATE, "stats", "--data", str(digits_shards), "--features", str(classifier), "--out", str(ref)]))
    # Held-out real digits against the train reference: near the real distribution. Uniform noise: far.
    val = read_split_uint8(str(digits_shards), "val", None, 256)
    rng = np.random.default_rng(0)
    sets = {"real": val, "noise": rng.integers(0, 256, size=val.shape, dtype=np.uint8)}
    reports = {}
    for name, images in sets.items():
        d = tmp_path / name
        d.mkdir()
        np.savez(d / "samples.npz", arr_0=images)
        ok(run_cmd([*EVALUATE, "quality", str(d), "--ref", str(ref), "--features", str(classifier)]))
        reports[name] = json.loads((d / "quality.json").read_text())
    real, noise = reports["real"], reports["noise"]
    assert real["num_samples"] == len(val)
    assert real["fid"] < noise["fid"] / 10
    assert real["precision"] > 0.5 and noise["precision"] < 0.1
    assert real["is"] > noise["is"]
    assert set(real) >= {"fid", "sfid", "is", "precision", "recall", "kid_mean", "kid_std"}


def test_reference_from_another_network_is_refused(digits_shards: Path, classifier: Path, tmp_path: Path) -> None:
    ref = tmp_path / "ref.npz"
    cmd = [*EVALUATE, "stats", "--data", str(digits_shards), "--max-images", "200", "--features", str(classifier)]
    ok(run_cmd([*cmd, "--out", str(ref)]))
    from trainer.evaluation.features import ClassifierFeatures

    other = ClassifierFeatures.load(classifier)
    with torch.no_grad():
        for p in other.parameters():
            p.mul_(1.5)
    other_path = other.save(tmp_path / "other.pt")
    (tmp_path / "s").mkdir()
    np.savez(tmp_path / "s" / "samples.npz", arr_0=np.zeros((8, 16, 16, 1), dtype=np.uint8))
    proc = run_cmd([*EVALUATE, "quality", str(tmp_path / "s"), "--ref", str(ref), "--features", str(other_path)])
    assert proc.returncode == 2
    line = proc.stderr.strip().splitlines()[-1]
    assert line.startswith("error: ") and str(ref) in line and "feature" in line
    assert not (tmp_path / "s" / "quality.json").exists()


def test_missing_inception_weights_say_how_to_get_them(digits_shards: Path, tmp_path: Path) -> None:
    cmd = [*EVALUATE, "stats", "--data", str(digits_shards), "--out", str(tmp_path / "ref.npz")]
    proc = run_cmd(cmd, TORCH_HOME=str(tmp_path / "torch_home"))
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len([ln for ln in lines if ln.startswith("error:")]) == 1
    assert "pt_inception-2015-12-05-6726825d.pth" in lines[-1] and "https://" in lines[-1]
    assert not (tmp_path / "ref.npz").exists()
