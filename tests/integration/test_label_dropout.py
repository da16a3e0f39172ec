"""Label dropout through the real trainer: the null class is trained only when labels are dropped, a
resumed class-conditional run stays exact, and the trained export samples with classifier-free guidance.

One process per run (the dropout is per rank, nothing distributed), tiny model, fp32 so that the exported
weights are the optimizer's own values (a bf16 export would round the untouched null row).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import REPO, TINY_MODEL, child_env
from trainer.config import config_from_dict, load_config
from trainer.diffusion import create_diffusion
from trainer.diffusion.samplers import generate
from trainer.guidance import ClassifierFreeGuidance
from trainer.models.unet import build_unet

pytestmark = pytest.mark.slow

STEPS = 30
COMMON = [
    *TINY_MODEL,
    "model.class_cond=true",
    "data.batch_size=8",
    "data.shuffle_buffer=64",
    "train.precision=fp32",
    "train.weight_decay=0",  # AdamW's decay would move a row that never receives gradient
    "train.lr_schedule=constant",  # the resume test shortens the first half's total_steps
    "train.warmup_steps=0",
    "train.log_every=10",
    "tracking.enabled=false",
]


def _start(args: list[str]) -> subprocess.Popen[str]:
    cmd = [sys.executable, "trainer/main.py", "--config", "configs/quickstart.yaml", *COMMON, *args, "--resume", "auto"]
    return subprocess.Popen(cmd, cwd=REPO, env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _wait(*procs: subprocess.Popen[str]) -> list[str]:
    """Runs started together (2 cores: two single-threaded runs overlap), each required to succeed."""
    logs = []
    for proc in procs:
        out, _ = proc.communicate(timeout=300)
        assert proc.returncode == 0, out[-4000:]
        logs.append(out)
    return logs


def _export(out: Path, step: int) -> dict:
    return torch.load(out / "checkpoints" / f"step_{step:08d}" / "export.pt", weights_only=True)


def _initial_class_embedding(shards: Path) -> torch.Tensor:
    """The class embedding as the trainer initialises it: same config, same seed, same build."""
    cfg = load_config(REPO / "configs" / "quickstart.yaml", [*COMMON, f"data.root={shards}"])
    torch.manual_seed(cfg.train.seed)
    model = build_unet(cfg.model, image_size=16, in_channels=1, learn_sigma=True, num_classes=10)
    return model.class_embed.weight.detach().clone()


def test_null_class_trains_only_with_label_dropout_then_guided_sampling(digits_shards: Path, tmp_path: Path) -> None:
    runs = {p: tmp_path / f"p{p}" for p in (0.5, 0.0)}
    procs = [
        _start(
            [
                f"data.root={digits_shards}",
                f"model.label_dropout={p}",
                f"train.total_steps={STEPS}",
                f"train.ckpt_every={STEPS}",
                f"train.output_dir={out}",
            ]
        )
        for p, out in runs.items()
    ]
    _wait(*procs)
    init = _initial_class_embedding(digits_shards)
    assert init.shape == (11, 64)  # 10 digits + the null class, 4 x 16 channels
    null = 10

    exports = {p: _export(out, STEPS) for p, out in runs.items()}
    for p, export in exports.items():
        assert export["meta"]["num_classes"] == 10 and export["config"]["model"]["label_dropout"] == p
        trained = export["model"]["class_embed.weight"]
        # The digit rows were trained in both runs (the reproduction of the initial values is right:
        # rows that receive no gradient match it exactly, see below).
        assert not torch.equal(trained[:null], init[:null])
        assert (trained[:null] - init[:null]).abs().amax(dim=1).gt(0).all()
    # Without dropout the null row never sees a gradient: bit for bit its initial value (fp32, no weight
    # decay). With dropout it received gradient and moved.
    assert torch.equal(exports[0.0]["model"]["class_embed.weight"][null], init[null])
    assert not torch.equal(exports[0.5]["model"]["class_embed.weight"][null], init[null])
    moved = (exports[0.5]["model"]["class_embed.weight"][null] - init[null]).abs().max().item()
    assert moved > 1e-4, moved

    # Sampling from the trained export (EMA weights) with guidance, through the samplers' own entry point.
    export = exports[0.5]
    cfg = config_from_dict(export["config"])
    model = build_unet(cfg.model, image_size=16, in_channels=1, learn_sigma=True, num_classes=null)
    model.load_state_dict(export["ema"][str(cfg.sample_ema_rate)])
    model.eval()
    diffusion = create_diffusion(
        steps=cfg.diffusion.steps,
        schedule=cfg.diffusion.schedule,
        mean_type=cfg.diffusion.mean_type,
        var_type=cfg.diffusion.var_type,
        loss=cfg.diffusion.loss,
    )
    y = torch.tensor([0, 3, 7, 9])
    shape = (4, 1, 16, 16)
    noise = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    samples = {}
    for method in ("ddpm", "ddim", "heun"):
        for scale in (0.0, 1.0, 3.0):
            x = generate(
                ClassifierFreeGuidance(model, scale, null),
                diffusion,
                method,
                respacing="5",
                shape=shape,
                model_kwargs={"y": y},
                generator=torch.Generator().manual_seed(1),
                noise=noise,
            )
            assert x.shape == shape and x.dtype == torch.float32 and torch.isfinite(x).all(), (method, scale)
            assert x.abs().max() <= 1.0
            samples[method, scale] = x
        # Guidance changes the samples (conditional vs. guided vs. unconditional).
        assert not torch.equal(samples[method, 3.0], samples[method, 1.0])
        assert not torch.equal(samples[method, 0.0], samples[method, 1.0])


def test_label_dropout_resumes_exactly(digits_shards: Path, tmp_path: Path) -> None:
    """The dropout masks come from the checkpointed global RNG: 16 steps straight == 8, stop, resume, 8 more."""
    total, half = 16, 8
    straight, split = tmp_path / "straight", tmp_path / "split"
    common = [f"data.root={digits_shards}", "model.label_dropout=0.5", f"train.ckpt_every={half}"]
    _wait(
        _start([*common, f"train.total_steps={total}", f"train.output_dir={straight}"]),
        _start([*common, f"train.total_steps={half}", f"train.output_dir={split}"]),
    )
    (log,) = _wait(_start([*common, f"train.total_steps={total}", f"train.output_dir={split}"]))
    assert "resumed from" in log, log[-3000:]
    a, b = _export(straight, total), _export(split, total)
    for name, value in a["model"].items():
        assert torch.equal(value, b["model"][name]), name
    for rate, shadows in a["ema"].items():
        for name, value in shadows.items():
            assert torch.equal(value, b["ema"][rate][name]), (rate, name)
    rng_a = torch.load(straight / "checkpoints" / f"step_{total:08d}" / "trainer" / "rank_0.pt", weights_only=True)
    rng_b = torch.load(split / "checkpoints" / f"step_{total:08d}" / "trainer" / "rank_0.pt", weights_only=True)
    assert torch.equal(rng_a["rng"]["torch"], rng_b["rng"]["torch"])
    # The null row was trained, so masks with dropped labels were drawn on both sides of the resume.
    assert not torch.equal(a["model"]["class_embed.weight"][10], _initial_class_embedding(digits_shards)[10])
