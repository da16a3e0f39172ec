"""Generate the improved-diffusion reference cases in tests/ref/iddpm/ by running its own code.

    git clone https://github.com/openai/improved-diffusion /tmp/improved-diffusion   # commit 1bc7bbb
    OMP_NUM_THREADS=1 python tests/ref/generate_iddpm_refs.py /tmp/improved-diffusion

Its code is imported from the path given (never copied into this project). Only the modules that need nothing
but torch and numpy are imported (``improved_diffusion.script_util`` and what it imports: the UNet, the
Gaussian diffusion, respacing), so no stub of mpi4py or blobfile is needed. For each case it writes
``<case>.json`` (the 19 keyword arguments of ``create_model_and_diffusion``, the parameter names and shapes,
the seeds) and ``<case>.npz`` (its outputs, float32, fp32 arithmetic on one thread); the weights are redrawn
from seeds by :mod:`tests.ref.iddpm_weights` (the tests redraw the same ones), and the inputs are:

- ``x`` (N x 3 x 32 x 32): the first ``torch.randn`` of ``Generator().manual_seed(SEED_X)``; ``x_T``, the
  start noise of the samplers (first N_SAMPLE images), the second draw of the same generator;
- the ancestral sampler's per-step noise: successive draws of shape (N_SAMPLE, 3, 32, 32) from the global RNG
  seeded with SEED_STEPS, which equal successive draws of ``Generator().manual_seed(SEED_STEPS)``;
- ``t`` = [0, T/2, T-1] and, for class-conditional cases, ``y`` = [0, 7, 999];
- for the bound's terms: ``x_start`` = k/127.5 − 1 for k the first ``torch.randint(0, 256)`` draw of
  ``Generator().manual_seed(SEED_VB)``, its q_sample noise the next ``randn`` draw of it.

Outputs: ``model_t`` (what its diffusion feeds the UNet), ``model_output``, ``pmv_mean`` /
``pmv_log_variance`` / ``pmv_pred_xstart`` (``p_mean_variance``, ``clip_denoised=False``), ``map_<spec>`` (the
sorted ``space_timesteps`` for "25", "50", "100", "ddim25", "10,15,20", "1"), ``respaced_betas`` ("25"),
``ddim25_sample`` (DDIM, eta 0) and ``ddpm25_sample`` (ancestral), both 25 steps, ``clip_denoised=True``;
``vb_x_t`` and ``vb_bpd`` (``_vb_terms_bpd``, ``clip_denoised=False``: per-sample L_t in bits/dim at ``t``).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from tests.ref.iddpm_weights import redraw  # noqa: E402

SEED_X = 3001
SEED_STEPS = 3002
SEED_VB = 3003
N = 3
N_SAMPLE = 2
SPECS = {"25": "25", "50": "50", "100": "100", "ddim25": "ddim25", "10_15_20": "10,15,20", "1": "1"}

BASE = {
    "image_size": 32,
    "num_channels": 32,
    "num_res_blocks": 1,
    "num_heads": 1,
    "num_heads_upsample": -1,
    "attention_resolutions": "16",
    "dropout": 0.0,
    "learn_sigma": False,
    "sigma_small": False,
    "class_cond": False,
    "diffusion_steps": 1000,
    "noise_schedule": "linear",
    "timestep_respacing": "",
    "use_kl": False,
    "predict_xstart": False,
    "rescale_timesteps": False,
    "rescale_learned_sigmas": True,
    "use_checkpoint": False,
    "use_scale_shift_norm": True,
}

CASES = {
    # (a) learned range + cosine + T = 4000 + rescaled timesteps + scale-shift norm
    "a_learned_cosine_rescaled": (
        11,
        {"learn_sigma": True, "noise_schedule": "cosine", "diffusion_steps": 4000, "rescale_timesteps": True},
    ),
    # (b) fixed-large + linear + class-conditional + additive embedding
    "b_fixed_large_linear_cond": (12, {"class_cond": True, "use_scale_shift_norm": False}),
    # (c) several heads (a different count on the way up), attention at two resolutions, fixed-small variance
    "c_heads": (
        13,
        {"num_heads": 4, "num_heads_upsample": 2, "attention_resolutions": "16,8", "sigma_small": True},
    ),
}


def generate(case: str, seed: int, changes: dict, out_dir: Path) -> None:
    from improved_diffusion.respace import space_timesteps
    from improved_diffusion.script_util import create_model_and_diffusion

    kwargs = {**BASE, **changes}
    model, diffusion = create_model_and_diffusion(**kwargs)
    shapes = [(name, list(p.shape)) for name, p in model.state_dict().items()]
    model.load_state_dict(redraw(shapes, seed))
    model.eval()
    T = kwargs["diffusion_steps"]

    gen = torch.Generator().manual_seed(SEED_X)
    x = torch.randn((N, 3, 32, 32), generator=gen)
    x_T = torch.randn((N, 3, 32, 32), generator=gen)[:N_SAMPLE]
    t = torch.tensor([0, T // 2, T - 1])
    labels = torch.tensor([0, 7, 999])
    kw = {"y": labels} if kwargs["class_cond"] else {}
    kw_s = {"y": labels[:N_SAMPLE]} if kwargs["class_cond"] else {}

    seen: list[torch.Tensor] = []

    def spy(xx: torch.Tensor, ts: torch.Tensor, **k: torch.Tensor) -> torch.Tensor:
        seen.append(ts.clone())
        return model(xx, ts, **k)

    out: dict[str, np.ndarray] = {}
    with torch.no_grad():
        pmv = diffusion.p_mean_variance(spy, x, t, clip_denoised=False, model_kwargs=kw)
        out["model_t"] = seen[0].float().numpy()
        out["model_output"] = model(x, seen[0], **kw).numpy()
        out["pmv_mean"] = pmv["mean"].numpy()
        out["pmv_log_variance"] = pmv["log_variance"].float().numpy()
        out["pmv_pred_xstart"] = pmv["pred_xstart"].numpy()
        # The bound's terms in bits/dim (KL for t > 0, the discretized decoder at t = 0) on quantized images.
        gen_vb = torch.Generator().manual_seed(SEED_VB)
        x_start = torch.randint(0, 256, (N, 3, 32, 32), generator=gen_vb).float() / 127.5 - 1.0
        x_t = diffusion.q_sample(x_start, t, noise=torch.randn((N, 3, 32, 32), generator=gen_vb))
        out["vb_x_t"] = x_t.numpy()
        out["vb_bpd"] = diffusion._vb_terms_bpd(model, x_start, x_t, t, clip_denoised=False, model_kwargs=kw)[
            "output"
        ].numpy()
        for key, spec in SPECS.items():
            out[f"map_{key}"] = np.array(sorted(space_timesteps(T, spec)), dtype=np.int64)
        _, spaced = create_model_and_diffusion(**{**kwargs, "timestep_respacing": "25"})
        out["respaced_betas"] = np.asarray(spaced.betas, dtype=np.float64)
        shape = (N_SAMPLE, 3, 32, 32)
        out["ddim25_sample"] = spaced.ddim_sample_loop(
            model, shape, noise=x_T, clip_denoised=True, model_kwargs=kw_s, eta=0.0
        ).numpy()
        torch.manual_seed(SEED_STEPS)  # p_sample draws its noise with randn_like from the global RNG
        out["ddpm25_sample"] = spaced.p_sample_loop(
            model, shape, noise=x_T, clip_denoised=True, model_kwargs=kw_s
        ).numpy()

    np.savez(out_dir / f"{case}.npz", **out)
    meta = {
        "kwargs": kwargs,
        "weights_seed": seed,
        "seed_x": SEED_X,
        "seed_steps": SEED_STEPS,
        "seed_vb": SEED_VB,
        "n": N,
        "n_sample": N_SAMPLE,
        "t": t.tolist(),
        "y": labels.tolist() if kwargs["class_cond"] else None,
        "param_shapes": shapes,
    }
    (out_dir / f"{case}.json").write_text(json.dumps(meta, indent=1) + "\n")
    print(f"{case}: {len(shapes)} tensors, outputs {sorted(out)}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("improved_diffusion", help="path of a checkout of openai/improved-diffusion")
    p.add_argument("--out", default=str(Path(__file__).resolve().parent / "iddpm"))
    args = p.parse_args()
    sys.path.insert(0, str(Path(args.improved_diffusion).resolve()))
    torch.set_num_threads(1)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    for case, (seed, changes) in CASES.items():
        generate(case, seed, changes, out_dir)


if __name__ == "__main__":
    main()
