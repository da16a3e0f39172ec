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


def test_fast_fid_is_the_frechet_distance() -> None:
    from trainer.evaluation.quality import FeatureStats, frechet_distance

    rng = np.random.default_rng(4)
    ref = rng.normal(0, 1, (500, 12)) @ rng.normal(0, 1, (12, 12))
    x = rng.normal(0.3, 1, (64, 12)) @ rng.normal(0, 1, (12, 12))
    r, s = FeatureStats.from_features(ref), FeatureStats.from_features(x)
    expected = frechet_distance(s.mean, s.cov, r.mean, r.cov)
    assert paired.FastFID(r.mean, r.cov)(x) == pytest.approx(expected, rel=1e-9)


def test_paired_statistic_of_fids_decides_a_shift_and_not_a_relabelling() -> None:
    # Two "models" share their noise: sample i of b is sample i of a moved by a constant. The FID difference
    # is decided; a set against itself gives exactly 0; sets of other sizes are refused.
    rng = np.random.default_rng(5)
    ref = rng.normal(0, 1, (2000, 6))
    fid = paired.FastFID(ref.mean(0), np.cov(ref, rowvar=False))
    sets = {s: {"a": rng.normal(0, 1, (96, 6))} for s in (0, 1)}
    for s in sets:
        sets[s]["b"] = sets[s]["a"] + 0.5
    diff = paired.paired_statistic(sets, lambda f: f["b"] - f["a"], fid, resamples=300)
    assert diff["low"] > 0 and paired.decide(diff) is False
    assert diff["mean"] == pytest.approx(np.mean([fid(sets[s]["b"]) - fid(sets[s]["a"]) for s in sets]), rel=1e-12)
    same = paired.paired_statistic(sets, lambda f: f["a"] - f["a"], fid, resamples=50)
    assert same["low"] == same["high"] == 0.0
    with pytest.raises(ValueError, match="not paired"):
        paired.paired_statistic({0: {"a": np.zeros((4, 6)), "b": np.zeros((5, 6))}}, lambda f: 0.0, fid)


def test_seed_ratio_is_the_t_interval_of_the_log_ratio() -> None:
    a, b = {0: 0.5, 1: 0.8, 2: 0.6}, {0: 10.0, 1: 12.0, 2: 20.0}
    iv = paired.seed_ratio(a, b)
    d = np.log([0.05, 0.8 / 12, 0.03])
    half = stats.t.ppf(0.975, 2) * d.std(ddof=1) / np.sqrt(3)
    assert iv["ratio"] == pytest.approx(np.exp(d.mean()), rel=1e-12)
    assert (iv["ratio_low"], iv["ratio_high"]) == pytest.approx((np.exp(d.mean() - half), np.exp(d.mean() + half)))
    assert paired.decide(iv) is True
    # Two seeds that disagree on the direction: undecided; one seed: no interval.
    assert paired.decide(paired.seed_ratio({0: 1.0, 1: 3.0}, {0: 2.0, 1: 2.0})) is None
    assert paired.seed_ratio({0: 1.0}, {0: 2.0}) is None


def test_verdicts_follow_the_paired_interval_not_the_means() -> None:
    import report

    def arm(values: dict[int, list[float]]) -> dict:
        seeds = {s: {"bpd": float(np.mean(v)), "bpd_per_image": v, "loss_std": 1.0} for s, v in values.items()}
        return {"seeds": seeds, "summary": report.summarise_arm(seeds)}

    rng = np.random.default_rng(6)
    img = rng.normal(3.0, 0.3, 64)
    better = arm({s: (img - 0.02 + rng.normal(0, 0.005, 64)).tolist() for s in (0, 1)})
    noisy = arm({s: (img - 0.02 + rng.normal(0, 0.3, 64)).tolist() for s in (0, 1)})  # lower mean, no decision
    base = arm({s: img.tolist() for s in (0, 1)})
    lines, facts = report.verdicts(1, {"hybrid_cosine": better, "mse_fixed": base})
    assert facts["agrees"] is True and "**agrees**" in lines[0] and "interval [" in lines[0]
    lines, facts = report.verdicts(1, {"hybrid_cosine": noisy, "mse_fixed": base})
    assert facts["agrees"] is None and "**inconclusive**" in lines[0] and "the interval holds 0" in lines[0]
