"""Paired comparisons between arms of the experiment suite: the difference of two arms' bits/dim with a 95 %
interval over images and seeds.

Every arm is evaluated on the same validation images with the same noise (``trainer/evaluate.py bpd``,
noise seed fixed), so the per-image values of two arms of one seed are paired: d_{s,i} = a_{s,i} - b_{s,i}
removes what the images have in common, which is most of the spread. The interval is a two-level
(hierarchical) percentile bootstrap: resample the seeds, then the images (the same resampled images for
every seed: images are shared across seeds), and take the mean of d. Seed-to-seed variation thus widens the
interval as it should; with one seed it is the image-level bootstrap of a paired mean. A verdict is given
only where the interval excludes zero.

FID has no per-image decomposition, but sample sets drawn with the same sampler seed are paired too: sample i
of every model starts from the same noise. :func:`paired_statistic` bootstraps any statistic of several sets'
FIDs the same way (seeds, then sample indices shared by every set), recomputing each FID on the resampled
rows (:class:`FastFID`: one symmetric eigendecomposition per FID instead of a general matrix square root).
Resampling with replacement repeats rows, which shrinks covariances and biases each FID upward by a similar
amount in every set; differences and ratios between sets, what the verdicts use, largely cancel it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

LEVEL = 0.95
RESAMPLES = 20_000


def paired_difference(
    a: dict[int, list[float]],
    b: dict[int, list[float]],
    level: float = LEVEL,
    resamples: int = RESAMPLES,
    seed: int = 0,
) -> dict[str, Any] | None:
    """Mean of a - b over the seeds both have (per image, paired) and its bootstrap interval; None when no
    seed has per-image values in both arms. Raises ValueError when one seed's image counts differ."""
    seeds = sorted(s for s in a if s in b and a[s] is not None and b[s] is not None)
    if not seeds:
        return None
    d = []
    for s in seeds:
        x, y = np.asarray(a[s], np.float64), np.asarray(b[s], np.float64)
        if x.shape != y.shape:
            raise ValueError(f"seed {s}: {x.size} vs {y.size} per-image values: not the same images")
        d.append(x - y)
    diff = np.stack(d)  # [seeds, images]
    n_seeds, n_images = diff.shape
    rng = np.random.default_rng(seed)
    means = np.empty(resamples)
    chunk = max(1, 2_000_000 // (n_seeds * n_images))  # bounded memory per vectorised batch of resamples
    for start in range(0, resamples, chunk):
        k = min(chunk, resamples - start)
        rows = rng.integers(0, n_seeds, (k, n_seeds))
        cols = rng.integers(0, n_images, (k, n_images))
        means[start : start + k] = diff[rows[:, :, None], cols[:, None, :]].mean(axis=(1, 2))
    lo, hi = np.quantile(means, [(1 - level) / 2, (1 + level) / 2])
    return {
        "mean": float(diff.mean()),
        "low": float(lo),
        "high": float(hi),
        "level": level,
        "seeds": n_seeds,
        "images": n_images,
        "method": f"two-level percentile bootstrap over seeds and images, {resamples} resamples",
    }


class FastFID:
    """FID of feature sets against one fixed reference N(mean, cov), for many resamples. With R = cov^(1/2)
    (symmetric), Tr((Σ cov)^(1/2)) = Σ_j sqrt(λ_j(R Σ R)): R Σ R is symmetric PSD and similar to Σ cov, so an
    eigvalsh replaces sqrtm (the same distance as trainer.evaluation.quality.frechet_distance)."""

    def __init__(self, mean: np.ndarray, cov: np.ndarray) -> None:
        w, v = np.linalg.eigh(np.asarray(cov, np.float64))
        self.root = (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T
        self.mean = np.asarray(mean, np.float64)
        self.trace = float(np.trace(cov))

    def __call__(self, x: np.ndarray) -> float:
        x = np.asarray(x, np.float64)
        mu = x.mean(axis=0)
        c = np.cov(x, rowvar=False)
        ev = np.linalg.eigvalsh(self.root @ c @ self.root)
        d = mu - self.mean
        return float(d @ d + np.trace(c) + self.trace - 2.0 * np.sqrt(np.clip(ev, 0.0, None)).sum())


def paired_statistic(
    sets: dict[int, dict[str, np.ndarray]],
    statistic: Callable[[dict[str, float]], float],
    fid: FastFID,
    level: float = LEVEL,
    resamples: int = 1000,
    seed: int = 0,
) -> dict[str, Any]:
    """``statistic`` of one seed's FIDs (name -> FID of ``sets[seed][name]``, features [N, D] whose row i comes
    from noise i in every set), averaged over seeds, with its two-level percentile bootstrap interval."""
    seeds = sorted(sets)
    sizes = {x.shape[0] for s in seeds for x in sets[s].values()}
    if len(sizes) != 1:
        raise ValueError(f"sample sets of different sizes {sorted(sizes)}: not paired")
    (n,) = sizes
    names = sorted(sets[seeds[0]])
    if any(sorted(sets[s]) != names for s in seeds):
        raise ValueError("every seed needs the same sample sets")

    def value(s: int, rows: np.ndarray | slice) -> float:
        return statistic({k: fid(sets[s][k][rows]) for k in names})

    point = float(np.mean([value(s, slice(None)) for s in seeds]))
    rng = np.random.default_rng(seed)
    means = np.empty(resamples)
    for r in range(resamples):
        chosen = rng.integers(0, len(seeds), len(seeds))
        rows = rng.integers(0, n, n)
        per = {c: value(seeds[c], rows) for c in set(chosen.tolist())}
        means[r] = np.mean([per[c] for c in chosen])
    lo, hi = np.quantile(means, [(1 - level) / 2, (1 + level) / 2])
    return {
        "mean": point,
        "low": float(lo),
        "high": float(hi),
        "level": level,
        "seeds": len(seeds),
        "images": n,
        "method": f"two-level percentile bootstrap over seeds and paired samples, {resamples} resamples",
    }


def seed_ratio(a: dict[int, float], b: dict[int, float], level: float = LEVEL) -> dict[str, Any] | None:
    """The ratio a / b of a per-run statistic that has no per-image values (the noise of a training curve):
    log(a_s / b_s) of each seed both have, a t interval over seeds (n − 1 degrees of freedom: wide with two
    seeds, as it should be), reported as the geometric-mean ratio and its interval. ``low``/``high`` are the
    interval of the log ratio, so :func:`decide` applies (below 0: a is smaller). None with fewer than 2 seeds."""
    from scipy import stats

    seeds = sorted(s for s in a if s in b and a[s] and b[s])
    if len(seeds) < 2:
        return None
    d = np.log([a[s] / b[s] for s in seeds])
    half = float(stats.t.ppf((1 + level) / 2, len(d) - 1) * d.std(ddof=1) / np.sqrt(len(d)))
    m = float(d.mean())
    return {
        "mean": m,
        "low": m - half,
        "high": m + half,
        "ratio": float(np.exp(m)),
        "ratio_low": float(np.exp(m - half)),
        "ratio_high": float(np.exp(m + half)),
        "level": level,
        "seeds": len(seeds),
        "method": f"t interval over {len(seeds)} seeds of the log ratio",
    }


def decide(interval: dict[str, Any] | None) -> bool | None:
    """True: the first arm is lower (the interval lies below 0); False: higher; None: the interval holds 0."""
    if interval is None:
        return None
    if interval["high"] < 0:
        return True
    if interval["low"] > 0:
        return False
    return None


def describe(name_a: str, name_b: str, interval: dict[str, Any] | None, unit: str = "bits/dim") -> str:
    if interval is None:
        return f"{name_a} − {name_b}: no per-image values stored: no paired interval"
    verdict = {True: f"{name_a} lower", False: f"{name_a} higher", None: "undecided (the interval holds 0)"}
    return (
        f"{name_a} − {name_b}: {interval['mean']:+.4f} {unit}, {interval['level']:.0%} interval "
        f"[{interval['low']:+.4f}, {interval['high']:+.4f}] over {interval['images']} images × {interval['seeds']} "
        f"seeds: {verdict[decide(interval)]}"
    )
