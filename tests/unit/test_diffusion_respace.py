"""Respacing: kept timesteps, rebuilt betas, original timesteps for the model, K = T identity."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from trainer.diffusion import create_diffusion, respace, space_timesteps
from trainer.diffusion.respace import respace_betas
from trainer.diffusion.samplers import ddpm_sample_loop


def _linear_alpha_bar(T: int) -> np.ndarray:
    scale = 1000 / T
    betas = np.array([scale * 1e-4 + (scale * 0.02 - scale * 1e-4) * i / (T - 1) for i in range(T)])
    return np.cumprod(1 - betas)


def test_space_timesteps_specs() -> None:
    assert space_timesteps(100, "") == list(range(100))
    ten = space_timesteps(100, "10")
    assert len(ten) == 10 and ten[0] == 0 and ten[-1] == 99
    assert set(np.diff(ten).tolist()) <= {11, 10}
    sections = space_timesteps(300, "10,15,20")
    assert len(sections) == 45 == len(set(sections))
    assert [sum(lo <= s < lo + 100 for s in sections) for lo in (0, 100, 200)] == [10, 15, 20]
    assert {0, 99, 100, 199, 200, 299} <= set(sections)
    # uneven split: 10 = 4 + 3 + 3
    assert space_timesteps(10, "4,3,3") == list(range(10))
    assert space_timesteps(100, "ddim25") == list(range(0, 100, 4))
    assert space_timesteps(1000, "ddim50") == list(range(0, 1000, 20))
    assert space_timesteps(100, "1") == [0]  # a one-step section keeps its first step (improved-diffusion)
    assert space_timesteps(100, 5) == space_timesteps(100, "5")


@pytest.mark.parametrize(
    ("spec", "match"),
    [
        ("ddim40", "no integer stride gives exactly 40"),
        ("abc", "'abc' is not a step count"),
        ("0", "must be >= 1"),
        ("300", "section 0 has 100 steps, cannot keep 300"),
        ("10,x", "'x' is not a step count"),
    ],
)
def test_bad_specs_raise(spec: str, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        space_timesteps(100, spec)


def test_respaced_alpha_bar_is_the_kept_subset() -> None:
    T = 200
    base = create_diffusion(steps=T, schedule="linear", var_type="fixed_small", loss="mse")
    for spec in ("10", "ddim20", "3,7"):
        diff = respace(base, spec)
        kept = space_timesteps(T, spec)
        ab = _linear_alpha_bar(T)[kept]
        np.testing.assert_allclose(diff.alphas_cumprod, ab, rtol=1e-12)
        np.testing.assert_allclose(diff.betas, 1 - ab / np.concatenate([[1.0], ab[:-1]]), rtol=1e-10)
        assert diff.timestep_map.tolist() == kept and diff.num_timesteps == len(kept)
        assert diff.base_num_timesteps == T
    # composition keeps original indices
    twice = respace(respace(base, "50"), "10")
    assert twice.timestep_map.tolist() == [space_timesteps(T, "50")[i] for i in space_timesteps(50, "10")]
    assert (
        create_diffusion(steps=T, schedule="linear", var_type="fixed_small", loss="mse", respacing="10").num_timesteps
        == 10
    )


def test_k_equals_t_reproduces_the_unspaced_process_exactly() -> None:
    T = 60
    base = create_diffusion(steps=T, schedule="cosine", var_type="learned_range", loss="hybrid")
    same = respace(base, str(T))
    for name in ("betas", "alphas_cumprod", "posterior_variance", "posterior_log_variance_clipped"):
        assert np.array_equal(getattr(same, name), getattr(base, name)), name
    # The rebuild formula itself reproduces β to rounding.
    np.testing.assert_allclose(respace_betas(base.alphas_cumprod, list(range(T))), base.betas, rtol=1e-9)
    model = lambda x, t: torch.cat([0.3 * x + 0.01 * t.view(-1, 1, 1, 1), 0.2 * torch.ones_like(x)], 1)  # noqa: E731
    noise = torch.randn(3, 2, 4, 4, generator=torch.Generator().manual_seed(0))
    runs = [
        ddpm_sample_loop(model, d, (3, 2, 4, 4), noise=noise, generator=torch.Generator().manual_seed(1))
        for d in (base, same)
    ]
    assert torch.equal(runs[0], runs[1])
    x0 = torch.rand(3, 2, 4, 4) * 2 - 1
    t = torch.tensor([0, 7, 59])
    n = torch.randn(3, 2, 4, 4)
    a, b = base.training_losses(model, x0, t, noise=n), same.training_losses(model, x0, t, noise=n)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_half_to_even_running_stride_as_improved_diffusion() -> None:
    # Figures read off improved-diffusion's space_timesteps (issue 19): round() of the running sum of the
    # stride, half to even. Rounding half up would keep 667/3333 and 167/833 instead.
    k4000 = space_timesteps(4000, "25")
    assert 666 in k4000 and 3332 in k4000 and 667 not in k4000 and 3333 not in k4000
    k1000 = space_timesteps(1000, "25")
    assert 166 in k1000 and 832 in k1000 and 167 not in k1000 and 833 not in k1000
    # The same rule derived here in exact rational arithmetic, ties to even, on the running float sum.
    stride = 3999 / 24
    position, expected = 0.0, []
    for _ in range(25):
        expected.append(round(position))
        position += stride
    assert k4000 == expected
    assert space_timesteps(300, "1,1,1") == [0, 100, 200]


def test_model_receives_original_timesteps() -> None:
    T = 100
    base = create_diffusion(steps=T, schedule="linear", var_type="fixed_small", loss="mse")
    seen: list[list[int]] = []

    def model(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        assert t.dtype == torch.long
        seen.append(t.tolist())
        return torch.zeros_like(x)

    ddpm_sample_loop(model, respace(base, "5"), (2, 1, 2, 2), generator=torch.Generator().manual_seed(0))
    assert seen == [[s, s] for s in (99, 74, 50, 25, 0)]
    assert [math.floor(i * 99 / 4 + 0.5) for i in range(5)] == [0, 25, 50, 74, 99]
