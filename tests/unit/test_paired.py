"""bench/experiments/paired.py: the paired interval against the t-interval it should approach, and the gain of
pairing on data where images share most of their spread."""

from __future__ import annotations

import sys

import numpy as np
import pytest
from scipy import stats

from tests.conftest import REPO

sys.path.insert(0, str(REPO / "bench" / "experiments"))
import paired  # noqa: E402


def test_one_seed_matches_the_t_interval_of_the_paired_mean() -> None:
    rng = np.random.default_rng(1)
    base = rng.normal(3.0, 0.5, 400)
    a, b = base + rng.normal(0.02, 0.05, 400), base
    got = paired.paired_difference({0: a.tolist()}, {0: b.tolist()})
    d = a - b
    half = stats.t.ppf(0.975, len(d) - 1) * d.std(ddof=1) / np.sqrt(len(d))
    assert got["mean"] == pytest.approx(d.mean(), rel=1e-12)
    assert got["low"] == pytest.approx(d.mean() - half, abs=0.1 * half)
    assert got["high"] == pytest.approx(d.mean() + half, abs=0.1 * half)


def test_pairing_decides_what_unpaired_spreads_cannot() -> None:
    # Images differ a lot (sd 0.3), the arms by a steady 0.02: seed ranges of the means overlap, pairs do not.
    rng = np.random.default_rng(2)
    img = rng.normal(3.0, 0.3, 64)
    a = {s: (img + 0.02 + rng.normal(0, 0.01, 64)).tolist() for s in (0, 1)}
    b = {s: (img + rng.normal(0, 0.01, 64)).tolist() for s in (0, 1)}
    se_unpaired = np.std(a[0], ddof=1) / np.sqrt(64)
    assert se_unpaired > 0.02  # one arm's standard error alone exceeds the difference
    iv = paired.paired_difference(a, b)
    assert iv["low"] > 0 and paired.decide(iv) is False
    assert paired.decide(paired.paired_difference(b, a)) is True
    same = {s: img.tolist() for s in (0, 1)}
    noisy = {s: (img + rng.normal(0, 0.05, 64)).tolist() for s in (0, 1)}
    assert paired.decide(paired.paired_difference(same, noisy)) is None
    assert "undecided" in paired.describe("x", "y", paired.paired_difference(same, noisy))


def test_seed_variation_widens_the_interval() -> None:
    rng = np.random.default_rng(3)
    img = rng.normal(3.0, 0.3, 64)
    steady = {s: (img + 0.02).tolist() for s in (0, 1, 2)}
    shifting = {s: (img + 0.02 + off).tolist() for s, off in zip((0, 1, 2), (-0.03, 0.0, 0.03), strict=True)}
    base = {s: img.tolist() for s in (0, 1, 2)}
    narrow = paired.paired_difference(steady, base)
    wide = paired.paired_difference(shifting, base)
    assert narrow["high"] - narrow["low"] < 1e-9 < wide["high"] - wide["low"]
    assert paired.paired_difference({0: [1.0]}, {1: [1.0]}) is None
    with pytest.raises(ValueError, match="not the same images"):
        paired.paired_difference({0: [1.0, 2.0]}, {0: [1.0]})


def test_the_report_pairs_every_two_arms_and_says_when_values_are_missing() -> None:
    import report  # bench/experiments/report.py (its directory is on sys.path above)

    arms = {
        "a": {"seeds": {0: {"bpd_per_image": [1.0, 2.0, 3.0]}, 1: {"bpd_per_image": [1.1, 2.1, 3.0]}}},
        "b": {"seeds": {0: {"bpd_per_image": [1.2, 2.2, 3.3]}, 1: {"bpd_per_image": [1.3, 2.2, 3.2]}}},
        "old": {"seeds": {0: {}, 1: {}}},  # a report written before per-image values were stored
    }
    facts, text = report.paired_bpd(arms)
    assert list(facts) == ["a - b", "a - old", "b - old"]
    assert facts["a - b"]["mean"] == pytest.approx(-0.2) and facts["a - b"]["high"] < 0
    assert text[0].endswith("a lower.") and facts["a - old"] is None and "no per-image values" in text[1]
