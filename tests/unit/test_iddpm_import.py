"""Import of improved-diffusion checkpoints against outputs of its own code (tests/ref/generate_iddpm_refs.py).

Each case's weights are redrawn from seeds (tests/ref/iddpm_weights.py), saved as its state-dict file, converted
by ``trainer.convert from-iddpm`` and loaded the way ``trainer/sample.py`` loads any run; its outputs must equal
improved-diffusion's: the UNet and ``p_mean_variance`` to 1e-4 (relative to max(1, max |ref|) per image), the
respaced timestep maps exactly, 25-step DDIM and ancestral samples from the same noise to 1e-3.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.conftest import REPO, child_env
from tests.ref.iddpm_weights import redraw
from trainer.convert import from_iddpm, to_iddpm
from trainer.diffusion import diffusion_from_config, respace, space_timesteps
from trainer.diffusion.samplers import ddim_sample_loop, ddpm_sample_loop
from trainer.evaluation.inference import load_for_inference
from trainer.export import load_export
from trainer.iddpm import IddpmError, parse_flags

REF = REPO / "tests" / "ref" / "iddpm"
SHARED = REPO.parent / "shared" / "ref"
CASES = sorted(p.stem for p in REF.glob("*.json"))


def _flags(kwargs: dict) -> str:
    return " ".join(f"--{k} {v}" for k, v in kwargs.items() if k != "timestep_respacing")


def _rel_err(got: torch.Tensor, ref: np.ndarray) -> float:
    """max over images of max|got − ref| / max(1, max|ref|)."""
    r = torch.from_numpy(np.asarray(ref)).to(got.dtype)
    dims = tuple(range(1, r.ndim))
    return float(((got - r).abs().amax(dim=dims) / r.abs().amax(dim=dims).clamp_min(1.0)).max())


def _case(name: str, tmp: Path) -> tuple[dict, dict, Path, dict[str, torch.Tensor]]:
    meta = json.loads((REF / f"{name}.json").read_text())
    ref = dict(np.load(REF / f"{name}.npz"))
    theirs = redraw([(n, s) for n, s in meta["param_shapes"]], meta["weights_seed"])
    ckpt = tmp / f"{name}.pt"
    torch.save(theirs, ckpt)
    gen = torch.Generator().manual_seed(meta["seed_x"])
    ref["x"] = torch.randn((meta["n"], 3, 32, 32), generator=gen).numpy()
    ref["x_T"] = torch.randn((meta["n"], 3, 32, 32), generator=gen)[: meta["n_sample"]].numpy()
    return meta, ref, ckpt, theirs


@pytest.mark.parametrize("name", CASES)
def test_imported_model_matches_improved_diffusion(name: str, tmp_path: Path) -> None:
    meta, ref, ckpt, _ = _case(name, tmp_path)
    T = meta["kwargs"]["diffusion_steps"]
    from_iddpm(str(ckpt), _flags(meta["kwargs"]), str(tmp_path / "run"))
    cfg, model, _ = load_for_inference(str(tmp_path / "run"), True, None, torch.device("cpu"))
    x, t = torch.from_numpy(ref["x"]), torch.tensor(meta["t"])
    kw = {"y": torch.tensor(meta["y"])} if meta["y"] else {}
    diffusion = diffusion_from_config(cfg.diffusion)
    seen: list[torch.Tensor] = []

    def spy(xx: torch.Tensor, tt: torch.Tensor, **k: torch.Tensor) -> torch.Tensor:
        seen.append(tt)
        return model(xx, tt, **k)

    with torch.no_grad():
        p = diffusion.p_mean_variance(spy, x, t, clip_denoised=False, model_kwargs=kw)
    # The network sees t·1000/T when the flags rescale timesteps (the UNet applies the factor itself).
    scale = 1000.0 / T if meta["kwargs"]["rescale_timesteps"] else 1.0
    np.testing.assert_allclose(seen[0].float().numpy() * scale, ref["model_t"], rtol=1e-7)
    assert _rel_err(p["model_output"], ref["model_output"]) <= 1e-4
    for key in ("mean", "log_variance", "pred_xstart"):
        assert _rel_err(p[key], ref[f"pmv_{key}"]) <= 1e-4, key
    for key, spec in {
        "25": "25",
        "50": "50",
        "100": "100",
        "ddim25": "ddim25",
        "10_15_20": "10,15,20",
        "1": "1",
    }.items():
        assert space_timesteps(T, spec) == ref[f"map_{key}"].tolist(), spec
    spaced = respace(diffusion, "25")
    np.testing.assert_allclose(spaced.betas, ref["respaced_betas"], rtol=1e-12)

    _check_bound_terms(meta, ref, diffusion, model, kw)

    x_T = torch.from_numpy(ref["x_T"])
    kw_s = {"y": torch.tensor(meta["y"][: meta["n_sample"]])} if meta["y"] else {}
    ddim = ddim_sample_loop(model, spaced, x_T.shape, noise=x_T, model_kwargs=kw_s)
    assert float((ddim - torch.from_numpy(ref["ddim25_sample"])).abs().max()) <= 1e-3
    steps = torch.Generator().manual_seed(meta["seed_steps"])  # successive per-step draws, as its global RNG
    ddpm = ddpm_sample_loop(model, spaced, x_T.shape, noise=x_T, model_kwargs=kw_s, generator=steps)
    assert float((ddpm - torch.from_numpy(ref["ddpm25_sample"])).abs().max()) <= 1e-3


def _tanh_decoder_bpd(x: torch.Tensor, mean: torch.Tensor, log_var: torch.Tensor) -> torch.Tensor:
    """The discretized Gaussian decoder −log p(x_0 | x_1) in bits/dim (Ho et al. 2020, eq. 13) with the tanh
    approximation of the normal CDF that improved-diffusion uses (ours uses the exact CDF), in float32 as there: in
    the tails the difference of two CDFs near 1 keeps few digits, and float64 would not reproduce them."""
    x, mean, log_var = x.float(), mean.float(), log_var.float()

    def cdf(v: torch.Tensor) -> torch.Tensor:
        return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (v + 0.044715 * v**3)))

    inv_std = torch.exp(-0.5 * log_var)
    plus, minus = cdf(inv_std * (x - mean + 1 / 255)), cdf(inv_std * (x - mean - 1 / 255))
    log_p = torch.where(
        x < -0.999,
        torch.log(plus.clamp_min(1e-12)),
        torch.where(x > 0.999, torch.log((1 - minus).clamp_min(1e-12)), torch.log((plus - minus).clamp_min(1e-12))),
    )
    return -log_p.mean(dim=(1, 2, 3)) / math.log(2.0)


def _check_bound_terms(meta: dict, ref: dict, diffusion, model, kw: dict) -> None:
    """L_t in bits/dim equals improved-diffusion's ``_vb_terms_bpd``: the KL terms (t > 0) to 1e-4; the decoder term
    (t = 0), whose CDF differs on purpose, equals the tanh-CDF decoder evaluated here on our p(x_0 | x_1) (so the
    variance at t = 0 is its β̃_1) to 1e-4."""
    gen = torch.Generator().manual_seed(meta["seed_vb"])
    x_start = torch.randint(0, 256, (meta["n"], 3, 32, 32), generator=gen).float() / 127.5 - 1.0
    x_t, t = torch.from_numpy(ref["vb_x_t"]), torch.tensor(meta["t"])
    want = torch.from_numpy(ref["vb_bpd"]).double()
    with torch.no_grad():
        out = diffusion.model_output(model, x_t, t, kw)
        vb, p = diffusion.vb_terms_bpd(out, x_start, x_t, t)
    err = (vb.double() - want).abs() / want.abs().clamp_min(1.0)
    assert t[0] == 0 and float(err[1:].max()) <= 1e-4, err
    tanh = _tanh_decoder_bpd(x_start[:1], p["mean"][:1], p["log_variance"][:1])
    assert float((tanh - want[:1]).abs() / want[:1].abs().clamp_min(1.0)) <= 1e-4
    # ... and the exact-CDF decoder of ours is within 1% of it on these random networks.
    assert float(err[0]) <= 1e-2


def test_shared_reference_case(tmp_path: Path) -> None:
    """The one case of ../shared/ref (its README): 4 heads, class-conditional, learned range, rescaled, T = 4000."""
    if not (SHARED / "id_small_c.pt").is_file():
        pytest.skip("../shared/ref is not present in this checkout")
    kwargs = json.loads((SHARED / "id_small_c.json").read_text())
    ref = np.load(SHARED / "id_small_c_io.npz")
    from_iddpm(str(SHARED / "id_small_c.pt"), _flags(kwargs), str(tmp_path / "run"))
    cfg, model, _ = load_for_inference(str(tmp_path / "run"), True, None, torch.device("cpu"))
    x, t, y = (torch.from_numpy(ref[k]) for k in ("x", "t", "y"))
    diffusion = diffusion_from_config(cfg.diffusion)
    with torch.no_grad():
        p = diffusion.p_mean_variance(model, x, t, clip_denoised=False, model_kwargs={"y": y})
    assert _rel_err(p["model_output"], ref["model_output"]) <= 1e-4
    for key in ("mean", "log_variance", "pred_xstart"):
        assert _rel_err(p[key], ref[f"pmv_{key}"]) <= 1e-4, key
    spaced = respace(diffusion, "25")
    assert spaced.timestep_map.tolist() == ref["respaced_timestep_map"].tolist()
    x_T = torch.from_numpy(ref["x_T"])
    ddim = ddim_sample_loop(model, spaced, x_T.shape, noise=x_T, model_kwargs={"y": y})
    assert float((ddim - torch.from_numpy(ref["ddim25_sample"])).abs().max()) <= 1e-3
    gen = torch.Generator().manual_seed(int(ref["ddpm25_noise_seed"]))
    ddpm = ddpm_sample_loop(model, spaced, x_T.shape, noise=x_T, model_kwargs={"y": y}, generator=gen)
    assert float((ddpm - torch.from_numpy(ref["ddpm25_sample"])).abs().max()) <= 1e-3


@pytest.mark.parametrize("name", CASES)
def test_round_trips_are_bit_identical(name: str, tmp_path: Path) -> None:
    meta, _, ckpt, theirs = _case(name, tmp_path)
    flags = _flags(meta["kwargs"])
    from_iddpm(str(ckpt), flags, str(tmp_path / "a"))
    # theirs -> ours -> theirs
    out, text = to_iddpm(str(tmp_path / "a"), str(tmp_path / "back.pt"))
    back = torch.load(out, weights_only=True)
    assert list(back) == list(theirs)
    assert all(torch.equal(back[k], theirs[k]) for k in theirs)
    assert parse_flags(text) == parse_flags(flags)
    assert (tmp_path / "back.flags.txt").read_text().strip() == text
    # ours -> theirs -> ours (the null-class row of an import is redrawn from the same seed)
    from_iddpm(str(out), text, str(tmp_path / "b"))
    a, b = load_export(tmp_path / "a"), load_export(tmp_path / "b")
    assert a["config"] == b["config"]
    for rate in a["ema"]:
        assert all(torch.equal(a["ema"][rate][k], b["ema"][rate][k]) for k in a["ema"][rate])


def _convert(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "trainer.convert", *args], capture_output=True, text=True, env=child_env(), cwd=REPO
    )


def test_bad_inputs_are_one_line_exit_2(tmp_path: Path) -> None:
    meta, _, ckpt, _ = _case(CASES[0], tmp_path)
    flags = _flags(meta["kwargs"])
    cases = {
        "unknown flag --lr": flags + " --lr 1e-4",
        "--learn_sigma 'maybe' is not a boolean": flags + " --learn_sigma maybe",
        "--image_size 48": flags + " --image_size 48",
        "has shape": flags + " --num_channels 64",
        "lacks 1 tensors": flags + " --class_cond True",
    }
    for needle, text in cases.items():
        run = _convert("from-iddpm", str(ckpt), "--flags", text, "--out", str(tmp_path / "x"))
        assert run.returncode == 2, (needle, run.stderr)
        lines = run.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error:") and needle in lines[0], (needle, run.stderr)


def test_export_refuses_what_improved_diffusion_cannot_build(tmp_path: Path) -> None:
    meta, _, ckpt, _ = _case(CASES[0], tmp_path)
    from_iddpm(str(ckpt), _flags(meta["kwargs"]), str(tmp_path / "run"))
    state = load_export(tmp_path / "run")
    state["config"]["model"]["norm_groups"] = 16
    torch.save({k: v for k, v in state.items() if k != "path"}, tmp_path / "run" / "export.pt")
    run = _convert("to-iddpm", str(tmp_path / "run"), "--out", str(tmp_path / "o.pt"))
    assert run.returncode == 2
    assert run.stderr.strip() == "error: not expressible in improved-diffusion: model.norm_groups 16 (it uses 32)"
    with pytest.raises(IddpmError, match="unknown flag --batch_size"):
        parse_flags("--batch_size 128")
    with pytest.raises(IddpmError, match="No closing quotation"):
        parse_flags("--image_size '32")
    from trainer.iddpm import _qkv_per_head_to_per_kind

    with pytest.raises(IddpmError, match="96 output channels do not split into q, k, v of 5 heads"):
        _qkv_per_head_to_per_kind(torch.zeros(96, 32, 1), 5)
