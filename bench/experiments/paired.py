"""Paired comparisons between arms of the experiment suite: the difference of two arms' bits/dim with a 95 %
interval over images and seeds.

Every arm is evaluated on the same validation images with the same noise (``trainer/evaluate.py bpd``,
noise seed fixed), so the per-image values of two arms of one seed are paired: d_{s,i} = a_{s,i} - b_{s,i}
removes what the images have in common, which is most of the spread. The interval is a two-level
(hierarchical) percentile bootstrap: resample the seeds, then the images (the same resampled images for
every seed: images are shared across seeds), and take the mean of d. Seed-to-seed variation thus widens the
interval as it should; with one seed it is the image-level bootstrap of a paired mean. A verdict is given
only where the interval excludes zero.
"""

from __future__ import annotations

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
