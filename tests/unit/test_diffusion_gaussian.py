"""q, posterior, model parameterisations, losses and bits/dim against independent float64 formulas."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from trainer.diffusion import GaussianDiffusion, LossType, ModelMeanType, ModelVarType, create_diffusion

T = 50
LN2 = math.log(2.0)


def _ref_tables(T: int = T) -> dict[str, np.ndarray]:
    """Cosine schedule tables derived here, independently of trainer.diffusion."""
    f = [math.cos((i / T + 0.008) / 1.008 * math.pi / 2) ** 2 for i in range(T + 1)]
    betas = np.array([min(1 - f[i + 1] / f[i], 0.999) for i in range(T)])
    ab = np.cumprod(1 - betas)
    ab_prev = np.concatenate([[1.0], ab[:-1]])
    return {"betas": betas, "ab": ab, "ab_prev": ab_prev}


def _diff(var: str = "learned_range", loss: str = "hybrid", mean: str = "epsilon") -> GaussianDiffusion:
    return create_diffusion(steps=T, schedule="cosine", mean_type=mean, var_type=var, loss=loss)


def _bayes_posterior(x0: float, xt: float, t: int, ref: dict[str, np.ndarray]) -> tuple[float, float]:
    """q(x_{t-1} | x_t, x_0) ∝ q(x_{t-1} | x_0)·q(x_t | x_{t-1}): product of two Gaussians."""
    prior_m, prior_v = math.sqrt(ref["ab_prev"][t]) * x0, 1 - ref["ab_prev"][t]
    a, b = 1 - ref["betas"][t], ref["betas"][t]
    prec = 1 / prior_v + a / b
    return (prior_m / prior_v + math.sqrt(a) * xt / b) / prec, 1 / prec


def _const_model(out: torch.Tensor):
    return lambda x, t, **kw: out


# ------------------------------------------------------------------ q
def test_q_moments_and_samples() -> None:
    diff, ref = _diff(), _ref_tables()
    x0 = torch.linspace(-1, 1, 7, dtype=torch.float64).reshape(7, 1, 1, 1)
    t = torch.tensor([0, 1, 5, 17, 30, 48, 49])
    mean, var, log_var = diff.q_mean_variance(x0, t)
    ab = torch.tensor(ref["ab"][t.numpy()]).reshape(7, 1, 1, 1)
    assert torch.allclose(mean, ab.sqrt() * x0, rtol=1e-12, atol=1e-14)
    assert torch.allclose(var, 1 - ab, rtol=1e-12)
    assert torch.allclose(log_var, torch.log(1 - ab), rtol=1e-12)
    # sampling: moments of 100k draws at one (x0, t)
    g = torch.Generator().manual_seed(0)
    xs = torch.full((100_000, 1, 1, 1), 0.6, dtype=torch.float64)
    tt = torch.full((100_000,), 20)
    samples = diff.q_sample(xs, tt, generator=g)
    abt = ref["ab"][20]
    se = math.sqrt((1 - abt) / 100_000)
    assert abs(samples.mean().item() - math.sqrt(abt) * 0.6) < 4 * se
    assert samples.var().item() == pytest.approx(1 - abt, rel=0.015)


def test_posterior_closed_form_matches_bayes_rule() -> None:
    diff, ref = _diff(), _ref_tables()
    x0 = torch.tensor([0.3, -0.7, 0.9], dtype=torch.float64).reshape(3, 1, 1, 1)
    xt = torch.tensor([1.1, -0.2, 0.05], dtype=torch.float64).reshape(3, 1, 1, 1)
    for step in (1, 2, 25, 49):
        t = torch.full((3,), step)
        mean, var, log_var = diff.q_posterior_mean_variance(x0, xt, t)
        for i in range(3):
            m_ref, v_ref = _bayes_posterior(x0[i].item(), xt[i].item(), step, ref)
            assert mean[i].item() == pytest.approx(m_ref, rel=1e-10, abs=1e-12)
            assert var[i].item() == pytest.approx(v_ref, rel=1e-10)
            assert log_var[i].item() == pytest.approx(math.log(v_ref), rel=1e-10)
    # t = 0: x_{-1} is x_0 itself (variance 0); the log-variance is clipped to log β̃_1.
    t0 = torch.zeros(3, dtype=torch.long)
    mean, var, log_var = diff.q_posterior_mean_variance(x0, xt, t0)
    assert torch.allclose(mean, x0, atol=1e-12) and torch.all(var == 0)
    _, v1 = _bayes_posterior(0.0, 0.0, 1, ref)
    assert torch.allclose(log_var, torch.full_like(log_var, math.log(v1)), rtol=1e-10)


def test_posterior_matches_regression_on_forward_samples() -> None:
    """Simulate x_0 → x_{t-1} → x_t; E[x_{t-1} | x_t, x_0] is linear in x_t with residual β̃_t."""
    diff, ref = _diff(), _ref_tables()
    rng = np.random.default_rng(1)
    step, x0, n = 12, 0.4, 200_000
    x_prev = math.sqrt(ref["ab_prev"][step]) * x0 + math.sqrt(1 - ref["ab_prev"][step]) * rng.normal(size=n)
    x_t = math.sqrt(1 - ref["betas"][step]) * x_prev + math.sqrt(ref["betas"][step]) * rng.normal(size=n)
    slope, intercept = np.polyfit(x_t, x_prev, 1)
    resid_var = np.var(x_prev - (slope * x_t + intercept))
    grid = torch.tensor([0.0, 1.0], dtype=torch.float64).reshape(2, 1, 1, 1)
    mean, var, _ = diff.q_posterior_mean_variance(torch.full_like(grid, x0), grid, torch.full((2,), step))
    assert mean[0].item() == pytest.approx(intercept, abs=2e-3)
    assert (mean[1] - mean[0]).item() == pytest.approx(slope, abs=2e-3)
    assert var[0].item() == pytest.approx(resid_var, rel=0.02)


# ------------------------------------------------------------------ p
def test_variance_parameterisations() -> None:
    ref = _ref_tables()
    bt = ref["betas"] * (1 - ref["ab_prev"]) / (1 - ref["ab"])
    bt_clipped = np.concatenate([[bt[1]], bt[1:]])
    x = torch.zeros(4, 1, 2, 2, dtype=torch.float64)
    t = torch.tensor([0, 1, 20, 49])
    v = torch.tensor([-1.0, 1.0, 0.2, -0.6], dtype=torch.float64).reshape(4, 1, 1, 1).expand(4, 1, 2, 2)
    out = torch.cat([torch.zeros_like(x), v], dim=1)
    p = _diff().p_mean_variance_from_output(out, x, t)
    for i, step in enumerate(t.tolist()):
        frac = (v[i, 0, 0, 0].item() + 1) / 2
        want = frac * math.log(ref["betas"][step]) + (1 - frac) * math.log(bt_clipped[step])
        assert p["log_variance"][i, 0, 0, 0].item() == pytest.approx(want, rel=1e-12)
        assert p["variance"][i, 0, 0, 0].item() == pytest.approx(math.exp(want), rel=1e-12)
    small = _diff("fixed_small", "mse").p_mean_variance_from_output(torch.zeros_like(x), x, t)
    large = _diff("fixed_large", "mse").p_mean_variance_from_output(torch.zeros_like(x), x, t)
    for i, step in enumerate(t.tolist()):
        assert small["log_variance"][i, 0, 0, 0].item() == pytest.approx(math.log(bt_clipped[step]), rel=1e-12)
        # Fixed-large: β_t, but β̃_1 at t = 0 (improved-diffusion's table).
        want_large = math.log(bt[1]) if step == 0 else math.log(ref["betas"][step])
        assert large["log_variance"][i, 0, 0, 0].item() == pytest.approx(want_large, rel=1e-12)


def test_epsilon_mean_is_ddpm_eq11_and_x0_parameterisation_agrees() -> None:
    ref = _ref_tables()
    g = torch.Generator().manual_seed(2)
    x = torch.randn(3, 2, 4, 4, generator=g, dtype=torch.float64)
    eps = torch.randn(3, 2, 4, 4, generator=g, dtype=torch.float64)
    t = torch.tensor([3, 17, 40])
    p = _diff("fixed_small", "mse").p_mean_variance_from_output(eps, x, t)
    b = torch.tensor(ref["betas"][t.numpy()]).reshape(3, 1, 1, 1)
    ab = torch.tensor(ref["ab"][t.numpy()]).reshape(3, 1, 1, 1)
    eq11 = (x - b / torch.sqrt(1 - ab) * eps) / torch.sqrt(1 - b)
    assert torch.allclose(p["mean"], eq11, rtol=1e-10, atol=1e-12)
    x0 = (x - torch.sqrt(1 - ab) * eps) / torch.sqrt(ab)
    assert torch.allclose(p["pred_xstart"], x0, rtol=1e-10, atol=1e-12)
    assert torch.allclose(p["eps"], eps, rtol=1e-9, atol=1e-10)
    p_x0 = _diff("fixed_small", "mse", mean="x0").p_mean_variance_from_output(x0, x, t)
    assert torch.allclose(p_x0["mean"], p["mean"], rtol=1e-10, atol=1e-12)
    clipped = _diff("fixed_small", "mse").p_mean_variance_from_output(eps, x, t, clip_denoised=True)
    assert clipped["pred_xstart"].abs().max() <= 1.0
    assert torch.allclose(clipped["pred_xstart"], x0.clamp(-1, 1))


def test_p_sample_uses_mean_plus_std_noise_and_no_noise_at_t0() -> None:
    diff = _diff("fixed_large", "mse")
    x = torch.ones(2, 1, 2, 2, dtype=torch.float64)
    noise = torch.full_like(x, 0.5)
    model = _const_model(torch.zeros_like(x))
    t = torch.tensor([0, 10])
    out = diff.p_sample(model, x, t, clip_denoised=False, noise=noise)
    p = diff.p_mean_variance(model, x, t, clip_denoised=False)
    assert torch.allclose(out["sample"][0], p["mean"][0])
    beta10 = _ref_tables()["betas"][10]
    assert torch.allclose(out["sample"][1], p["mean"][1] + math.sqrt(beta10) * 0.5)


# ------------------------------------------------------------------ losses
def test_mse_loss_targets() -> None:
    g = torch.Generator().manual_seed(3)
    x0 = torch.rand(4, 3, 4, 4, generator=g) * 2 - 1
    noise = torch.randn(4, 3, 4, 4, generator=g)
    pred = torch.randn(4, 3, 4, 4, generator=g)
    t = torch.tensor([0, 5, 20, 49])
    eps_terms = _diff("fixed_small", "mse").training_losses(_const_model(pred), x0, t, noise=noise)
    assert torch.allclose(eps_terms["mse"], ((noise - pred) ** 2).mean(dim=(1, 2, 3)))
    assert torch.equal(eps_terms["loss"], eps_terms["mse"])
    x0_terms = _diff("fixed_small", "mse", mean="x0").training_losses(_const_model(pred), x0, t, noise=noise)
    assert torch.allclose(x0_terms["mse"], ((x0 - pred) ** 2).mean(dim=(1, 2, 3)))
    for terms in (eps_terms, x0_terms):
        assert all(v.shape == (4,) and v.dtype == torch.float32 for v in terms.values())


def test_vb_terms_match_independent_kl_and_decoder_nll() -> None:
    """vb at t > 0 = KL(posterior ‖ model) in bits/dim, at t = 0 = decoder NLL, all derived here."""
    ref = _ref_tables()
    diff = _diff("learned_range", "kl")
    g = torch.Generator().manual_seed(4)
    k = torch.randint(0, 256, (2, 1, 3, 3), generator=g)
    x0 = k.double() * 2 / 255 - 1
    noise = torch.randn(2, 1, 3, 3, generator=g, dtype=torch.float64)
    model_out = torch.randn(2, 2, 3, 3, generator=g, dtype=torch.float64) * 0.5
    for step in (0, 7, 33):
        t = torch.full((2,), step)
        terms = diff.training_losses(_const_model(model_out), x0, t, noise=noise)
        ab, ab_prev, b = ref["ab"][step], ref["ab_prev"][step], ref["betas"][step]
        bt = b * (1 - ab_prev) / (1 - ab)
        bt_c = ref["betas"][1] * (1 - ref["ab_prev"][1]) / (1 - ref["ab"][1]) if step == 0 else bt
        for i in range(2):
            total = 0.0
            for j in range(9):
                x0v, n = x0[i].flatten()[j].item(), noise[i].flatten()[j].item()
                e, v = model_out[i, 0].flatten()[j].item(), model_out[i, 1].flatten()[j].item()
                xt = math.sqrt(ab) * x0v + math.sqrt(1 - ab) * n
                frac = (v + 1) / 2
                pvar = math.exp(frac * math.log(b) + (1 - frac) * math.log(bt_c))
                x0_hat = (xt - math.sqrt(1 - ab) * e) / math.sqrt(ab)
                pmean = (math.sqrt(ab_prev) * b * x0_hat + math.sqrt(1 - b) * (1 - ab_prev) * xt) / (1 - ab)
                if step == 0:
                    s = math.sqrt(pvar)
                    cdf = lambda z: 0.5 * math.erfc(-z / math.sqrt(2))  # noqa: E731
                    lo = -math.inf if x0v < -0.99 else (x0v - 1 / 255 - pmean) / s
                    hi = math.inf if x0v > 0.99 else (x0v + 1 / 255 - pmean) / s
                    total += -math.log(cdf(hi) - cdf(lo))
                else:
                    qm, qv = _bayes_posterior(x0v, xt, step, ref)
                    total += math.log(math.sqrt(pvar / qv)) + (qv + (qm - pmean) ** 2) / (2 * pvar) - 0.5
            want = total / 9 / LN2
            assert terms["vb"][i].item() == pytest.approx(want, rel=1e-8)
            assert terms["loss"][i].item() == pytest.approx(T * want, rel=1e-8)


def test_hybrid_loss_is_mse_plus_lambda_T_vb_with_mean_detached() -> None:
    g = torch.Generator().manual_seed(5)
    x0 = torch.rand(3, 2, 4, 4, generator=g) * 2 - 1
    out = (torch.randn(3, 4, 4, 4, generator=g) * 0.3).requires_grad_(True)
    t = torch.tensor([0, 9, 41])
    diff = create_diffusion(steps=T, schedule="cosine", loss="hybrid", vlb_weight=0.002)
    terms = diff.training_losses(_const_model(out), x0, t)
    assert torch.allclose(terms["loss"], terms["mse"] + 0.002 * T * terms["vb"])
    (grad_vb,) = torch.autograd.grad(terms["vb"].sum(), out, retain_graph=True)
    assert torch.all(grad_vb[:, :2] == 0), "L_vlb must not train the mean (stop-gradient)"
    assert grad_vb[:, 2:].abs().sum() > 0, "L_vlb must train the variance channels"
    (grad_mse,) = torch.autograd.grad(terms["mse"].sum(), out)
    assert torch.all(grad_mse[:, 2:] == 0) and grad_mse[:, :2].abs().sum() > 0
    # Contrast: with loss 'kl' the same vb term does reach the mean channels.
    kl_terms = create_diffusion(steps=T, schedule="cosine", loss="kl").training_losses(_const_model(out), x0, t)
    (grad_kl,) = torch.autograd.grad(kl_terms["vb"].sum(), out)
    assert grad_kl[:, :2].abs().sum() > 0


def test_mse_loss_reports_vb_without_gradient() -> None:
    out = torch.zeros(2, 2, 4, 4, requires_grad=True)
    terms = _diff("learned_range", "mse").training_losses(
        _const_model(out), torch.zeros(2, 1, 4, 4), torch.tensor([1, 2])
    )
    assert not terms["vb"].requires_grad and torch.isfinite(terms["vb"]).all()
    assert torch.equal(terms["loss"], terms["mse"])


def test_bf16_model_output_and_autocast_keep_float32_math() -> None:
    g = torch.Generator().manual_seed(6)
    x0 = torch.rand(2, 3, 4, 4, generator=g) * 2 - 1
    noise = torch.randn(2, 3, 4, 4, generator=g)
    out = torch.randn(2, 6, 4, 4, generator=g) * 0.3
    t = torch.tensor([0, 30])
    diff = _diff()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = diff.training_losses(_const_model(out.bfloat16()), x0.bfloat16(), t, noise=noise)
    x0_b = x0.bfloat16().float()
    ref = diff.training_losses(_const_model(out.bfloat16().float()), x0_b, t, noise=noise)
    for key in ("loss", "mse", "vb"):
        assert got[key].dtype == torch.float32
        assert torch.allclose(got[key], ref[key], rtol=1e-6, atol=1e-7), key


def test_bad_inputs_raise() -> None:
    diff = _diff()
    x0 = torch.zeros(2, 3, 4, 4)
    with pytest.raises(ValueError, match=r"expected \(2, 6, 4, 4\).*learned_range needs 2\*C"):
        diff.training_losses(_const_model(torch.zeros(2, 3, 4, 4)), x0, torch.tensor([0, 1]))
    with pytest.raises(RuntimeError, match=r"timesteps must lie in \[0, 49\]"):
        diff.training_losses(_const_model(torch.zeros(2, 6, 4, 4)), x0, torch.tensor([0, 50]))
    with pytest.raises(ValueError, match="loss 'hybrid' needs var_type 'learned_range'"):
        create_diffusion(steps=T, var_type="fixed_small", loss="hybrid")
    with pytest.raises(ValueError, match="unknown mean_type 'eps'"):
        create_diffusion(steps=T, mean_type="eps")


def test_create_diffusion_maps_strings_to_enums() -> None:
    diff = create_diffusion(steps=T, schedule="linear", mean_type="x0", var_type="fixed_large", loss="kl")
    assert diff.mean_type is ModelMeanType.START_X and diff.var_type is ModelVarType.FIXED_LARGE
    assert diff.loss_type is LossType.KL and diff.num_timesteps == T
    assert diff.vlb_weight == 0.001


# ------------------------------------------------------------------ bits/dim
def test_prior_bpd_matches_independent_kl() -> None:
    ref = _ref_tables()
    x0 = torch.tensor([[-1.0, 0.5], [1.0, 0.0]], dtype=torch.float64).reshape(2, 1, 1, 2)
    ab = ref["ab"][-1]
    want = [
        np.mean([0.5 * (ab * v * v + (1 - ab) - 1 - math.log(1 - ab)) for v in row]) / LN2
        for row in ([-1.0, 0.5], [1.0, 0.0])
    ]
    got = _diff().prior_bpd(x0)
    assert got.tolist() == pytest.approx(want, rel=1e-9)


def test_calc_bpd_loop_structure() -> None:
    diff = _diff()
    g = torch.Generator().manual_seed(7)
    x0 = torch.randint(0, 256, (2, 1, 4, 4), generator=g).float() * 2 / 255 - 1
    calls: list[tuple[int, int]] = []
    model = lambda x, t: torch.cat([0.1 * x, torch.zeros_like(x)], dim=1)  # noqa: E731
    out = diff.calc_bpd_loop(model, x0, progress=lambda i, n: calls.append((i, n)), generator=g)
    assert out["vb"].shape == (2, T) and out["mse"].shape == (2, T) and out["xstart_mse"].shape == (2, T)
    assert torch.allclose(out["total_bpd"], out["vb"].sum(1) + out["prior_bpd"])
    assert calls == [(i, T) for i in range(1, T + 1)]
    assert (out["vb"] > 0).all() and torch.isfinite(out["total_bpd"]).all()
    first = diff.calc_bpd_loop(model, x0, generator=torch.Generator().manual_seed(8))
    again = diff.calc_bpd_loop(model, x0, generator=torch.Generator().manual_seed(8))
    other = diff.calc_bpd_loop(model, x0, generator=torch.Generator().manual_seed(9))
    assert torch.equal(again["total_bpd"], first["total_bpd"])
    assert not torch.equal(other["total_bpd"], first["total_bpd"])
