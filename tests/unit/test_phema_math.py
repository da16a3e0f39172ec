"""Post-hoc EMA math (trainer/phema/profiles.py) against independent float64 derivations: numerical
integration of the continuous profiles, direct summation of the discrete per-step weights, and the EMA
itself run step by step (trainer/phema/averages.py)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import integrate

from trainer.phema import PowerEMA
from trainer.phema.profiles import (
    SIGMA_REL_MAX,
    beta,
    gamma_to_sigma_rel,
    profile_dot,
    sigma_rel_of_decay,
    sigma_rel_of_half_life,
    sigma_rel_to_gamma,
    solve_coefficients,
)


def _density(t: float, gamma: float):  # the continuous profile p_t(τ) = (γ+1) τ^γ / t^(γ+1) on [0, t]
    return lambda tau: (gamma + 1.0) * tau**gamma / t ** (gamma + 1.0) if tau <= t else 0.0


def _quad_dot(t_a: float, g_a: float, t_b: float, g_b: float) -> float:
    pa, pb = _density(t_a, g_a), _density(t_b, g_b)
    return integrate.quad(lambda x: pa(x) * pb(x), 0.0, min(t_a, t_b), epsabs=0, epsrel=1e-12, limit=200)[0]


def _discrete_weights(t: int, gamma: float) -> np.ndarray:
    """Weight of each step τ = 1..t in the EMA run with β_k = (1 - 1/k)^(γ+1): (1 - β_τ) Π_{k>τ} β_k,
    multiplied out term by term (no telescoping)."""
    b = np.array([beta(k, gamma) for k in range(1, t + 1)])
    tail = np.concatenate([np.cumprod(b[::-1])[::-1][1:], [1.0]])  # Π_{k=τ+1..t} β_k
    return (1.0 - b) * tail


def test_sigma_rel_and_gamma_are_inverse_and_match_the_paper() -> None:
    # EDM2 section 3: σ_rel 0.05 and 0.10 are γ = 16.97 and 6.94.
    assert sigma_rel_to_gamma(0.05) == pytest.approx(16.97, abs=5e-3)
    assert sigma_rel_to_gamma(0.10) == pytest.approx(6.94, abs=5e-3)
    for s in (0.001, 0.02, 0.05, 0.13, 0.25, SIGMA_REL_MAX):
        assert gamma_to_sigma_rel(sigma_rel_to_gamma(s)) == pytest.approx(s, rel=1e-12)
    # σ_rel is the std of the profile over t: integrate it.
    g, t = sigma_rel_to_gamma(0.07), 50.0
    p = _density(t, g)
    m1 = integrate.quad(lambda x: x * p(x), 0, t, epsrel=1e-12)[0]
    m2 = integrate.quad(lambda x: x * x * p(x), 0, t, epsrel=1e-12)[0]
    assert math.sqrt(m2 - m1 * m1) / t == pytest.approx(0.07, rel=1e-9)
    with pytest.raises(ValueError):
        sigma_rel_to_gamma(0.3)


def test_decay_and_half_life_conversions_match_the_exponential_profile_std() -> None:
    # An EMA with decay d has weights ∝ d^(t-τ): std of that (long) geometric profile, summed directly.
    d, t = 0.999, 200_000
    k = np.arange(0, 50_000, dtype=np.float64)
    w = (1 - d) * d**k
    std = math.sqrt((w * k * k).sum() - (w * k).sum() ** 2)
    assert sigma_rel_of_decay(d, t) == pytest.approx(std / t, rel=1e-3)  # continuous vs discrete: O(1 - d)
    half = math.log(0.5) / math.log(d)  # steps over which the weight halves
    assert sigma_rel_of_half_life(half * 64, t * 64) == pytest.approx(sigma_rel_of_decay(d, t), rel=1e-12)


@pytest.mark.parametrize(
    ("t_a", "s_a", "t_b", "s_b"), [(100, 0.05, 100, 0.10), (40, 0.10, 100, 0.05), (700, 0.02, 90, 0.2)]
)
def test_inner_products_match_numerical_integration(t_a: float, s_a: float, t_b: float, s_b: float) -> None:
    g_a, g_b = sigma_rel_to_gamma(s_a), sigma_rel_to_gamma(s_b)
    want = _quad_dot(t_a, g_a, t_b, g_b)
    assert float(profile_dot(t_a, g_a, t_b, g_b)) == pytest.approx(want, rel=1e-9)
    assert float(profile_dot(t_b, g_b, t_a, g_a)) == pytest.approx(want, rel=1e-9)


def test_inner_products_approach_the_discrete_profiles_sum() -> None:
    # The discrete EMA's weights w_t(τ) are the continuous profile integrated over one step; their inner
    # product Σ_τ w_a(τ) w_b(τ) tends to the closed form as t grows (relative gap O(γ/t)).
    g_a, g_b = sigma_rel_to_gamma(0.05), sigma_rel_to_gamma(0.10)
    for t_a, t_b in ((20_000, 20_000), (12_000, 20_000)):
        wa, wb = _discrete_weights(t_a, g_a), _discrete_weights(t_b, g_b)
        m = min(t_a, t_b)
        direct = float((wa[:m] * wb[:m]).sum())
        assert float(profile_dot(t_a, g_a, t_b, g_b)) == pytest.approx(direct, rel=2e-3)


def test_coefficients_solve_the_least_squares_problem_and_are_normalised() -> None:
    snap_t = np.array([100.0, 100.0, 200.0, 200.0, 300.0, 300.0])
    snap_g = np.array([sigma_rel_to_gamma(s) for s in (0.05, 0.10) * 3])
    out_s = [0.03, 0.07, 0.15]
    out_g = np.array([sigma_rel_to_gamma(s) for s in out_s])
    x, err = solve_coefficients(snap_t, snap_g, np.full(3, 300.0), out_g)
    # Independently: the Gram matrix and right-hand side by quadrature, solved, normalised.
    n = len(snap_t)
    a = np.array([[_quad_dot(snap_t[i], snap_g[i], snap_t[j], snap_g[j]) for j in range(n)] for i in range(n)])
    for k, g in enumerate(out_g):
        b = np.array([_quad_dot(snap_t[i], snap_g[i], 300.0, g) for i in range(n)])
        ref = np.linalg.solve(a, b)
        ref /= ref.sum()
        np.testing.assert_allclose(x[:, k], ref, rtol=1e-6, atol=1e-9 * np.abs(ref).max())
        assert x[:, k].sum() == pytest.approx(1.0, abs=1e-12)
        # The reported error: ||p_r - Σ x_i p_i|| / ||p_r||, integrated directly.
        dens = [_density(snap_t[i], snap_g[i]) for i in range(n)]
        pr = _density(300.0, g)
        diff2 = integrate.quad(
            lambda v, pr=pr, dens=dens, c=x[:, k]: (pr(v) - sum(ci * d(v) for ci, d in zip(c, dens, strict=True))) ** 2,
            0,
            300.0,
            points=[100.0, 200.0],
            limit=400,
            epsrel=1e-10,
        )[0]
        assert err[k] == pytest.approx(math.sqrt(diff2 / _quad_dot(300.0, g, 300.0, g)), rel=1e-4, abs=1e-7)


def test_a_tracked_profile_reconstructs_to_itself() -> None:
    steps = np.arange(100.0, 1001.0, 100.0)
    snap_t = np.repeat(steps, 2)
    snap_g = np.tile([sigma_rel_to_gamma(0.05), sigma_rel_to_gamma(0.10)], len(steps))
    for s, col in ((0.05, -2), (0.10, -1)):
        x, err = solve_coefficients(snap_t, snap_g, [1000.0], [sigma_rel_to_gamma(s)])
        want = np.zeros(len(snap_t))
        want[col] = 1.0
        np.testing.assert_allclose(x[:, 0], want, atol=1e-5)
        assert err[0] < 1e-5


def _module(values: torch.Tensor) -> torch.nn.Module:
    m = torch.nn.Linear(values.numel(), 1, bias=False)
    with torch.no_grad():
        m.weight.copy_(values.view(1, -1))
    return m


def test_power_ema_runs_the_discrete_profile_and_ignores_skipped_steps() -> None:
    gen = torch.Generator().manual_seed(0)
    traj = torch.randn(60, 5, generator=gen, dtype=torch.float64).cumsum(0)  # θ_1..θ_60, a random walk
    skipped = {7, 8, 30}  # steps whose verdict is "skip": the weights do not change there either
    module = _module(traj[0].float())
    ema = PowerEMA(module, [0.05, 0.10], torch.device("cpu"))
    kept = []
    for i in range(60):
        keep = torch.tensor(0.0 if i in skipped else 1.0)
        if i not in skipped:
            with torch.no_grad():
                module.weight.copy_(traj[i].float().view(1, -1))
            kept.append(traj[i].float().double())
        ema.update(keep=keep)
    assert ema.steps() == 60 - len(skipped)
    t = len(kept)
    for s in (0.05, 0.10):
        w = _discrete_weights(t, sigma_rel_to_gamma(s))
        assert w.sum() == pytest.approx(1.0, abs=1e-12)
        direct = (torch.from_numpy(w)[:, None] * torch.stack(kept)).sum(0)
        got = ema.shadows[s][0].double().view(-1)
        torch.testing.assert_close(got, direct, rtol=0, atol=1e-5 * float(direct.abs().max()))


def test_power_ema_state_round_trip_and_profile_mismatch() -> None:
    module = _module(torch.arange(4.0))
    a = PowerEMA(module, [0.05, 0.10], torch.device("cpu"))
    for _ in range(3):
        a.update()
    b = PowerEMA(module, [0.05, 0.10], torch.device("cpu"))
    b.load_state_dict(a.state_dict())
    assert b.steps() == 3 and all(torch.equal(x, y) for x, y in zip(a.shadows[0.05], b.shadows[0.05], strict=True))
    c = PowerEMA(module, [0.05], torch.device("cpu"))
    with pytest.raises(ValueError, match="cannot be added to or removed"):
        c.load_state_dict(a.state_dict())


def test_config_and_cadence() -> None:
    from trainer.cadence import Cadence
    from trainer.config import ConfigError, load_config
    from trainer.phema import snapshot_interval

    cfg = load_config(None, ["train.total_steps=25"])
    assert not cfg.train.phema.enabled and cfg.train.phema.sigma_rels == [0.05, 0.10]
    with pytest.raises(ConfigError, match=r"train\.phema\.sigma_rels: every sigma_rel must lie in \(0, 0\.2887\]"):
        load_config(None, ["train.phema.sigma_rels=[0.05,0.5]"])
    assert snapshot_interval(1000, None, 128) == 1000
    assert snapshot_interval(1000, 64_000, 128) == 500  # an interval in images, in steps of the global batch
    due = Cadence(cfg, evaluates=False, snapshot_every=10)
    assert [s for s in range(1, 26) if due.at(s).snapshot] == [10, 20, 25]  # the last step snapshots too
    assert not any(Cadence(cfg, evaluates=False).at(s).snapshot for s in range(1, 26))


def test_sweep_config_sets_the_periodic_evaluation() -> None:
    from trainer.config import ConfigError, load_config
    from trainer.phema.sweep import sweep_config

    run = load_config(None, ["diffusion.steps=100"]).model_dump(mode="json")
    cfg = sweep_config(run, ["bpd", "fid"], "/data", 64, 8, "clf.pt", "ref.npz", 300, "ddim10")
    t = cfg.train
    assert (t.eval_every, t.eval_images, t.eval_timesteps, t.eval_fid_samples) == (1, 64, 8, 300)
    assert (t.eval_features, t.eval_reference, t.eval_sample_steps, cfg.data.root) == (
        "clf.pt",
        "ref.npz",
        "ddim10",
        "/data",
    )
    assert sweep_config(run, ["bpd"], None, 64, 8, None, None, 300).train.eval_features is None
    with pytest.raises(ConfigError, match="--eval fid needs --features and --reference"):
        sweep_config(run, ["fid"], None, 64, 8, None, None, 300)
