"""The bits/dim estimate of ``trainer/evaluation/periodic.py`` against the exact bound, and its config keys."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from trainer.config import ConfigError, ModelConfig, load_config
from trainer.diffusion import create_diffusion
from trainer.evaluation.periodic import GROUPS, bpd_terms, draw_timesteps, strata, term_group, weighted_sums
from trainer.models.unet import build_unet

T = 20


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = ModelConfig(channels=16, norm_groups=8, channel_mult=[1, 2], num_res_blocks=1, attention_resolutions=[4])
    net = build_unet(cfg, image_size=8, in_channels=1, learn_sigma=True)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():  # zero-initialised output layers would make every prediction 0: perturb them all
        for p in net.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    return net.eval()


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    levels = torch.randint(0, 256, (3, 1, 8, 8), generator=torch.Generator().manual_seed(2))
    return levels.float() / 127.5 - 1.0  # on the pixel grid, as the data stream gives them


def _diffusion():
    return create_diffusion(steps=T, schedule="cosine", var_type="learned_range", loss="hybrid")


@pytest.mark.parametrize(("steps", "count"), [(20, 19), (20, 5), (20, 7), (4000, 50), (1000, 50), (7, 3), (2, 1)])
def test_strata_partition_one_to_T_minus_one(steps: int, count: int) -> None:
    bounds = strata(steps, count)
    assert bounds[0] == (0, 1) and len(bounds) == count + 1
    assert all(a < b for a, b in bounds)
    assert [b for _, b in bounds[:-1]] == [a for a, _ in bounds[1:]] and bounds[-1][1] == steps  # contiguous
    sizes = [b - a for a, b in bounds[1:]]
    assert sum(sizes) == steps - 1 and max(sizes) - min(sizes) <= 1  # equal, up to one


def test_strata_capped_at_every_timestep() -> None:
    assert strata(20, 19) == strata(20, 500) == [(t, t + 1) for t in range(20)]
    with pytest.raises(ValueError):
        strata(20, 0)


def test_drawn_timesteps_are_uniform_within_their_stratum() -> None:
    bounds = strata(20, 3)  # (0, 1), then strata of 6 timesteps
    ts = draw_timesteps(bounds, 6000, torch.Generator().manual_seed(0))
    assert ts.shape == (6000, 4) and torch.equal(ts[:, 0], torch.zeros(6000, dtype=torch.long))
    for j, (a, b) in enumerate(bounds):
        counts = torch.bincount(ts[:, j] - a, minlength=b - a)
        assert counts.numel() == b - a and counts.min() > 0.8 * 6000 / (b - a)  # every t, about equally often
    again = draw_timesteps(bounds, 6000, torch.Generator().manual_seed(0))
    assert torch.equal(ts, again)  # fixed by the seed: the same timesteps at every evaluation


def test_stratified_estimate_is_unbiased() -> None:
    """E over the draws of Σ_j size_j · L_{t_j} is Σ_t L_t, for any table of terms (here a steep one)."""
    T = 40
    table = torch.tensor([3.0 / (1 + t) ** 1.5 for t in range(T)], dtype=torch.float64)
    bounds = strata(T, 6)
    ts = draw_timesteps(bounds, 200_000, torch.Generator().manual_seed(1))
    prior = torch.zeros(ts.shape[0], dtype=torch.float64)
    est = weighted_sums(table[ts], prior, ts, bounds, T)["total"]
    assert est.mean().item() == pytest.approx(table.sum().item(), rel=2e-3)
    midpoints = torch.tensor([[(a + b - 1) // 2 for a, b in bounds]])
    biased = weighted_sums(table[midpoints], prior[:1], midpoints, bounds, T)["total"].item()
    assert abs(biased - table.sum().item()) > 0.05 * table.sum().item()  # what a fixed midpoint would cost


def test_term_groups_are_the_quarters_of_evaluate_py() -> None:
    assert [term_group(t, 4000) for t in (0, 1, 999, 1000, 1999, 2000, 2999, 3000, 3999)] == [
        "t0", "q1", "q1", "q2", "q2", "q3", "q3", "q4", "q4"
    ]  # fmt: skip
    assert [term_group(t, 4) for t in range(4)] == ["t0", "q2", "q3", "q4"]  # [1, T/4) is empty for T = 4
    for steps in (4, 7, 20, 4000):  # weighted_sums groups its terms the same way
        ts = torch.arange(steps)[None, :]
        sums = weighted_sums(torch.ones(1, steps), torch.zeros(1), ts, [(t, t + 1) for t in range(steps)], steps)
        expected = {g: float(sum(term_group(t, steps) == g for t in range(steps))) for g in GROUPS}
        assert {g: sums[g].item() for g in GROUPS} == expected


def test_every_timestep_as_a_stratum_is_the_exact_bound(model: torch.nn.Module, images: torch.Tensor) -> None:
    """K = T-1 with one generator: the same noise draws, in the same order, as calc_bpd_loop."""
    diffusion = _diffusion()
    exact = diffusion.calc_bpd_loop(model, images, generator=torch.Generator().manual_seed(7))
    bounds = strata(T, T - 1)
    ts = draw_timesteps(bounds, images.shape[0], torch.Generator().manual_seed(3))
    assert torch.equal(ts, torch.arange(T).expand(images.shape[0], T))
    terms, prior = bpd_terms(diffusion, model, images, ts, generator=torch.Generator().manual_seed(7))
    assert torch.equal(terms.float(), exact["vb"])  # bit for bit, term by term
    assert torch.equal(prior.float(), exact["prior_bpd"])
    est = weighted_sums(terms, prior, ts, bounds, T)
    torch.testing.assert_close(est["total"].float(), exact["total_bpd"], rtol=1e-6, atol=0)
    parts = sum(est[g] for g in GROUPS) + est["prior"]
    torch.testing.assert_close(parts, est["total"], rtol=1e-12, atol=0)


@pytest.mark.parametrize("count", [1, 4, 6])
def test_fewer_strata_weight_exactly_the_chosen_terms(model: torch.nn.Module, images: torch.Tensor, count: int) -> None:
    """The estimate is Σ_j size_j · L_{t_ij} + L_prior, with each chosen term recomputed here image by image
    in float64 (a float64 copy of the model, the same noise) and summed with numpy."""
    diffusion = _diffusion()

    def noise(j: int) -> torch.Generator:
        return torch.Generator().manual_seed(1000 + j)

    bounds = strata(T, count)
    ts = draw_timesteps(bounds, images.shape[0], torch.Generator().manual_seed(4))
    terms, prior = bpd_terms(diffusion, model, images, ts, generator=noise)
    est = weighted_sums(terms, prior, ts, bounds, T)

    model64 = copy.deepcopy(model).double()
    x64 = images.double()
    expected = np.zeros(images.shape[0])
    for j, (a, b) in enumerate(bounds):
        eps = torch.randn(images.shape, generator=noise(j)).double()
        for i in range(images.shape[0]):
            t = ts[i, j : j + 1]
            assert a <= int(t) < b
            x_t = diffusion.q_sample(x64[i : i + 1], t, noise=eps[i : i + 1])
            out = diffusion.model_output(model64, x_t, t)
            vb, _ = diffusion.vb_terms_bpd(out, x64[i : i + 1], x_t, t, clip_denoised=True)
            np.testing.assert_allclose(terms[i, j].item(), vb.item(), rtol=1e-4)
            expected[i] += (b - a) * vb.item()
    expected += diffusion.prior_bpd(x64).numpy()
    np.testing.assert_allclose(est["total"].numpy(), expected, rtol=1e-4)
    assert np.all(est["total"].numpy() > 0)


def test_estimate_leaves_the_global_rng_alone(model: torch.nn.Module, images: torch.Tensor) -> None:
    diffusion = _diffusion()
    ts = draw_timesteps(strata(T, 4), images.shape[0], torch.Generator().manual_seed(0))
    before = torch.get_rng_state()
    a, _ = bpd_terms(diffusion, model, images, ts, generator=lambda j: torch.Generator().manual_seed(j))
    assert torch.equal(torch.get_rng_state(), before)
    torch.manual_seed(123)  # another global state: the same numbers
    b, _ = bpd_terms(diffusion, model, images, ts, generator=lambda j: torch.Generator().manual_seed(j))
    assert torch.equal(a, b)


# ------------------------------------------------------------------------------------ config keys


def test_eval_keys_default_off() -> None:
    cfg = load_config(None)
    t = cfg.train
    assert (t.eval_every, t.eval_images, t.eval_timesteps, t.eval_fid_samples) == (0, 256, 50, 2000)
    assert (t.eval_features, t.eval_reference, t.eval_sample_steps) == (None, None, "ddim50")
    # Off, the FID respacing is not checked against a small T.
    assert load_config(None, ["diffusion.steps=20", "sample.steps=5"]).train.eval_sample_steps == "ddim50"


@pytest.mark.parametrize("given", ["train.eval_features=net.pt", "train.eval_reference=ref.npz"])
def test_features_and_reference_go_together(given: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(None, [given])
    msg = str(err.value)
    assert "\n" not in msg and "eval_features" in msg and "eval_reference" in msg and "neither" in msg


def test_fid_respacing_checked_against_T_when_on() -> None:
    on = ["train.eval_every=10", "train.eval_features=net.pt", "train.eval_reference=ref.npz", "sample.steps=5"]
    with pytest.raises(ConfigError, match=r"train\.eval_sample_steps: .*'ddim30'"):
        load_config(None, [*on, "diffusion.steps=100", "train.eval_sample_steps=ddim30"])
    assert load_config(None, [*on, "diffusion.steps=100", "train.eval_sample_steps=10"]).train.eval_sample_steps == "10"


@pytest.mark.parametrize("bad", ["train.eval_every=-1", "train.eval_images=0", "train.eval_timesteps=0"])
def test_eval_counts_are_checked(bad: str) -> None:
    with pytest.raises(ConfigError, match=bad.split("=")[0]):
        load_config(None, [bad])
