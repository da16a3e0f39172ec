"""Sample-quality statistics against independent float64 NumPy/SciPy computations on known data."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest
from scipy.spatial.distance import cdist

from trainer.evaluation import quality
from trainer.evaluation.quality import (
    Features,
    FeatureStats,
    QualityError,
    compute_all,
    frechet_distance,
    inception_score,
    kid,
    load_reference,
    mmd2_unbiased,
    precision_recall,
    save_reference,
)


def _rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


def _one_line(e: pytest.ExceptionInfo) -> str:
    msg = str(e.value)
    assert "\n" not in msg
    return msg


# -- Fréchet distance


def test_frechet_diagonal_closed_form() -> None:
    r = _rng()
    mu1, mu2 = r.normal(size=6), r.normal(size=6)
    a, b = r.uniform(0.1, 3.0, 6), r.uniform(0.1, 3.0, 6)
    want = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    assert frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(want, rel=1e-10)


def test_frechet_commuting_covariances_closed_form() -> None:
    # S1 = Q diag(a) Q^T and S2 = Q diag(b) Q^T commute, so sqrt(S1 S2) = Q diag(sqrt(ab)) Q^T.
    r = _rng(1)
    q, _ = np.linalg.qr(r.normal(size=(8, 8)))
    a, b = r.uniform(0.1, 2.0, 8), r.uniform(0.1, 2.0, 8)
    mu1, mu2 = r.normal(size=8), r.normal(size=8)
    want = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    got = frechet_distance(mu1, q @ np.diag(a) @ q.T, mu2, q @ np.diag(b) @ q.T)
    assert got == pytest.approx(want, rel=1e-9)


def test_fid_of_a_set_with_itself_is_zero() -> None:
    x = _rng(2).normal(size=(400, 16)) @ _rng(3).normal(size=(16, 16))
    s = FeatureStats.from_features(x)
    assert abs(frechet_distance(s.mean, s.cov, s.mean, s.cov)) < 1e-8


def test_feature_stats_match_numpy_and_are_chunk_invariant() -> None:
    x = _rng(4).normal(3.0, 2.0, size=(101, 5)).astype(np.float32)
    s = FeatureStats.from_features(x, chunk_rows=7)
    np.testing.assert_allclose(s.mean, x.astype(np.float64).mean(0), rtol=1e-12)
    np.testing.assert_allclose(s.cov, np.cov(x.astype(np.float64), rowvar=False), rtol=1e-10)
    assert s.n == 101 and s.cov.dtype == np.float64


def test_frechet_singular_product_retries_with_ridge(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    real_sqrtm = quality._sqrtm

    def flaky(a: np.ndarray) -> np.ndarray:
        calls.append(a)
        return np.full_like(a, np.nan) if len(calls) == 1 else real_sqrtm(a)

    monkeypatch.setattr(quality, "_sqrtm", flaky)
    a, b = np.array([1.0, 4.0]), np.array([9.0, 0.0])
    got = frechet_distance(np.zeros(2), np.diag(a), np.zeros(2), np.diag(b), eps=1e-6)
    assert len(calls) == 2  # the ridge retry ran
    assert got == pytest.approx(np.sum((np.sqrt(a) - np.sqrt(b)) ** 2), abs=1e-2)


def test_frechet_on_rank_deficient_covariances_is_finite() -> None:
    x, y = _rng(5).normal(size=(10, 32)), _rng(6).normal(size=(10, 32))  # fewer samples than dimensions
    sx, sy = FeatureStats.from_features(x), FeatureStats.from_features(y)
    assert np.isfinite(frechet_distance(sx.mean, sx.cov, sy.mean, sy.cov))


# -- Inception Score


def _is_bruteforce(p: np.ndarray, splits: int) -> tuple[float, float]:
    scores = []
    for part in np.array_split(p, splits):
        py = part.mean(0)
        kl = [sum(pi * np.log(pi / qi) for pi, qi in zip(row, py, strict=True) if pi > 0) for row in part]
        scores.append(np.exp(np.mean(kl)))
    return float(np.mean(scores)), float(np.std(scores))


def test_is_confident_uniform_predictions_equals_number_of_classes() -> None:
    classes = 7
    probs = np.tile(np.eye(classes), (10 * 3, 1))  # every split holds each class 3 times
    mean, std = inception_score(probs, splits=10)
    assert mean == pytest.approx(classes, rel=1e-12) and std == pytest.approx(0.0, abs=1e-12)


def test_is_identical_predictions_is_one() -> None:
    probs = np.tile(_rng(7).dirichlet(np.ones(5)), (50, 1))
    assert inception_score(probs, splits=5)[0] == pytest.approx(1.0, abs=1e-12)


def test_is_matches_bruteforce_from_logits_and_probs() -> None:
    logits = _rng(8).normal(0, 3, size=(60, 6))
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    want = _is_bruteforce(p, 4)
    np.testing.assert_allclose(inception_score(logits, splits=4), want, rtol=1e-10)
    np.testing.assert_allclose(inception_score(p, splits=4), want, rtol=1e-10)
    np.testing.assert_allclose(inception_score(p, splits=4, kind="probs"), want, rtol=1e-10)


# -- KID


def _mmd2_bruteforce(x: np.ndarray, y: np.ndarray) -> float:
    d = x.shape[1]
    k = lambda a, b: (np.dot(a, b) / d + 1.0) ** 3  # noqa: E731
    m, n = len(x), len(y)
    sxx = sum(k(x[i], x[j]) for i, j in itertools.permutations(range(m), 2)) / (m * (m - 1))
    syy = sum(k(y[i], y[j]) for i, j in itertools.permutations(range(n), 2)) / (n * (n - 1))
    sxy = sum(k(x[i], y[j]) for i in range(m) for j in range(n)) / (m * n)
    return sxx + syy - 2 * sxy


def test_mmd_matches_bruteforce() -> None:
    x, y = _rng(9).normal(size=(12, 4)), _rng(10).normal(0.5, 1.0, size=(12, 4))
    assert mmd2_unbiased(x, y) == pytest.approx(_mmd2_bruteforce(x, y), rel=1e-10)


def test_kid_full_subsets_equal_bruteforce() -> None:
    # Subsets of the whole set are permutations, which leave the MMD estimate unchanged.
    x, y = _rng(11).normal(size=(15, 3)), _rng(12).normal(1.0, 1.0, size=(15, 3))
    mean, std = kid(x, y, subset_size=15, subsets=4, seed=0)
    assert mean == pytest.approx(_mmd2_bruteforce(x, y), rel=1e-10) and std == pytest.approx(0.0, abs=1e-12)


def test_kid_near_zero_for_same_distribution() -> None:
    r = _rng(13)
    a, b = r.normal(size=(600, 8)), r.normal(size=(600, 8))
    same, _ = kid(a, b, subset_size=200, subsets=20, seed=1)
    shifted, _ = kid(a, b + 0.5, subset_size=200, subsets=20, seed=1)
    assert abs(same) < 0.02 * shifted and shifted > 0


# -- precision / recall


def _pr_bruteforce(real: np.ndarray, fake: np.ndarray, k: int) -> tuple[float, float]:
    def radii(x: np.ndarray) -> np.ndarray:
        d = cdist(x, x)
        return np.array([np.sort(np.delete(d[i], i))[k - 1] for i in range(len(x))])

    rr, rf = radii(real), radii(fake)
    d = cdist(fake, real)  # [fake, real]
    precision = np.mean([(d[j] <= rr).any() for j in range(len(fake))])
    recall = np.mean([(d[:, i] <= rf).any() for i in range(len(real))])
    return float(precision), float(recall)


def test_precision_recall_identical_sets() -> None:
    x = _rng(14).normal(size=(50, 5))
    assert precision_recall(x, x.copy(), k=3) == (1.0, 1.0)


def test_precision_recall_hand_built_1d() -> None:
    # k=1. Real radii: 1,1,1,1 and 3 (6 -> 3); fake radii: 2 (0.5 -> 2.5), 2, 1, 1.
    # Fake 0.5, 2.5 lie in real balls; 10 (4 from 6 > 3) and 11 do not: precision 2/4.
    # Real 0..3 lie within 2 of 0.5 or 2.5; 6 is 3.5 from 2.5 (> 2) and 4 from 10 (> 1): recall 4/5.
    real = np.array([[0.0], [1.0], [2.0], [3.0], [6.0]])
    fake = np.array([[0.5], [2.5], [10.0], [11.0]])
    assert precision_recall(real, fake, k=1) == (0.5, 0.8)
    assert _pr_bruteforce(real, fake, 1) == (0.5, 0.8)


def test_precision_recall_matches_bruteforce_2d_and_chunking() -> None:
    r = _rng(15)
    real, fake = r.normal(size=(80, 2)), r.normal(0.7, 1.3, size=(60, 2))
    want = _pr_bruteforce(real, fake, 3)
    assert precision_recall(real, fake, k=3) == pytest.approx(want)
    assert 0 < want[0] < 1 and 0 < want[1] < 1
    assert precision_recall(real, fake, k=3, chunk_size=7) == precision_recall(real, fake, k=3, chunk_size=10_000)
    np.testing.assert_array_equal(quality.knn_radii(real, 3, chunk_size=3), quality.knn_radii(real, 3))


# -- compute_all and reference files


def _features(seed: int, n: int = 300, shift: float = 0.0) -> Features:
    r = _rng(seed)
    return Features(
        pool=r.normal(shift, 1.0, size=(n, 12)).astype(np.float32),
        spatial=r.normal(shift, 1.0, size=(n, 9)).astype(np.float32),
        logits=r.normal(0, 2.0, size=(n, 10)).astype(np.float32),
    )


def test_compute_all_keys_and_values() -> None:
    real, fake = _features(16), _features(17, shift=0.3)
    out = compute_all(real, fake, kid_subset_size=100, kid_subsets=5)
    assert set(out) == {"fid", "sfid", "is", "is_std", "precision", "recall", "kid_mean", "kid_std"}
    want_fid = frechet_distance(
        real.pool.astype(np.float64).mean(0),
        np.cov(real.pool.astype(np.float64), rowvar=False),
        fake.pool.astype(np.float64).mean(0),
        np.cov(fake.pool.astype(np.float64), rowvar=False),
    )
    assert out["fid"] == pytest.approx(want_fid, rel=1e-9)
    assert out["is"] == pytest.approx(inception_score(fake.logits)[0])
    assert (out["precision"], out["recall"]) == pytest.approx(_pr_bruteforce(real.pool, fake.pool, 3))
    bare = compute_all(Features(real.pool), Features(fake.pool), kid_subset_size=100, kid_subsets=2)
    assert "sfid" not in bare and "is" not in bare and bare["fid"] == pytest.approx(out["fid"])


def test_reference_round_trip(tmp_path) -> None:
    real, fake = _features(18), _features(19, shift=0.2)
    meta = {"feature_net": "classifier:abc123", "image_size": 8}
    path = save_reference(tmp_path / "ref.npz", real, meta)
    ref, got_meta = load_reference(path, expect_feature_net="classifier:abc123")
    assert got_meta["feature_net"] == "classifier:abc123" and got_meta["count"] == 300 and got_meta["image_size"] == 8
    np.testing.assert_allclose(ref.pool.mean, real.pool.astype(np.float64).mean(0), rtol=1e-12)
    np.testing.assert_allclose(ref.spatial.cov, np.cov(real.spatial.astype(np.float64), rowvar=False), rtol=1e-10)
    kw = {"kid_subset_size": 100, "kid_subsets": 3}
    assert compute_all(ref, fake, **kw) == pytest.approx(compute_all(real, fake, **kw))
    assert not list(tmp_path.glob(".*tmp*"))  # the atomic write left nothing behind


def test_reference_keeps_a_bounded_subset(tmp_path) -> None:
    path = save_reference(tmp_path / "ref.npz", _features(20, n=250), {"feature_net": "x"}, subset=100)
    ref, meta = load_reference(path)
    assert ref.pool_subset.shape == (100, 12) and ref.pool.n == 250 and meta["count"] == 250


def test_reference_errors_are_one_line(tmp_path) -> None:
    with pytest.raises(QualityError) as e:
        load_reference(tmp_path / "missing.npz")
    assert "missing.npz" in _one_line(e) and "no such file" in str(e.value)

    corrupt = tmp_path / "corrupt.npz"
    corrupt.write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(QualityError) as e:
        load_reference(corrupt)
    assert "corrupt.npz" in _one_line(e)

    other = tmp_path / "other.npz"
    np.savez(other, x=np.zeros(3))
    with pytest.raises(QualityError) as e:
        load_reference(other)
    assert "other.npz" in _one_line(e)

    path = save_reference(tmp_path / "ref.npz", _features(21, n=20), {"feature_net": "inception-v3-fid:6726825d"})
    with pytest.raises(QualityError) as e:
        load_reference(path, expect_feature_net="classifier:0123456789ab")
    msg = _one_line(e)
    assert "ref.npz" in msg and "inception-v3-fid:6726825d" in msg and "classifier:0123456789ab" in msg
    assert json.loads(str(np.load(path, allow_pickle=False)["meta"]))["feature_net"] == "inception-v3-fid:6726825d"

    with pytest.raises(QualityError):
        save_reference(tmp_path / "nometa.npz", _features(22, n=20), {})
    assert issubclass(QualityError, ValueError)


def test_missing_inception_weights_error_is_one_line(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    from trainer.evaluation.features import INCEPTION_URL, InceptionV3FID

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    monkeypatch.setattr(torch.hub, "_hub_dir", None)  # no set_dir() override: the env var decides
    with pytest.raises(QualityError) as e:
        InceptionV3FID()
    msg = _one_line(e)
    expected = tmp_path / "torch_home" / "hub" / "checkpoints" / "pt_inception-2015-12-05-6726825d.pth"
    assert str(expected) in msg and INCEPTION_URL in msg and "--features" in msg

    with pytest.raises(QualityError) as e:
        InceptionV3FID(tmp_path / "elsewhere.pth")
    assert str(tmp_path / "elsewhere.pth") in _one_line(e) and INCEPTION_URL in str(e.value)
