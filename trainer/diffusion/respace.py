"""Respacing: run a T-step process with K ≪ T steps (Nichol & Dhariwal 2021, sec. 4; DDIM sec. 4.2).

A strided subset S = {s_0 < ... < s_{K-1}} of the timesteps is kept; the new process has
ᾱ'_k = ᾱ_{s_k}, hence β'_k = 1 − ᾱ_{s_k}/ᾱ_{s_{k-1}} (ᾱ_{s_{-1}} = 1), and step k calls the model with
the original timestep s_k.
"""

from __future__ import annotations

import numpy as np

from .gaussian import GaussianDiffusion


def space_timesteps(num_timesteps: int, spec: str | int) -> list[int]:
    """Sorted timesteps kept by a respacing spec.

    - ``""``: all T steps;
    - ``"K"``: K steps evenly strided over [0, T-1], both ends included;
    - ``"a,b,c"``: T split into equal sections (earlier sections take the remainder), with a, b, c
      steps evenly strided within each section;
    - ``"ddimK"``: the DDIM stride: range(0, T, s) for the integer s giving exactly K steps.

    The kept steps are exactly those of improved-diffusion's ``space_timesteps``, so its checkpoints
    sample here as they do there: within a section the float stride (n−1)/(K−1) is ADDED up step by step
    and each running sum rounded with Python's ``round()`` (half to even: "25" of T = 4000 keeps 666 and
    3332, not 667 and 3333), and a one-step section keeps its FIRST timestep ("1" keeps t = 0).
    """
    text = str(spec).strip()
    if text == "":
        return list(range(num_timesteps))
    if text.startswith("ddim"):
        k = _parse_count(text[4:], text)
        for stride in range(1, num_timesteps + 1):
            if len(range(0, num_timesteps, stride)) == k:
                return list(range(0, num_timesteps, stride))
        raise ValueError(f"respacing {text!r}: no integer stride gives exactly {k} of {num_timesteps} steps")

    counts = [_parse_count(part, text) for part in text.split(",")]
    size, extra = divmod(num_timesteps, len(counts))
    kept: list[int] = []
    start = 0
    for i, count in enumerate(counts):
        section = size + (1 if i < extra else 0)
        if count > section:
            raise ValueError(
                f"respacing {text!r}: section {i} has {section} steps, cannot keep {count} (T = {num_timesteps})"
            )
        # A stride >= 1 keeps the rounded steps distinct. The running sum (not j·stride) and round()
        # are improved-diffusion's: either change moves some kept steps by one.
        stride = (section - 1) / (count - 1) if count > 1 else 1.0
        position = 0.0
        for _ in range(count):
            kept.append(start + round(position))
            position += stride
        start += section
    return kept


def _parse_count(text: str, spec: str) -> int:
    try:
        value = int(text.strip())
    except ValueError:
        raise ValueError(
            f"respacing {spec!r}: {text.strip()!r} is not a step count (expected '', 'K', 'a,b,c' or 'ddimK')"
        ) from None
    if value < 1:
        raise ValueError(f"respacing {spec!r}: step counts must be >= 1, got {value}")
    return value


def respace_betas(alphas_cumprod: np.ndarray, kept: list[int]) -> np.ndarray:
    """β'_k = 1 − ᾱ_{s_k}/ᾱ_{s_{k-1}} with ᾱ_{s_{-1}} = 1, in float64."""
    ac = np.asarray(alphas_cumprod, dtype=np.float64)[np.asarray(kept, dtype=np.int64)]
    prev = np.append(1.0, ac[:-1])
    return 1.0 - ac / prev


def respace(diffusion: GaussianDiffusion, spec: str | int) -> GaussianDiffusion:
    """A process over the kept steps of ``diffusion`` (itself possibly respaced: the timestep maps
    compose). Keeping every step returns a process with bit-identical tables."""
    kept = space_timesteps(diffusion.num_timesteps, spec)
    if kept == list(range(diffusion.num_timesteps)):
        betas = diffusion.betas.copy()
    else:
        betas = respace_betas(diffusion.alphas_cumprod, kept)
    return GaussianDiffusion(
        betas,
        mean_type=diffusion.mean_type,
        var_type=diffusion.var_type,
        loss_type=diffusion.loss_type,
        vlb_weight=diffusion.vlb_weight,
        timestep_map=diffusion.timestep_map[np.asarray(kept, dtype=np.int64)],
        base_num_timesteps=diffusion.base_num_timesteps,
    )
