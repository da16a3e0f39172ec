"""Import -> sample on 2 ranks -> ``evaluate.py quality`` against a reference batch in guided-diffusion's layout
(``mu``, ``sigma``, ``mu_s``, ``sigma_s``, ``arr_0``) and one in EDM's fid-refs layout (``mu``, ``sigma``).

The FID Inception's official weights cannot be downloaded here: the network is the same Inception-v3 with seeded
random weights saved as a file (``--features inception:FILE``), and the reference statistics are computed with it
in the test. The FID reported is checked against a float64 derivation here (tr√(Σ₁Σ₂) from eigenvalues).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.conftest import REPO, run_cmd
from tests.integration.test_distributed_inference import launch, ok, sample_args
from tests.ref.iddpm_weights import redraw
from trainer.convert import from_iddpm

pytestmark = pytest.mark.slow

CASE = REPO / "tests" / "ref" / "iddpm" / "a_learned_cosine_rescaled.json"


def _fid(mu1: np.ndarray, s1: np.ndarray, mu2: np.ndarray, s2: np.ndarray) -> float:
    eig = np.linalg.eigvals(s1 @ s2).real.clip(min=0.0)
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2.0 * np.sqrt(eig).sum())


def test_import_sample_two_ranks_quality_against_external_references(tmp_path: Path) -> None:
    from trainer.evaluation.features import InceptionV3FID

    meta = json.loads(CASE.read_text())
    ckpt = tmp_path / "iddpm.pt"
    torch.save(redraw([(n, s) for n, s in meta["param_shapes"]], meta["weights_seed"]), ckpt)
    flags = " ".join(f"--{k} {v}" for k, v in meta["kwargs"].items() if k != "timestep_respacing")
    from_iddpm(str(ckpt), flags, str(tmp_path / "run"))

    samples = tmp_path / "samples"
    ok(run_cmd(launch("trainer/sample.py", sample_args(tmp_path / "run", samples, n=8, steps="ddim5"), 2)))
    with np.load(samples / "samples.npz", allow_pickle=False) as z:  # what guided-diffusion's evaluator reads
        images = z["arr_0"]
    assert images.dtype == np.uint8 and images.shape == (8, 32, 32, 3)

    torch.manual_seed(0)
    net = InceptionV3FID(pretrained=False)
    weights = tmp_path / "inception_random.pth"
    torch.save(net.state_dict(), weights)
    rng = np.random.default_rng(1)
    ref_images = rng.integers(0, 256, size=(12, 32, 32, 3), dtype=np.uint8)
    ref_feats = net.extract(ref_images, batch_size=12)
    fake_feats = net.extract(images, batch_size=8)
    # A well-conditioned reference Gaussian (12 images cannot give a full-rank 2048-d covariance).
    d = ref_feats.pool.shape[1]
    mu = ref_feats.pool.mean(0).astype(np.float64)
    sigma = np.cov(ref_feats.pool.astype(np.float64), rowvar=False) + 0.01 * np.eye(d)
    mu_s = ref_feats.spatial.mean(0).astype(np.float64)
    sigma_s = np.cov(ref_feats.spatial.astype(np.float64), rowvar=False) + 0.01 * np.eye(mu_s.shape[0])
    guided = tmp_path / "VIRTUAL_tiny_labeled.npz"
    np.savez(guided, arr_0=ref_images, mu=mu, sigma=sigma, mu_s=mu_s, sigma_s=sigma_s)
    edm = tmp_path / "edm_refs.npz"
    np.savez(edm, mu=mu, sigma=sigma)

    evaluate = [sys.executable, "trainer/evaluate.py", "quality", str(samples), "--features", f"inception:{weights}"]
    proc = ok(run_cmd([*evaluate, "--ref", str(guided), "--no-mlflow", "--out", str(tmp_path / "g.json")]))
    assert "guided-diffusion statistics, computed with the TensorFlow FID Inception-v3" in proc.stdout
    assert "not the official weights" in proc.stdout
    report = json.loads((tmp_path / "g.json").read_text())
    assert report["reference_format"] == "guided-diffusion" and report["reference"] == str(guided.resolve())
    assert {"fid", "sfid", "precision", "recall", "kid_mean"} <= set(report)
    fake = fake_feats.pool.astype(np.float64)
    want = _fid(fake.mean(0), np.cov(fake, rowvar=False), mu, sigma)
    assert report["fid"] == pytest.approx(want, rel=1e-3)
    spat = fake_feats.spatial.astype(np.float64)
    assert report["sfid"] == pytest.approx(_fid(spat.mean(0), np.cov(spat, rowvar=False), mu_s, sigma_s), rel=1e-3)

    proc = ok(run_cmd([*evaluate, "--ref", str(edm), "--no-mlflow", "--out", str(tmp_path / "e.json")]))
    assert "edm-fid-refs statistics" in proc.stdout
    report = json.loads((tmp_path / "e.json").read_text())
    assert report["reference_format"] == "edm-fid-refs"
    assert report["fid"] == pytest.approx(want, rel=1e-3) and "precision" not in report
