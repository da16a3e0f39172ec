"""Single-process tests of the timestep samplers: warm-up, exact p_t and weights, unbiasedness, state."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from trainer.config import DiffusionConfig
from trainer.pictures import plot_timestep_importance
from trainer.timesteps import (
    LossSecondMomentSampler,
    TimestepSampler,
    UniformSampler,
    create_timestep_sampler,
    sampler_from_config,
    sampler_summary_metrics,
)


def _feed(sampler: TimestepSampler, t: list[int], losses: list[float]) -> None:
    sampler.record(torch.tensor(t, dtype=torch.long), torch.tensor(losses, dtype=torch.float64))
    sampler.sync()


def _fill(sampler: LossSecondMomentSampler, values: np.ndarray) -> None:
    """Feed values[t, j] for every t, oldest first (j = 0 first)."""
    num_t, n = values.shape
    for j in range(n):
        _feed(sampler, list(range(num_t)), values[:, j].tolist())


def _expected_probs(history: np.ndarray, u: float) -> np.ndarray:
    """Independent float64 derivation of p = (1-u)·sqrt(mean L²)/Σ + u/T."""
    rms = np.sqrt(np.mean(np.asarray(history, dtype=np.float64) ** 2, axis=1))
    return (1.0 - u) * rms / rms.sum() + u / history.shape[0]


# --------------------------------------------------------------------------- warm-up


def test_uniform_until_every_t_has_n_values() -> None:
    num_t, n = 6, 3
    s = LossSecondMomentSampler(num_t, history_per_term=n, uniform_prob=0.01)
    rng = np.random.default_rng(0)
    values = rng.uniform(0.1, 5.0, size=(num_t, n))
    values[:, 0] = 100.0  # make the would-be distribution clearly non-uniform
    # Every t gets n values except t = 2, which gets n - 1.
    for j in range(n):
        ts = [t for t in range(num_t) if not (t == 2 and j == n - 1)]
        _feed(s, ts, values[ts, j].tolist())
    assert not s.warmed_up and not s.importance_active
    np.testing.assert_array_equal(s.probabilities(), np.full(num_t, 1.0 / num_t))
    t, w = s.sample(500, generator=torch.Generator().manual_seed(0))
    assert torch.equal(w, torch.ones(500))  # exactly 1, not 1/(T·(1/T))
    assert set(t.tolist()) == set(range(num_t))

    _feed(s, [2], [values[2, n - 1]])
    assert s.warmed_up and s.importance_active
    np.testing.assert_allclose(s.probabilities(), _expected_probs(values, 0.01), rtol=1e-13, atol=0)
    assert not np.allclose(s.probabilities(), 1.0 / num_t)


def test_all_zero_history_stays_uniform() -> None:
    s = LossSecondMomentSampler(4, history_per_term=2)
    _fill(s, np.zeros((4, 2)))
    assert s.warmed_up and not s.importance_active
    np.testing.assert_array_equal(s.probabilities(), np.full(4, 0.25))
    _, w = s.sample(8)
    assert torch.equal(w, torch.ones(8))


# --------------------------------------------------------------------------- exact values


def test_exact_probabilities_and_weights_for_hand_made_history() -> None:
    num_t, n, u = 5, 4, 0.05
    s = LossSecondMomentSampler(num_t, history_per_term=n, uniform_prob=u)
    # Two stale values per t first: the ring must evict them (only the last n count).
    _fill(s, np.full((num_t, 2), 1e3))
    history = np.array(
        [
            [0.5, 1.5, -2.0, 0.25],
            [3.0, 3.0, 3.0, 3.0],
            [0.01, 0.02, 0.03, 0.04],
            [10.0, 0.0, 0.0, 0.0],
            [1.0, 2.0, 3.0, 4.0],
        ]
    )
    _fill(s, history)
    expected = _expected_probs(history, u)
    np.testing.assert_allclose(s.probabilities(), expected, rtol=1e-13, atol=0)
    assert abs(s.probabilities().sum() - 1.0) < 1e-14
    expected_w = 1.0 / (num_t * expected)
    np.testing.assert_allclose(s.weights(), expected_w.astype(np.float32), rtol=1e-7)

    t, w = s.sample(1000, generator=torch.Generator().manual_seed(1))
    assert t.dtype == torch.long and w.dtype == torch.float32 and t.shape == w.shape == (1000,)
    np.testing.assert_allclose(w.numpy(), expected_w[t.numpy()].astype(np.float32), rtol=1e-7)

    stats = s.history_stats()
    np.testing.assert_array_equal(stats["count"], np.full(num_t, n))
    np.testing.assert_allclose(stats["mean"], history.mean(axis=1), rtol=1e-14)
    np.testing.assert_allclose(stats["rms"], np.sqrt((history**2).mean(axis=1)), rtol=1e-14)


def test_many_values_for_one_t_in_one_sync_keep_the_last_n_in_order() -> None:
    num_t, n = 3, 4
    s = LossSecondMomentSampler(num_t, history_per_term=n, uniform_prob=0.0)
    _fill(s, np.ones((num_t, n)))
    # One micro-batch brings 7 values for t = 1 interleaved with others; the last 4 must survive.
    t = [1, 0, 1, 1, 2, 1, 1, 1, 1]
    losses = [9.0, 2.0, 8.0, 7.0, 3.0, 6.0, 5.0, 4.0, 0.5]
    _feed(s, t, losses)
    expected = np.array([[1.0, 1.0, 1.0, 2.0], [6.0, 5.0, 4.0, 0.5], [1.0, 1.0, 1.0, 3.0]])
    np.testing.assert_allclose(s.probabilities(), _expected_probs(expected, 0.0), rtol=1e-13)
    # Then two more for t = 1 evict the two oldest survivors (6 and 5), not arbitrary ones.
    _feed(s, [1, 1], [2.0, 2.0])
    expected[1] = [4.0, 0.5, 2.0, 2.0]
    np.testing.assert_allclose(s.history_stats()["mean"], expected.mean(axis=1), rtol=1e-14)
    np.testing.assert_allclose(s.probabilities(), _expected_probs(expected, 0.0), rtol=1e-13)


def test_gradient_accumulation_feeds_every_micro_batch() -> None:
    rng = np.random.default_rng(3)
    micro = [(rng.integers(0, 7, size=9), rng.uniform(0, 2, size=9)) for _ in range(6)]
    once = LossSecondMomentSampler(7, history_per_term=3)
    each = LossSecondMomentSampler(7, history_per_term=3)
    for i, (t, loss) in enumerate(micro):
        once.record(torch.from_numpy(t), torch.from_numpy(loss).float())
        if i % 3 == 2:
            assert once.pending == 9 * 3
            assert once.sync() == 9 * 3
        each.record(torch.from_numpy(t), torch.from_numpy(loss).float())
        each.sync()
    assert once.pending == 0
    np.testing.assert_array_equal(once.state_dict()["history"], each.state_dict()["history"])
    np.testing.assert_array_equal(once.state_dict()["writes"], each.state_dict()["writes"])


# --------------------------------------------------------------------------- statistics


def _warm_sampler_for(loss_of_t: np.ndarray, u: float, seed: int) -> LossSecondMomentSampler:
    num_t = len(loss_of_t)
    s = LossSecondMomentSampler(num_t, history_per_term=10, uniform_prob=u)
    rng = np.random.default_rng(seed)
    _fill(s, loss_of_t[:, None] * rng.uniform(0.8, 1.2, size=(num_t, 10)))
    assert s.importance_active
    return s


def test_draws_follow_p() -> None:
    loss_of_t = np.array([0.1, 1.0, 5.0, 0.5, 2.0])
    s = _warm_sampler_for(loss_of_t, u=0.02, seed=0)
    draws = 200_000
    t, _ = s.sample(draws, generator=torch.Generator().manual_seed(5))
    freq = np.bincount(t.numpy(), minlength=5) / draws
    p = s.probabilities()
    sigma = np.sqrt(p * (1 - p) / draws)
    assert np.all(np.abs(freq - p) < 5 * sigma), (freq, p)


def test_weighted_estimate_is_unbiased_and_lower_variance() -> None:
    num_t = 50
    ts = np.arange(num_t)
    loss_of_t = 5.0 * np.exp(-ts / 4.0) + 0.01  # dominated by a few early t, as L_vlb is
    s = _warm_sampler_for(loss_of_t, u=0.001, seed=1)
    draws = 100_000
    t, w = s.sample(draws, generator=torch.Generator().manual_seed(7))
    est = w.double().numpy() * loss_of_t[t.numpy()]
    target = loss_of_t.mean()  # the uniform-t mean the weighted estimate must match
    stderr = est.std() / np.sqrt(draws)
    assert abs(est.mean() - target) < 5 * stderr, (est.mean(), target, stderr)
    # The point of the exercise: far lower variance than uniform draws of the same losses.
    assert est.var() < 0.1 * loss_of_t.var()
    # A wrong weight (e.g. forgetting it) is detectably biased at this sample size.
    assert abs(loss_of_t[t.numpy()].mean() - target) > 20 * stderr


def test_uniform_sampler() -> None:
    s = create_timestep_sampler("uniform", num_timesteps=10)
    assert isinstance(s, UniformSampler) and not s.importance_active
    t, w = s.sample(4000, generator=torch.Generator().manual_seed(0))
    assert t.dtype == torch.long and int(t.min()) == 0 and int(t.max()) == 9
    assert torch.equal(w, torch.ones(4000))
    s.record(t, torch.rand(4000))
    assert s.sync() == 0
    np.testing.assert_array_equal(s.probabilities(), np.full(10, 0.1))
    assert s.history_stats() is None
    again = UniformSampler(10)
    again.load_state_dict(s.state_dict())
    with pytest.raises(ValueError, match="num_timesteps"):
        UniformSampler(11).load_state_dict(s.state_dict())


def test_sample_is_reproducible_with_a_generator_and_handles_zero() -> None:
    s = _warm_sampler_for(np.linspace(0.1, 3.0, 8), u=0.001, seed=2)
    a = s.sample(32, generator=torch.Generator().manual_seed(11))
    b = s.sample(32, generator=torch.Generator().manual_seed(11))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    t, w = s.sample(0)
    assert t.shape == w.shape == (0,)
    with pytest.raises(ValueError, match="batch_size"):
        s.sample(-1)


# --------------------------------------------------------------------------- state


def test_state_round_trip_through_torch_save_weights_only() -> None:
    s = LossSecondMomentSampler(9, history_per_term=4, uniform_prob=0.01)
    rng = np.random.default_rng(4)
    for _ in range(15):  # several ring wrap-arounds, uneven counts per t
        t = rng.integers(0, 9, size=7)
        _feed(s, t.tolist(), rng.uniform(0, 3, size=7).tolist())
    assert s.warmed_up
    buf = io.BytesIO()
    torch.save(s.state_dict(), buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)
    assert all(isinstance(v, torch.Tensor | int | str) for v in state.values())

    r = LossSecondMomentSampler(9, history_per_term=4, uniform_prob=0.01)
    r.load_state_dict(state)
    np.testing.assert_array_equal(r.probabilities(), s.probabilities())
    # The ring positions came back too: identical updates keep them identical.
    for _ in range(5):
        t = rng.integers(0, 9, size=7).tolist()
        loss = rng.uniform(0, 3, size=7).tolist()
        _feed(s, t, loss)
        _feed(r, t, loss)
        assert r.probabilities().tobytes() == s.probabilities().tobytes()
    assert torch.equal(r.state_dict()["history"], s.state_dict()["history"])


def test_state_errors_are_clear() -> None:
    s = LossSecondMomentSampler(5, history_per_term=3)
    s.record(torch.tensor([1]), torch.tensor([0.5]))
    with pytest.raises(RuntimeError, match="call sync"):
        s.state_dict()
    s.sync()
    state = s.state_dict()
    with pytest.raises(ValueError, match="num_timesteps"):
        LossSecondMomentSampler(6, history_per_term=3).load_state_dict(state)
    with pytest.raises(ValueError, match="history_per_term"):
        LossSecondMomentSampler(5, history_per_term=4).load_state_dict(state)
    with pytest.raises(ValueError, match="'sampler' is 'loss-second-moment'"):
        UniformSampler(5).load_state_dict(state)
    with pytest.raises(ValueError, match="missing key 'history_per_term'"):
        LossSecondMomentSampler(5, history_per_term=3).load_state_dict(
            UniformSampler(5).state_dict() | {"sampler": "loss-second-moment"}
        )


def test_bad_records() -> None:
    s = LossSecondMomentSampler(5, history_per_term=2)
    with pytest.raises(ValueError, match="equal length"):
        s.record(torch.tensor([1, 2]), torch.tensor([0.5]))
    with pytest.raises(TypeError, match="integer tensor"):
        s.record(torch.tensor([1.0]), torch.tensor([0.5]))
    s.record(torch.tensor([5]), torch.tensor([0.5]))
    with pytest.raises(ValueError, match=r"in \[0, 5\), got 5"):
        s.sync()
    s.record(torch.tensor([1, 2, 3]), torch.tensor([float("nan"), 1.0, float("inf")]))
    assert s.sync() == 3
    assert s.dropped_nonfinite == 2
    assert s.history_stats()["count"].tolist() == [0, 0, 1, 0, 0]


def test_factory_and_config() -> None:
    with pytest.raises(ValueError, match="unknown timestep sampler 'importance'"):
        create_timestep_sampler("importance", 10)
    cfg = DiffusionConfig(steps=20, timestep_sampler="loss-second-moment", history_per_term=3, uniform_prob=0.5)
    s = sampler_from_config(cfg)
    assert isinstance(s, LossSecondMomentSampler)
    assert (s.num_timesteps, s.history_per_term, s.uniform_prob) == (20, 3, 0.5)
    assert isinstance(sampler_from_config(DiffusionConfig(steps=20)), UniformSampler)
    with pytest.raises(ValueError, match="needs loss 'hybrid' or 'kl'"):
        DiffusionConfig(timestep_sampler="loss-second-moment", loss="mse", var_type="fixed_small", history_term="vb")


# --------------------------------------------------------------------------- observability


def test_plot_and_summary() -> None:
    s = _warm_sampler_for(np.linspace(0.1, 3.0, 40), u=0.001, seed=5)
    for sampler in (s, UniformSampler(40), LossSecondMomentSampler(40)):
        png = plot_timestep_importance(sampler, step=12)
        assert png[:8] == b"\x89PNG\r\n\x1a\n"
        img = Image.open(io.BytesIO(png))
        assert img.size[0] == 800
    m = sampler_summary_metrics(s)
    assert m["ts_importance_active"] == 1.0
    assert m["ts_p_max_over_uniform"] > 1.5 > 0.5 > m["ts_p_min_over_uniform"]
    assert m["ts_weight_max"] == pytest.approx(float(s.weights().max()))
    assert sampler_summary_metrics(UniformSampler(40))["ts_weight_max"] == 1.0
