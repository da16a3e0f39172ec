"""Label dropout and classifier-free guidance (trainer/guidance.py), on a tiny float64 UNet."""

from __future__ import annotations

import math

import pytest
import torch

from trainer.config import ConfigError, ModelConfig, config_from_dict
from trainer.diffusion import create_diffusion
from trainer.diffusion.samplers import generate
from trainer.guidance import ClassifierFreeGuidance, drop_labels
from trainer.models.unet import build_unet

torch.set_num_threads(1)

CLASSES = 10
IMAGE, CHANNELS = 8, 1


def tiny_model(learn_sigma: bool = True, seed: int = 0) -> torch.nn.Module:
    """A float64 class-conditional UNet with its zero-initialised layers randomised (non-trivial outputs)."""
    torch.manual_seed(seed)
    cfg = ModelConfig(
        channels=16,
        norm_groups=8,
        channel_mult=[1, 2],
        num_res_blocks=1,
        attention_resolutions=[4],
        num_heads=2,
        dropout=0.0,
        class_cond=True,
    )
    model = build_unet(cfg, IMAGE, CHANNELS, learn_sigma, num_classes=CLASSES).double().eval()
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in model.parameters():
            if not p.any():
                p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * 0.05)
            if p.shape[0] == CLASSES + 1 and p.ndim == 2:  # class embedding: make the classes differ clearly
                p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype))
    return model


def inputs(n: int = 6, seed: int = 3) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, CHANNELS, IMAGE, IMAGE, generator=gen, dtype=torch.float64)
    t = torch.randint(0, 100, (n,), generator=gen)
    y = torch.randint(0, CLASSES, (n,), generator=gen)
    return x, t, y


# --------------------------------------------------------------------------- label dropout


def test_drop_labels_p0_returns_labels_unchanged_without_drawing() -> None:
    y = torch.arange(100) % CLASSES
    state = torch.get_rng_state()
    out = drop_labels(y, 0.0, CLASSES)
    assert out is y
    assert torch.equal(torch.get_rng_state(), state)  # the RNG stream is untouched


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_drop_labels_statistics(p: float) -> None:
    n = 200_000
    y = torch.arange(n) % CLASSES
    out = drop_labels(y, p, CLASSES, generator=torch.Generator().manual_seed(0))
    dropped = out == CLASSES
    # Kept labels are untouched, dropped ones are exactly the null class.
    assert torch.equal(out[~dropped], y[~dropped])
    # Binomial(n, p): the fraction lies within 5 standard deviations of p ...
    frac = dropped.double().mean().item()
    assert abs(frac - p) < 5 * math.sqrt(p * (1 - p) / n)
    # ... and independently of the class (each class is dropped at the same rate).
    per_class = torch.stack([dropped[y == c].double().mean() for c in range(CLASSES)])
    assert (per_class - p).abs().max().item() < 5 * math.sqrt(p * (1 - p) / (n / CLASSES))
    assert out.dtype == y.dtype and out.shape == y.shape


def test_drop_labels_uses_the_global_rng_reproducibly() -> None:
    y = torch.arange(1000) % CLASSES
    torch.manual_seed(7)
    a = drop_labels(y, 0.3, CLASSES)
    torch.manual_seed(7)
    b = drop_labels(y, 0.3, CLASSES)
    c = drop_labels(y, 0.3, CLASSES)
    assert torch.equal(a, b) and not torch.equal(b, c)
    assert drop_labels(y, 1.0, CLASSES).eq(CLASSES).all()


@pytest.mark.parametrize("p", [-0.1, 1.5, float("nan")])
def test_drop_labels_rejects_bad_probability(p: float) -> None:
    with pytest.raises(ValueError, match="label dropout probability"):
        drop_labels(torch.zeros(3, dtype=torch.long), p, CLASSES)


def test_config_label_dropout_default_and_range() -> None:
    assert ModelConfig().label_dropout == 0.1
    assert config_from_dict({"model": {"class_cond": True, "label_dropout": 0.0}}).model.label_dropout == 0.0
    for bad in (1.0, -0.1, 2):
        with pytest.raises(ConfigError, match=r"model\.label_dropout: must lie in \[0, 1\)"):
            config_from_dict({"model": {"label_dropout": bad}})


# --------------------------------------------------------------------------- guidance


@pytest.mark.parametrize("learn_sigma", [True, False])
@pytest.mark.parametrize("scale", [0.0, 0.5, 3.0])
def test_guidance_matches_two_separate_calls(learn_sigma: bool, scale: float) -> None:
    model = tiny_model(learn_sigma)
    x, t, y = inputs()
    with torch.no_grad():
        cond = model(x, t, y)
        uncond = model(x, t, torch.full_like(y, CLASSES))
        got = ClassifierFreeGuidance(model, scale, CLASSES)(x, t, y)
    assert got.shape == cond.shape and got.dtype == torch.float64
    assert not torch.allclose(cond[:, :CHANNELS], uncond[:, :CHANNELS], atol=1e-3)  # the labels matter
    expected = uncond[:, :CHANNELS] + scale * (cond[:, :CHANNELS] - uncond[:, :CHANNELS])
    torch.testing.assert_close(got[:, :CHANNELS], expected, rtol=0, atol=1e-12)
    if scale == 0.0:
        torch.testing.assert_close(got[:, :CHANNELS], uncond[:, :CHANNELS], rtol=0, atol=1e-12)
    if learn_sigma:  # the variance channels are the conditional prediction's
        torch.testing.assert_close(got[:, CHANNELS:], cond[:, CHANNELS:], rtol=0, atol=1e-12)


class CountingModel(torch.nn.Module):
    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model, self.batches = model, []
        self.num_classes = getattr(model, "num_classes", None)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        self.batches.append((x.shape[0], None if y is None else y.clone()))
        return self.model(x, t, y)


def test_guidance_scale_one_is_the_conditional_model_exactly() -> None:
    model = CountingModel(tiny_model())
    x, t, y = inputs()
    with torch.no_grad():
        cond = model(x, t, y)
        got = ClassifierFreeGuidance(model, 1.0, CLASSES)(x, t, y)
    assert torch.equal(got, cond)
    assert [b for b, _ in model.batches] == [len(x), len(x)]  # no doubled batch


def test_guidance_makes_one_batched_call() -> None:
    model = CountingModel(tiny_model())
    x, t, y = inputs()
    with torch.no_grad():
        ClassifierFreeGuidance(model, 2.0, CLASSES)(x, t, y)
        ClassifierFreeGuidance(model, 2.0, CLASSES)(x, t)  # no labels: unconditional, one call
    (n, labels), (n_uncond, labels_uncond) = model.batches
    assert n == 2 * len(x) and torch.equal(labels, torch.cat([y, torch.full_like(y, CLASSES)]))
    assert n_uncond == len(x) and labels_uncond.eq(CLASSES).all()


def test_guidance_rejects_bad_arguments() -> None:
    model = tiny_model()
    with pytest.raises(ValueError, match="guidance_scale"):
        ClassifierFreeGuidance(model, -1.0, CLASSES)
    with pytest.raises(ValueError, match="guidance_scale"):
        ClassifierFreeGuidance(model, float("inf"), CLASSES)
    with pytest.raises(ValueError, match="null class"):
        ClassifierFreeGuidance(model, 2.0, CLASSES - 1)
    uncond = build_unet(
        ModelConfig(channels=16, norm_groups=8, channel_mult=[1, 2], num_res_blocks=1, attention_resolutions=[]),
        8,
        1,
        True,
    )
    with pytest.raises(ValueError, match="class-conditional"):
        ClassifierFreeGuidance(uncond, 2.0, CLASSES)


@pytest.mark.parametrize("method", ["ddpm", "ddim", "euler", "heun"])
@pytest.mark.parametrize("learn_sigma", [True, False])
def test_every_sampler_runs_with_guidance(method: str, learn_sigma: bool) -> None:
    model = tiny_model(learn_sigma)
    var = "learned_range" if learn_sigma else "fixed_small"
    diffusion = create_diffusion(steps=100, var_type=var, loss="hybrid" if learn_sigma else "mse")
    y = torch.arange(4) % CLASSES
    shape = (4, CHANNELS, IMAGE, IMAGE)
    noise = torch.randn(shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)

    def run(scale: float) -> torch.Tensor:
        guided = CountingModel(ClassifierFreeGuidance(model, scale, CLASSES))
        out = generate(
            guided,
            diffusion,
            method,
            respacing="5",
            shape=shape,
            model_kwargs={"y": y},
            generator=torch.Generator().manual_seed(1),
            noise=noise,
        )
        assert guided.batches and all(b == 4 and torch.equal(lab, y) for b, lab in guided.batches)
        return out

    guided, plain = run(3.0), run(1.0)
    assert guided.shape == shape and guided.dtype == torch.float32 and torch.isfinite(guided).all()
    assert not torch.equal(guided, plain)  # the guidance changed the samples
    # s = 1 through the wrapper is sampling the conditional model itself.
    direct = generate(
        model,
        diffusion,
        method,
        respacing="5",
        shape=shape,
        model_kwargs={"y": y},
        generator=torch.Generator().manual_seed(1),
        noise=noise,
    )
    assert torch.equal(plain, direct)
