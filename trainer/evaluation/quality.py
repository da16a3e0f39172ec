"""Sample-quality metrics on network features: FID, sFID, IS, KID, precision/recall; reference statistics files.

Everything here is pure array math in float64 (features may arrive as float32: network outputs carry no more
precision than that, and 50k x 2048 float32 is half the memory). The feature networks that produce
:class:`Features` live in :mod:`trainer.evaluation.features`; this module knows nothing of torch.

- FID: Heusel et al. 2017, "GANs trained by a two time-scale update rule converge to a local Nash equilibrium".
- sFID: Nash et al. 2021, "Generating images with sparse representations" (FID on spatial features).
- IS: Salimans et al. 2016, "Improved techniques for training GANs".
- KID: Binkowski et al. 2018, "Demystifying MMD GANs".
- Precision/recall: Kynkäänniemi et al. 2019, "Improved precision and recall metric for assessing generative
  models" (k-NN manifolds, as in guided-diffusion's evaluator).
"""

from __future__ import annotations

import io
import json
import os
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
from scipy import linalg, special

REFERENCE_FORMAT = "iddpm-quality-reference/1"
REFERENCE_SUBSET = 10_000
"""Raw pool rows kept in a reference file: enough for precision/recall and KID, 80 MB at 2048-d float32."""

_CHUNK_ELEMENTS = 1 << 24
"""Pairwise-distance block budget (float64 elements, 128 MiB): 50k x 50k never materialises at once."""


class QualityError(ValueError):
    """A metric input or reference file that cannot be used; the message is one line naming the file/problem."""


def _one_line(exc: BaseException) -> str:
    return " ".join(f"{type(exc).__name__}: {exc}".split())


# -- features and their Gaussian statistics


@dataclass
class Features:
    """Per-image features of one image set: ``pool`` [N, D] (FID, KID, P/R), ``spatial`` [N, S] (sFID),
    ``logits`` [N, C] (IS); the last two are absent when the feature network has no such output."""

    pool: np.ndarray
    spatial: np.ndarray | None = None
    logits: np.ndarray | None = None

    def __post_init__(self) -> None:
        n = _rows(self.pool, "pool")
        for name in ("spatial", "logits"):
            arr = getattr(self, name)
            if arr is not None and _rows(arr, name) != n:
                raise QualityError(f"features: {name} has {arr.shape[0]} rows but pool has {n}")

    def __len__(self) -> int:
        return int(self.pool.shape[0])


def _rows(arr: np.ndarray, name: str) -> int:
    if not isinstance(arr, np.ndarray) or arr.ndim != 2:
        raise QualityError(f"features: {name} must be a 2-D array [N, D], got {getattr(arr, 'shape', type(arr))}")
    return int(arr.shape[0])


@dataclass
class FeatureStats:
    """Mean and covariance (ddof=1, as numpy.cov) of a feature set: the Gaussian that FID compares."""

    mean: np.ndarray
    cov: np.ndarray
    n: int

    @classmethod
    def from_features(cls, x: np.ndarray, chunk_rows: int = 4096) -> FeatureStats:
        """Two passes over row chunks in float64: the centred second moment avoids the cancellation of
        E[xx^T] - mu mu^T, and chunking avoids a float64 copy of all N x D features."""
        n = _rows(x, "features")
        if n < 2:
            raise QualityError(f"features: a covariance needs at least 2 samples, got {n}")
        mean = np.zeros(x.shape[1], dtype=np.float64)
        for i in range(0, n, chunk_rows):
            mean += x[i : i + chunk_rows].sum(axis=0, dtype=np.float64)
        mean /= n
        cov = np.zeros((x.shape[1], x.shape[1]), dtype=np.float64)
        for i in range(0, n, chunk_rows):
            c = x[i : i + chunk_rows].astype(np.float64) - mean
            cov += c.T @ c
        return cls(mean=mean, cov=cov / (n - 1), n=n)


def frechet_distance(
    mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray, eps: float = 1e-6
) -> float:
    """Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2) (Heusel et al. 2017):
    ||mu1 - mu2||^2 + Tr(sigma1 + sigma2 - 2 (sigma1 sigma2)^(1/2))."""
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != (mu1.size, mu1.size):
        raise QualityError(
            f"frechet distance: shapes do not match (mu {mu1.shape} vs {mu2.shape}, "
            f"sigma {sigma1.shape} vs {sigma2.shape})"
        )
    diff = mu1 - mu2
    covmean = _sqrtm(sigma1 @ sigma2)
    if not np.isfinite(covmean).all():
        # A singular product (fewer samples than dimensions) can defeat the Schur method; a tiny ridge on
        # both covariances is the standard remedy and moves the distance by O(sqrt(eps)) at most.
        offset = np.eye(sigma1.shape[0]) * eps
        covmean = _sqrtm((sigma1 + offset) @ (sigma2 + offset))
    if np.iscomplexobj(covmean):
        # Round-off makes tiny imaginary parts; a large one means the inputs are not covariances.
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise QualityError(
                f"frechet distance: sqrtm(sigma1 sigma2) has imaginary component {np.abs(covmean.imag).max():.3g}"
            )
        covmean = covmean.real
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * np.trace(covmean))


def _sqrtm(a: np.ndarray) -> np.ndarray:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", linalg.LinAlgWarning)  # singular products are handled by the caller
        return linalg.sqrtm(a)


def fid_from_stats(a: FeatureStats, b: FeatureStats) -> float:
    return frechet_distance(a.mean, a.cov, b.mean, b.cov)


# -- Inception Score


def inception_score(
    logits_or_probs: np.ndarray, splits: int = 10, kind: Literal["auto", "logits", "probs"] = "auto"
) -> tuple[float, float]:
    """Mean and std over ``splits`` parts of exp(E_x KL(p(y|x) || p(y))) (Salimans et al. 2016), where p(y) is
    the part's marginal. ``kind="auto"`` treats non-negative rows summing to 1 as probabilities, else logits."""
    x = np.asarray(logits_or_probs, dtype=np.float64)
    if x.ndim != 2 or x.shape[0] < splits or splits < 1:
        raise QualityError(f"inception score: need [N, C] predictions with N >= splits={splits}, got {x.shape}")
    is_probs = kind == "probs" or (
        kind == "auto" and bool((x >= 0).all()) and np.allclose(x.sum(axis=1), 1.0, rtol=0, atol=1e-6)
    )
    p = x if is_probs else special.softmax(x, axis=1)
    n = p.shape[0]
    scores = []
    for k in range(splits):
        part = p[k * n // splits : (k + 1) * n // splits]
        py = part.mean(axis=0, keepdims=True)
        # rel_entr(0, q) = 0, so classes never predicted contribute nothing (no 0 log 0 NaNs).
        kl = special.rel_entr(part, py).sum(axis=1).mean()
        scores.append(np.exp(kl))
    return float(np.mean(scores)), float(np.std(scores))


# -- Kernel Inception Distance


def _poly_kernel(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    return (x @ y.T / x.shape[1] + 1.0) ** 3


def mmd2_unbiased(x: np.ndarray, y: np.ndarray) -> float:
    """Unbiased MMD^2 estimate with the cubic polynomial kernel k(x, y) = (x.y/d + 1)^3 (Binkowski et al. 2018):
    the within-set sums leave out the diagonal k(x_i, x_i)."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    m, n = x.shape[0], y.shape[0]
    kxx, kyy, kxy = _poly_kernel(x, x), _poly_kernel(y, y), _poly_kernel(x, y)
    sxx = (kxx.sum() - np.trace(kxx)) / (m * (m - 1))
    syy = (kyy.sum() - np.trace(kyy)) / (n * (n - 1))
    return float(sxx + syy - 2.0 * kxy.mean())


def kid(
    feats_a: np.ndarray, feats_b: np.ndarray, subset_size: int = 1000, subsets: int = 100, seed: int = 0
) -> tuple[float, float]:
    """KID: mean and std of the unbiased MMD^2 over ``subsets`` random subsets of ``subset_size`` rows of each
    set, drawn without replacement (Binkowski et al. 2018). Sets smaller than ``subset_size`` use their size."""
    if feats_a.shape[1] != feats_b.shape[1]:
        raise QualityError(f"kid: feature sizes differ ({feats_a.shape[1]} vs {feats_b.shape[1]})")
    m = min(subset_size, feats_a.shape[0], feats_b.shape[0])
    if m < 2:
        raise QualityError(f"kid: need at least 2 samples per set, got {feats_a.shape[0]} and {feats_b.shape[0]}")
    rng = np.random.default_rng(seed)
    values = np.empty(subsets, dtype=np.float64)
    for s in range(subsets):
        a = feats_a[rng.choice(feats_a.shape[0], m, replace=False)]
        b = feats_b[rng.choice(feats_b.shape[0], m, replace=False)]
        values[s] = mmd2_unbiased(a, b)
    return float(values.mean()), float(values.std())


# -- Improved precision and recall


def _sq_dists(a: np.ndarray, b: np.ndarray, b_sq: np.ndarray) -> np.ndarray:
    # ||a||^2 + ||b||^2 - 2 a.b: one matmul per block; clamped because round-off can go slightly negative.
    d = (a * a).sum(axis=1, keepdims=True) + b_sq[None, :] - 2.0 * (a @ b.T)
    return np.maximum(d, 0.0, out=d)


def _chunk_rows(n_cols: int, chunk_size: int | None) -> int:
    return max(1, chunk_size if chunk_size is not None else _CHUNK_ELEMENTS // max(n_cols, 1))


def knn_radii(x: np.ndarray, k: int = 3, chunk_size: int | None = None) -> np.ndarray:
    """Squared distance from each row to its k-th nearest neighbour in the same set, itself excluded: in a row's
    sorted distances index 0 is the point itself (distance 0), so the k-th neighbour sits at index k."""
    x = np.asarray(x, np.float64)
    if not 1 <= k < x.shape[0]:
        raise QualityError(f"precision/recall: k={k} needs more than k samples, got {x.shape[0]}")
    x_sq = (x * x).sum(axis=1)
    radii = np.empty(x.shape[0], dtype=np.float64)
    step = _chunk_rows(x.shape[0], chunk_size)
    for i in range(0, x.shape[0], step):
        d = _sq_dists(x[i : i + step], x, x_sq)
        radii[i : i + step] = np.partition(d, k, axis=1)[:, k]
    return radii


def manifold_coverage(
    points: np.ndarray, manifold: np.ndarray, radii: np.ndarray, chunk_size: int | None = None
) -> np.ndarray:
    """For each row of ``points``: is it within the k-NN ball (squared radius ``radii[i]``) of some manifold
    row i? The union of those balls is the manifold estimate of Kynkäänniemi et al. 2019."""
    points, manifold = np.asarray(points, np.float64), np.asarray(manifold, np.float64)
    m_sq = (manifold * manifold).sum(axis=1)
    inside = np.empty(points.shape[0], dtype=bool)
    step = _chunk_rows(manifold.shape[0], chunk_size)
    for i in range(0, points.shape[0], step):
        inside[i : i + step] = (_sq_dists(points[i : i + step], manifold, m_sq) <= radii[None, :]).any(axis=1)
    return inside


def precision_recall(
    real: np.ndarray, fake: np.ndarray, k: int = 3, chunk_size: int | None = None
) -> tuple[float, float]:
    """Improved precision (fraction of fake samples inside the real manifold) and recall (fraction of real
    samples inside the fake manifold), Kynkäänniemi et al. 2019. ``chunk_size`` rows of distances at a time."""
    if real.shape[1] != fake.shape[1]:
        raise QualityError(f"precision/recall: feature sizes differ ({real.shape[1]} vs {fake.shape[1]})")
    real_r, fake_r = knn_radii(real, k, chunk_size), knn_radii(fake, k, chunk_size)
    precision = manifold_coverage(fake, real, real_r, chunk_size).mean()
    recall = manifold_coverage(real, fake, fake_r, chunk_size).mean()
    return float(precision), float(recall)


# -- reference statistics files


@dataclass
class Reference:
    """What a reference file holds: Gaussian statistics of the full set and a random subset of raw pool rows."""

    pool: FeatureStats
    spatial: FeatureStats | None
    pool_subset: np.ndarray | None
    """Raw pool rows for precision/recall and KID; None for a statistics-only reference (EDM's fid-refs), which
    then gives FID (and sFID) only. Filled from the images of a guided-diffusion batch by the caller."""


def _subset(x: np.ndarray, limit: int, seed: int) -> np.ndarray:
    # Random rather than the first rows: image sets are often stored sorted by class.
    if x.shape[0] <= limit:
        return x
    idx = np.sort(np.random.default_rng(seed).choice(x.shape[0], limit, replace=False))
    return x[idx]


def reference_from_features(feats: Features, subset: int = REFERENCE_SUBSET, seed: int = 0) -> Reference:
    spatial = FeatureStats.from_features(feats.spatial) if feats.spatial is not None else None
    return Reference(FeatureStats.from_features(feats.pool), spatial, _subset(feats.pool, subset, seed))


def save_reference(
    path: str | os.PathLike, feats: Features | Reference, meta: dict[str, Any], subset: int = REFERENCE_SUBSET
) -> Path:
    """Write ``.npz`` reference statistics atomically. ``meta`` must name the feature network
    (``feature_net``: its ``name``); the image count is added; it is stored as a JSON string so the file loads
    with ``allow_pickle=False``."""
    if not isinstance(meta.get("feature_net"), str):
        raise QualityError("reference: meta must hold the feature network id as meta['feature_net']")
    ref = feats if isinstance(feats, Reference) else reference_from_features(feats, subset)
    meta = {**meta, "format": REFERENCE_FORMAT, "count": int(ref.pool.n)}
    arrays: dict[str, np.ndarray] = {
        "meta": np.array(json.dumps(meta, sort_keys=True)),
        "pool_mean": ref.pool.mean,
        "pool_cov": ref.pool.cov,
        "pool_n": np.array(ref.pool.n, dtype=np.int64),
        "pool_subset": np.ascontiguousarray(ref.pool_subset, dtype=np.float32),
    }
    if ref.spatial is not None:
        arrays.update(spatial_mean=ref.spatial.mean, spatial_cov=ref.spatial.cov)
        arrays["spatial_n"] = np.array(ref.spatial.n, dtype=np.int64)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:  # a file object: np.savez would otherwise append ".npz" to the name
            np.savez(f, **arrays)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


EXTERNAL_FEATURE_NET = (
    "the TensorFlow FID Inception-v3 (pool_3, 2048-d; sFID: the first 7 channels of mixed_6/conv), i.e. "
    "--features inception with the official pt_inception-2015-12-05 weights"
)
"""What the reference batches of guided-diffusion's evaluator and EDM's fid-refs were computed with."""

OFFICIAL_INCEPTION = "inception-v3-fid:6726825d"
"""The ``name`` of :class:`trainer.evaluation.features.InceptionV3FID` with the official weights file."""


def _external_reference(path: Path, arrays: dict[str, np.ndarray]) -> tuple[Reference, dict]:
    """A reference batch of guided-diffusion's evaluator (``mu``, ``sigma``, ``mu_s``, ``sigma_s`` and the images
    ``arr_0``) or EDM's fid-refs (``mu``, ``sigma``). They record no network: they assume
    :data:`EXTERNAL_FEATURE_NET`. The images, when present, are returned in ``meta["images"]`` for the caller to
    compute precision/recall rows with the network in use."""
    mu, sigma = np.asarray(arrays["mu"], np.float64), np.asarray(arrays["sigma"], np.float64)
    if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
        raise QualityError(f"reference {path}: inconsistent shapes (mu {mu.shape}, sigma {sigma.shape})")
    images = arrays.get("arr_0")
    if images is not None and (images.dtype != np.uint8 or images.ndim != 4):
        raise QualityError(f"reference {path}: arr_0 must be uint8 NHWC images, got {images.dtype} {images.shape}")
    n = int(images.shape[0]) if images is not None else 0
    spatial = None
    if "mu_s" in arrays and "sigma_s" in arrays:
        spatial = FeatureStats(np.asarray(arrays["mu_s"], np.float64), np.asarray(arrays["sigma_s"], np.float64), n)
    guided = images is not None or spatial is not None
    meta: dict[str, Any] = {
        "format": "guided-diffusion" if guided else "edm-fid-refs",
        "feature_net": None,
        "assumes": EXTERNAL_FEATURE_NET,
        "count": n or None,
        "images": images,
    }
    if images is not None:
        meta.update(image_size=int(images.shape[1]), channels=int(images.shape[3]))
    return Reference(FeatureStats(mu, sigma, n), spatial, None), meta


def load_reference(path: str | os.PathLike, expect_feature_net: str | None = None) -> tuple[Reference, dict]:
    """Read a file written by :func:`save_reference`, or a reference batch of guided-diffusion's evaluator or
    EDM's fid-refs (:func:`_external_reference`; ``meta["format"]`` says which). With ``expect_feature_net`` (the
    ``name`` of the network in use), a reference of ours computed with another network is refused: its statistics
    are not comparable. The external ones record no network; the caller states what they assume."""
    path = Path(path)
    if not path.is_file():
        raise QualityError(f"reference {path}: no such file")
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
        if "meta" not in arrays and "mu" in arrays and "sigma" in arrays:
            return _external_reference(path, arrays)
        meta = json.loads(str(arrays["meta"]))
        stats = {}
        for name in ("pool", "spatial"):
            if f"{name}_mean" in arrays:
                stats[name] = FeatureStats(arrays[f"{name}_mean"], arrays[f"{name}_cov"], int(arrays[f"{name}_n"]))
        ref = Reference(stats["pool"], stats.get("spatial"), arrays["pool_subset"])
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile, io.UnsupportedOperation) as e:
        raise QualityError(f"reference {path}: not a readable reference .npz ({_one_line(e)})") from e
    fmt = meta.get("format") if isinstance(meta, dict) else None
    if fmt != REFERENCE_FORMAT:
        raise QualityError(f"reference {path}: unknown format {fmt!r} (expected {REFERENCE_FORMAT!r})")
    d = ref.pool.mean.shape[0]
    if ref.pool.cov.shape != (d, d) or ref.pool_subset.ndim != 2 or ref.pool_subset.shape[1] != d:
        raise QualityError(f"reference {path}: inconsistent shapes (mean {d}, cov {ref.pool.cov.shape})")
    if expect_feature_net is not None:
        check_feature_net(meta, expect_feature_net, path)
    return ref, meta


def check_feature_net(meta: dict, feature_net: str, path: str | os.PathLike) -> None:
    if meta.get("feature_net") != feature_net:
        raise QualityError(
            f"reference {path}: computed with feature network {meta.get('feature_net')!r}, not {feature_net!r} "
            "in use; recompute the reference with the same network"
        )


# -- everything at once


def compute_all(
    real: Features | Reference,
    fake: Features,
    *,
    k: int = 3,
    pr_samples: int = REFERENCE_SUBSET,
    kid_subset_size: int = 1000,
    kid_subsets: int = 100,
    is_splits: int = 10,
    seed: int = 0,
    chunk_size: int | None = None,
) -> dict[str, float]:
    """fid, sfid (both sets have spatial features), is/is_std (the fake set has logits: IS scores generated
    images only), precision, recall, kid_mean, kid_std. FID/sFID use every row; precision/recall compare at most
    ``pr_samples`` random rows of each set, the same number from both (the k-NN radii shrink with set size, so
    unequal sizes would bias recall against precision); KID uses those rows too."""
    ref = real if isinstance(real, Reference) else reference_from_features(real, subset=pr_samples, seed=seed)
    if ref.pool.mean.shape[0] != fake.pool.shape[1]:
        raise QualityError(f"features: pool sizes differ (real {ref.pool.mean.shape[0]}, fake {fake.pool.shape[1]})")
    out = {"fid": fid_from_stats(ref.pool, FeatureStats.from_features(fake.pool))}
    if ref.spatial is not None and fake.spatial is not None:
        out["sfid"] = fid_from_stats(ref.spatial, FeatureStats.from_features(fake.spatial))
    if fake.logits is not None:
        out["is"], out["is_std"] = inception_score(fake.logits, splits=min(is_splits, len(fake)))
    if ref.pool_subset is None:  # statistics only (EDM's fid-refs): no rows to compare one by one
        return out
    n = min(pr_samples, ref.pool_subset.shape[0], len(fake))
    real_rows = _subset(ref.pool_subset, n, seed)
    fake_rows = _subset(fake.pool, n, seed + 1)
    out["precision"], out["recall"] = precision_recall(real_rows, fake_rows, k=k, chunk_size=chunk_size)
    out["kid_mean"], out["kid_std"] = kid(real_rows, fake_rows, kid_subset_size, kid_subsets, seed)
    return out
