"""Samplers on 1-D Gaussian data, where the optimal ε-predictor, the reverse variance and the
probability-flow map are known in closed form.

For x_0 ~ N(μ, s²): E[ε | x_t] = √(1−ᾱ)(x_t − √ᾱ μ)/(ᾱ s² + 1 − ᾱ), and the probability-flow ODE
in σ = √((1−ᾱ)/ᾱ) maps x(σ) = μ + (x(σ_max) − μ)·√(s² + σ²)/√(s² + σ_max²).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from trainer.diffusion import create_diffusion
from trainer.diffusion.edm import EpsDenoiser, edm_sample, edm_sigma_levels
from trainer.diffusion.respace import respace
from trainer.diffusion.samplers import ddim_invert, ddim_sigma, ddim_step, generate, langevin_step, sde_step

T = 200
MU, S = 0.1, 0.3
N = 20_000


def _cosine_tables(T: int) -> dict[str, np.ndarray]:
    f = [math.cos((i / T + 0.008) / 1.008 * math.pi / 2) ** 2 for i in range(T + 1)]
    betas = np.array([min(1 - f[i + 1] / f[i], 0.999) for i in range(T)])
    ab = np.cumprod(1 - betas)
    return {"betas": betas, "ab": ab, "ab_prev": np.concatenate([[1.0], ab[:-1]])}


REF = _cosine_tables(T)


class GaussianModel:
    """Bayes-optimal model for x_0 ~ N(mu, s²) per pixel, on the original T-step schedule.

    kind 'eps' returns E[ε | x_t]; 'x0' returns E[x_0 | x_t]; with ``learned`` it appends v so that
    the learned-range variance equals the exact reverse variance Var[x_{t-1} | x_t]."""

    def __init__(
        self,
        kind: str = "eps",
        learned: bool = False,
        mu: float = MU,
        s: float = S,
        tables: dict[str, np.ndarray] | None = None,
    ) -> None:
        self.kind, self.learned, self.mu, self.s = kind, learned, mu, s
        self.ref = REF if tables is None else tables

    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        assert t.dtype == torch.long
        ref = self.ref
        idx = t.cpu().numpy()
        shape = (-1,) + (1,) * (x.ndim - 1)
        ab = torch.tensor(ref["ab"][idx], dtype=torch.float64).reshape(shape)
        xd = x.double()
        denom = ab * self.s**2 + 1 - ab
        if self.kind == "eps":
            out = torch.sqrt(1 - ab) * (xd - torch.sqrt(ab) * self.mu) / denom
        else:
            out = (torch.sqrt(ab) * self.s**2 * xd + (1 - ab) * self.mu) / denom
        if self.learned:
            b = torch.tensor(ref["betas"][idx], dtype=torch.float64).reshape(shape)
            abp = torch.tensor(ref["ab_prev"][idx], dtype=torch.float64).reshape(shape)
            bt = b * (1 - abp) / (1 - ab)
            bt1 = ref["betas"][1] * (1 - ref["ab"][0]) / (1 - ref["ab"][1])
            min_log = torch.where(t.reshape(shape) == 0, torch.full_like(bt, math.log(bt1)), torch.log(bt))
            var_x0 = self.s**2 * (1 - ab) / denom
            exact = bt + (torch.sqrt(abp) * b / (1 - ab)) ** 2 * var_x0
            frac = (torch.log(exact) - min_log) / (torch.log(b) - min_log)
            out = torch.cat([out, (2 * frac - 1).expand_as(out)], dim=1)
        return out.to(x.dtype)


def _diff(var: str = "learned_range", mean: str = "epsilon", steps: int = T):
    loss = "hybrid" if var == "learned_range" else "mse"
    return create_diffusion(steps=steps, schedule="cosine", mean_type=mean, var_type=var, loss=loss)


def _flow_map(z: torch.Tensor, sigma_max: float) -> torch.Tensor:
    """Exact probability-flow image of VP noise z started at σ_max (x_ve = √(1+σ²)·z)."""
    x_ve = z.double() * math.sqrt(1 + sigma_max**2)
    return MU + (x_ve - MU) * S / math.sqrt(S**2 + sigma_max**2)


@pytest.mark.parametrize(
    ("var", "mean", "method", "respacing", "kw"),
    [
        ("learned_range", "epsilon", "ddpm", "", {}),  # Improved-DDPM ancestral, all steps
        ("learned_range", "epsilon", "ddpm", "50", {}),  # ... respaced
        ("fixed_large", "epsilon", "ddpm", "", {}),  # DDPM ancestral, fixed variance
        ("fixed_small", "epsilon", "ddim", "", {"eta": 0.0}),
        ("fixed_small", "x0", "ddim", "", {"eta": 0.5}),
        ("learned_range", "epsilon", "euler", "", {"sigma_schedule": "timesteps"}),
        ("learned_range", "epsilon", "heun", "50", {}),
        ("fixed_small", "x0", "heun", "100", {"churn": 10.0}),
        ("fixed_small", "epsilon", "sde", "", {}),  # reverse VP SDE, Euler-Maruyama
    ],
)
def test_sampler_reproduces_gaussian_mean_and_variance(var, mean, method, respacing, kw) -> None:
    model = GaussianModel("eps" if mean == "epsilon" else "x0", learned=var == "learned_range")
    x = generate(
        model,
        _diff(var, mean),
        method,
        respacing,
        (N, 1, 1, 1),
        device="cpu",
        generator=torch.Generator().manual_seed(11),
        clip_denoised=False,
        **kw,
    )
    assert x.dtype == torch.float32 and x.shape == (N, 1, 1, 1)
    se_mean = S / math.sqrt(N)
    assert abs(x.mean().item() - MU) < 5 * se_mean
    assert x.var().item() / S**2 == pytest.approx(1.0, abs=0.05)


def test_fixed_small_ddpm_converges_with_many_steps() -> None:
    """β̃ is the small-step limit: with T = 1000 fixed-small ancestral sampling is right."""
    x = generate(
        GaussianModel(tables=_cosine_tables(1000)),
        _diff("fixed_small", steps=1000),
        "ddpm",
        "",
        (5000, 1, 1, 1),
        generator=torch.Generator().manual_seed(3),
        clip_denoised=False,
    )
    assert abs(x.mean().item() - MU) < 5 * S / math.sqrt(5000)
    assert x.var().item() / S**2 == pytest.approx(1.0, abs=0.06)


def test_deterministic_samplers_follow_the_exact_flow_map() -> None:
    z = torch.randn(4000, 1, 1, 1, generator=torch.Generator().manual_seed(5))
    diff = _diff("fixed_small")
    sigma_top = math.sqrt((1 - REF["ab"][-1]) / REF["ab"][-1])
    exact = _flow_map(z, sigma_top)
    ddim = generate(GaussianModel(), diff, "ddim", "", z.shape, noise=z, clip_denoised=False)
    assert (ddim.double() - exact).abs().max() < 0.02
    # EDM samplers: error shrinks ~1/N for Euler and ~1/N² for Heun.
    errors = {}
    for method, heun in (("euler", False), ("heun", True)):
        for n in (20, 40):
            levels = edm_sigma_levels(diff, n, snap=False)
            x = edm_sample(EpsDenoiser(GaussianModel(), diff, clip_denoised=False), levels, z.shape, noise=z, heun=heun)
            errors[method, n] = (x.double() - _flow_map(z, float(levels[0]))).abs().max().item()
    assert errors["euler", 40] < errors["euler", 20] / 1.6
    assert errors["heun", 40] < errors["heun", 20] / 3.0
    assert errors["heun", 40] < 0.01 and errors["heun", 40] < errors["euler", 40] / 5


def test_ddim_is_euler_on_the_same_sigma_levels() -> None:
    """DDIM (η = 0) is the Euler method of the flow ODE in σ (EDM sec. 4 / DDIM sec. 4.3): on the
    same levels the two samplers agree up to rounding."""
    diff = _diff("fixed_small")
    z = torch.randn(500, 1, 1, 1, generator=torch.Generator().manual_seed(6))
    ddim = generate(GaussianModel(), diff, "ddim", "40", z.shape, noise=z, clip_denoised=False)
    euler = generate(
        GaussianModel(),
        diff,
        "euler",
        "40",
        z.shape,
        noise=z,
        clip_denoised=False,
        sigma_schedule="timesteps",
    )
    assert torch.allclose(ddim, euler, atol=1e-4)


def test_ddim_eta_one_is_the_ddpm_posterior() -> None:
    diff = _diff("fixed_small")
    ref = REF
    t = torch.tensor([1, 10, 100, 199])
    like = torch.zeros(4, 1, 1, 1, dtype=torch.float64)
    bt = ref["betas"] * (1 - ref["ab_prev"]) / (1 - ref["ab"])
    got = ddim_sigma(diff, t, 1.0, like).flatten() ** 2
    np.testing.assert_allclose(got.numpy(), bt[t.numpy()], rtol=1e-10)
    assert torch.all(ddim_sigma(diff, t, 0.0, like) == 0)
    # One DDIM(η = 1) step with the same noise is the ancestral DDPM step with Σ = β̃.
    g = torch.Generator().manual_seed(2)
    x = torch.randn(4, 2, 3, 3, generator=g, dtype=torch.float64)
    noise = torch.randn(4, 2, 3, 3, generator=g, dtype=torch.float64)
    model = GaussianModel()
    a = ddim_step(model, diff, x, t, eta=1.0, clip_denoised=False, noise=noise)["sample"]
    b = diff.p_sample(model, x, t, clip_denoised=False, noise=noise)["sample"]
    assert torch.allclose(a, b, rtol=1e-9, atol=1e-11)


def test_ddim_inversion_round_trip() -> None:
    diff = _diff("fixed_small")
    x0 = torch.randn(2000, 1, 1, 1, generator=torch.Generator().manual_seed(4)) * S + MU
    errs = []
    for refine in (0, 3):
        x_T = ddim_invert(GaussianModel(), diff, x0, "", refine=refine)
        assert abs(x_T.std().item() - 1.0) < 0.1  # lands on the prior
        back = generate(GaussianModel(), diff, "ddim", "", x0.shape, noise=x_T, clip_denoised=False)
        errs.append((back - x0).abs().max().item())
    assert errs[0] < 0.05
    assert errs[1] < 2e-3 and errs[1] < errs[0] / 10


def test_fixed_seed_progress_and_clipping() -> None:
    diff = _diff("learned_range")
    far = GaussianModel(learned=True, mu=0.9, s=0.3)  # a third of the mass lies beyond 1
    shape = (64, 1, 2, 2)
    for method, kw in (("ddpm", {}), ("ddim", {"eta": 1.0}), ("heun", {"churn": 20.0}), ("euler", {})):
        calls: list[tuple[int, int]] = []
        a = generate(
            far,
            diff,
            method,
            "10",
            shape,
            generator=torch.Generator().manual_seed(0),
            progress=lambda i, n, c=calls: c.append((i, n)),
            **kw,
        )
        b = generate(far, diff, method, "10", shape, generator=torch.Generator().manual_seed(0), **kw)
        c = generate(far, diff, method, "10", shape, generator=torch.Generator().manual_seed(1), **kw)
        assert torch.equal(a, b) and not torch.equal(a, c), method
        n = calls[0][1]
        assert calls == [(i, n) for i in range(1, n + 1)] and n <= 10
        assert a.abs().max() <= 1.0
        raw = generate(
            far,
            diff,
            method,
            "10",
            shape,
            generator=torch.Generator().manual_seed(0),
            clip_denoised=False,
            **kw,
        )
        assert raw.max() > 1.0
    # churn makes Heun stochastic given the same starting noise
    z = torch.randn(shape)
    h1 = generate(far, diff, "heun", "10", shape, noise=z, churn=20.0, generator=torch.Generator().manual_seed(0))
    h2 = generate(far, diff, "heun", "10", shape, noise=z, churn=20.0, generator=torch.Generator().manual_seed(1))
    h3 = generate(far, diff, "heun", "10", shape, noise=z, generator=torch.Generator().manual_seed(1))
    h4 = generate(far, diff, "heun", "10", shape, noise=z, generator=torch.Generator().manual_seed(2))
    assert not torch.equal(h1, h2) and torch.equal(h3, h4)
    with pytest.raises(ValueError, match="unknown sampling method 'plms'"):
        generate(far, diff, "plms", "10", shape)


@pytest.mark.parametrize("schedule_var", ["learned_range", "fixed_small"])
def test_bits_per_dim_of_the_analytic_model_meets_the_entropy_bound(schedule_var: str) -> None:
    """Data: N(μ, s²) quantised to the 256 bins. The exact model (Bayes mean + exact reverse
    variance) makes the VLB tight: bits/dim ≈ the entropy of the quantised data. A fixed β̃
    variance is a looser bound."""
    mu, s = 0.1, 0.25
    edges = [-math.inf] + [-1 + (2 * k + 1) / 255 for k in range(255)] + [math.inf]
    cdf = [0.5 * math.erfc(-(e - mu) / (s * math.sqrt(2))) for e in edges]
    p = np.diff(cdf)
    entropy_bits = -(p[p > 0] * np.log2(p[p > 0])).sum()
    g = torch.Generator().manual_seed(0)
    idx = torch.multinomial(torch.tensor(p), 16 * 32 * 32, replacement=True, generator=g)
    x0 = (idx.float() * 2 / 255 - 1).reshape(16, 1, 32, 32)
    model = GaussianModel(learned=schedule_var == "learned_range", mu=mu, s=s)
    out = _diff(schedule_var).calc_bpd_loop(model, x0, clip_denoised=False, generator=g)
    bpd = out["total_bpd"].mean().item()
    se = out["total_bpd"].std().item() / 4
    if schedule_var == "learned_range":
        assert abs(bpd - entropy_bits) < max(4 * se, 0.03), (bpd, entropy_bits)
    else:
        assert bpd > entropy_bits + 0.3


# ------------------------------------------------------------- score-based (Song et al. 2021)
def test_sde_and_langevin_steps_match_a_float64_derivation() -> None:
    """One Euler-Maruyama step of the reverse VP SDE, x + ½βx + β·s + √β z with s = −ε̂/√(1−ᾱ) (no noise at t = 0),
    and one Langevin step x + εs + √(2ε) z with ε = 2(1−β)(snr‖z‖/‖s‖)², per sample; tables derived here."""
    g = torch.Generator().manual_seed(21)
    x = torch.randn(3, 2, 4, 4, generator=g, dtype=torch.float64)
    z = torch.randn(3, 2, 4, 4, generator=g, dtype=torch.float64)
    model = GaussianModel()
    for spec in ("", "10"):
        diff = respace(_diff("fixed_small"), spec) if spec else _diff("fixed_small")
        kept = list(diff.timestep_map)
        ab_kept = REF["ab"][kept]
        betas = 1 - ab_kept / np.concatenate([[1.0], ab_kept[:-1]])
        t = torch.tensor([0, 5, diff.num_timesteps - 1])
        eps = model(x, diff.map_timesteps(t))
        got = sde_step(model, diff, x, t, clip_denoised=False, noise=z)["sample"]
        got_lv = langevin_step(model, diff, x, t, snr=0.2, clip_denoised=False, noise=z)
        for i, step in enumerate(t.tolist()):
            b, ab = betas[step], ab_kept[step]
            score = -eps[i] / math.sqrt(1 - ab)
            want = x[i] + 0.5 * b * x[i] + b * score + (math.sqrt(b) * z[i] if step != 0 else 0.0)
            assert torch.allclose(got[i], want, rtol=1e-9, atol=1e-11), (spec, step)
            size = 2 * (1 - b) * (0.2 * z[i].norm().item() / score.norm().item()) ** 2
            want_lv = x[i] + size * score + math.sqrt(2 * size) * z[i]
            assert torch.allclose(got_lv[i], want_lv, rtol=1e-9, atol=1e-11), (spec, step)


def test_langevin_corrector_keeps_the_exact_marginal() -> None:
    """Langevin steps with the exact score leave the marginal q(x_t) invariant (up to a bias of order the step
    size; 1024 pixels per sample, as the per-sample step size assumes many dimensions): from exact samples of x_t,
    20 corrector steps keep its mean and variance."""
    g = torch.Generator().manual_seed(13)
    diff = _diff("fixed_small")
    step = 100
    ab = REF["ab"][step]
    x0 = MU + S * torch.randn(200, 1, 32, 32, generator=g)
    x = math.sqrt(ab) * x0 + math.sqrt(1 - ab) * torch.randn(200, 1, 32, 32, generator=g)
    t = torch.full((200,), step)
    for _ in range(20):
        x = langevin_step(GaussianModel(), diff, x, t, snr=0.1, clip_denoised=False, generator=g)
    var = ab * S**2 + 1 - ab
    assert abs(x.mean().item() - math.sqrt(ab) * MU) < 5 * math.sqrt(var / x.numel())
    assert x.var().item() / var == pytest.approx(1.0, abs=0.03)


def test_predictor_corrector_reproduces_gaussian_mean_and_variance() -> None:
    # 1024 pixels per sample: the corrector's step size uses per-sample norms, meant for many dimensions (with 64,
    # their spread biases the variance by several %). Song et al.'s snr 0.16.
    x = generate(
        GaussianModel(),
        _diff("fixed_small"),
        "pc",
        "",
        (200, 1, 32, 32),
        generator=torch.Generator().manual_seed(12),
        clip_denoised=False,
        snr=0.16,
    )
    n = x.numel()
    assert abs(x.mean().item() - MU) < 5 * S / math.sqrt(n)
    assert x.var().item() / S**2 == pytest.approx(1.0, abs=0.06)
