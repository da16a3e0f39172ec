"""Loading a run's weights for inference, and sampling from them.

Every inference model is built by :func:`build_inference_model` (config + weights → an eval-mode UNet, a
mismatch in one line): from an export file (or the newest under a run directory) by ``trainer/sample.py``
and ``trainer/evaluate.py`` (:func:`load_for_inference`, every problem with the file one line,
:data:`CLI_ERRORS`), and from weights in memory by the trainer's sample grids and periodic evaluation. Not
to be confused with ``trainer/timesteps.py``, which samples *timesteps* for training."""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from trainer.config import Config, ConfigError, SampleConfig
from trainer.diffusion import GaussianDiffusion, diffusion_from_config
from trainer.diffusion.samplers import generate
from trainer.images import grid_png, to_uint8
from trainer.models.unet import build_model


def build_inference_model(
    cfg: Config,
    weights: dict[str, torch.Tensor],
    image_size: int,
    channels: int,
    num_classes: int | None,
    device: torch.device,
    source: str = "weights",
) -> torch.nn.Module:
    """The UNet of ``cfg`` holding ``weights``; raises CheckpointError naming ``source`` when the config
    does not build a model or its shapes do not match the weights."""
    from trainer.checkpoint import CheckpointError

    try:
        model = build_model(cfg, image_size, channels, num_classes)
    except ValueError as err:
        raise CheckpointError(f"{source}: its config does not build a model ({err})") from None
    problem = weights_mismatch(cfg, model.state_dict(), weights)
    if problem:
        raise CheckpointError(f"{source}: {problem}")
    model.load_state_dict(weights)
    return model.to(device).eval()


def weights_mismatch(cfg: Config, expected: dict[str, torch.Tensor], saved: dict[str, torch.Tensor]) -> str | None:
    """One line on how ``saved`` differs from the model's ``expected`` state dict, or None if it fits.

    Checked before ``load_state_dict``, whose error is a many-line list of every key."""
    if not isinstance(saved, dict):
        return f"weights are a {type(saved).__name__}, not a state dict"
    missing = [k for k in expected if k not in saved]
    unexpected = [k for k in saved if k not in expected]
    shapes = [
        (k, tuple(saved[k].shape), tuple(v.shape))
        for k, v in expected.items()
        if k in saved and tuple(getattr(saved[k], "shape", ())) != tuple(v.shape)
    ]
    if not (missing or unexpected or shapes):
        return None
    parts = []
    if missing:
        parts.append(f"missing {len(missing)} keys e.g. {missing[0]!r}")
    if unexpected:
        parts.append(f"unexpected {len(unexpected)} e.g. {unexpected[0]!r}")
    if shapes:
        key, have, want = shapes[0]
        more = f" [+{len(shapes) - 1} more]" if len(shapes) > 1 else ""
        parts.append(f"shape mismatch {key!r}: saved {have} vs model {want}{more}")
    return f"weights do not match its config ({_mismatch_hint(cfg, expected, saved)}): {', '.join(parts)}"


def _mismatch_hint(cfg: Config, expected: dict[str, torch.Tensor], saved: dict[str, torch.Tensor]) -> str:
    """The config key most likely edited, read off the UNet's first and last convolutions."""
    first, last = "input_blocks.0.0.weight", "out.1.weight"
    w = saved.get(first)
    if isinstance(w, torch.Tensor) and w.ndim == 4 and w.shape[0] != cfg.model.channels:
        return f"model.channels is {cfg.model.channels}, the weights have {w.shape[0]}"
    w = saved.get(last)
    if isinstance(w, torch.Tensor) and w.ndim == 4 and last in expected and w.shape[0] != expected[last].shape[0]:
        return f"diffusion.var_type {cfg.diffusion.var_type!r}: the weights have {w.shape[0]} output channels"
    return "model.* or diffusion.var_type edited?"


@torch.no_grad()
def sample_images(
    cfg: Config,
    model: torch.nn.Module,
    shape: tuple[int, int, int],
    num_samples: int,
    num_classes: int | None,
    device: torch.device,
    labels: torch.Tensor | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """``num_samples`` images as uint8 NHWC, in batches of ``cfg.sample.batch_size``, plus their labels.

    Class-conditional models get ``labels`` (or labels cycling through the classes)."""
    s = cfg.sample
    diffusion = diffusion_from_config(cfg.diffusion)
    gen = torch.Generator(device=device).manual_seed(s.seed)
    if num_classes and labels is None:
        labels = torch.arange(num_samples) % num_classes
    out, ys = [], []
    for start in range(0, num_samples, s.batch_size):
        n = min(s.batch_size, num_samples - start)
        kwargs = {}
        if num_classes and labels is not None:
            y = labels[start : start + n].to(device)
            kwargs["y"] = y
            ys.append(y.cpu())
        out.append(generate_uint8(model, diffusion, s, (n, *shape), device, kwargs, gen, progress))
    arr = np.concatenate(out)
    lab = torch.cat(ys).numpy() if ys else np.zeros(len(arr), dtype=np.int64)
    return arr, lab


def generate_uint8(
    model: torch.nn.Module,
    diffusion: GaussianDiffusion,
    s: SampleConfig,
    shape: tuple[int, ...],
    device: torch.device,
    model_kwargs: dict[str, Any],
    generator: torch.Generator,
    progress: Callable[[int, int], None] | None = None,
    respacing: str | None = None,
) -> np.ndarray:
    """One batch of ``shape`` (N, C, H, W) with the sampler settings ``s`` (``respacing`` replaces
    ``s.steps``), as uint8 NHWC."""
    x = generate(
        model,
        diffusion,
        method=s.method,
        respacing=s.steps if respacing is None else respacing,
        shape=shape,
        device=device,
        model_kwargs=model_kwargs,
        generator=generator,
        clip_denoised=s.clip_denoised,
        eta=s.eta,
        churn=s.churn,
        snr=s.snr,
        corrector_steps=s.corrector_steps,
        progress=progress,
    )
    return to_uint8(x)


def generate_grid(
    cfg: Config,
    weights: dict[str, torch.Tensor],
    image_size: int,
    channels: int,
    num_classes: int | None,
    device: torch.device,
) -> tuple[bytes, np.ndarray]:
    model = build_inference_model(cfg, weights, image_size, channels, num_classes, device)
    arr, _ = sample_images(cfg, model, (channels, image_size, image_size), cfg.sample.num_samples, num_classes, device)
    scale = max(1, 128 // image_size)  # small images are enlarged so the grid is viewable
    return grid_png(arr, scale=scale), arr


def load_for_inference(
    path: str,
    use_ema: bool,
    ema_rate: float | None,
    device: torch.device,
    sample: dict[str, Any] | None = None,
) -> tuple[Config, torch.nn.Module, dict]:
    """Model and config from an export file (or the newest one under a run directory).

    ``sample`` settings (command-line flags) replace the saved ``sample:`` section's before the config
    is validated, so they are checked against its ``diffusion.steps`` like a YAML file's. Every problem
    with the file (unreadable, not an export, weights that do not fit its config) is a CheckpointError
    or ConfigError with a one-line message."""
    from trainer.checkpoint import CheckpointError
    from trainer.config import config_from_dict
    from trainer.export import load_export

    try:
        state = load_export(path)
    except CheckpointError as err:
        raise _one_line(err) from None
    where = state["path"]
    data, meta = state["config"], state["meta"]
    if not isinstance(data, dict) or not isinstance(meta, dict):
        raise CheckpointError(f"{where}: not an export file ('config' and 'meta' must be mappings)")
    absent = [k for k in ("image_size", "channels", "num_classes") if k not in meta]
    if absent:
        raise CheckpointError(f"{where}: not an export file (meta lacks {', '.join(absent)})")
    if sample:
        data = {**data, "sample": {**(data.get("sample") or {}), **sample}}
    cfg = config_from_dict(data, source=where)
    meta = dict(meta, step=state["step"], path=where)
    if use_ema:
        rate = str(ema_rate if ema_rate is not None else cfg.sample_ema_rate)
        if rate not in state["ema"]:
            raise CheckpointError(f"{where}: no EMA at rate {rate} (has {', '.join(state['ema'])})")
        weights = state["ema"][rate]
        meta["weights"] = f"ema {rate}"
    else:
        weights = state["model"]
        meta["weights"] = "raw"
    model = build_inference_model(
        cfg, weights, meta["image_size"], meta["channels"], meta["num_classes"], device, source=where
    )
    return cfg, model, meta


def _one_line(err: Exception) -> Exception:
    """``err`` unchanged if its message is one line, else a CheckpointError keeping the first line's head
    and the first line that names an error: torch's weights-only unpickling failure spans a dozen lines
    of advice (e.g. to load with ``weights_only=False``, which a CLI must not suggest)."""
    from trainer.checkpoint import CheckpointError

    lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
    if len(lines) <= 1:
        return err
    head, marker, _ = lines[0].partition(": unreadable (")
    detail = next((ln for ln in lines[1:] if re.match(r"\w*\s?error:", ln, re.IGNORECASE)), None)
    if not marker or detail is None:
        return CheckpointError(lines[0])
    return CheckpointError(f"{head}: unreadable ({detail.split('. ')[0].rstrip('.')})")


@dataclass
class Loaded:
    """A model ready for inference and what the CLIs need to know about it."""

    cfg: Config
    model: torch.nn.Module
    meta: dict[str, Any]
    """The export's metadata plus ``step``, ``path`` and ``weights`` ("ema 0.9999" or "raw")."""

    @property
    def image_size(self) -> int:
        return int(self.meta["image_size"])

    @property
    def channels(self) -> int:
        return int(self.meta["channels"])

    @property
    def num_classes(self) -> int | None:
        return self.meta["num_classes"]


def add_weights_arguments(p: argparse.ArgumentParser) -> None:
    """The arguments every inference CLI takes to pick the weights (and where they run)."""
    p.add_argument("checkpoint", help="export.pt, a checkpoint directory, or a run's output directory")
    p.add_argument("--raw", action="store_true", help="use the raw weights instead of the EMA")
    p.add_argument("--ema-rate", type=float, default=None, help="which EMA (default: sample.ema_rate)")
    p.add_argument("--device", default=None, help="e.g. cpu, cuda:0 (default: the rank's device)")
    # The deepspeed launcher appends --local_rank=N to the script's arguments; LOCAL_RANK says the same.
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)


def load_for_cli(args: argparse.Namespace, device: torch.device, sample: dict[str, Any] | None = None) -> Loaded:
    """:func:`load_for_inference` with the arguments of :func:`add_weights_arguments`."""
    cfg, model, meta = load_for_inference(args.checkpoint, not args.raw, args.ema_rate, device, sample=sample)
    return Loaded(cfg, model, meta)


def _cli_errors() -> tuple[type[Exception], ...]:
    from data_prep.manifest import ManifestError
    from trainer.checkpoint import CheckpointError
    from trainer.data import DataError
    from trainer.evaluation.parts import PartsError

    return (CheckpointError, ConfigError, ManifestError, DataError, PartsError, FileNotFoundError)


CLI_ERRORS = _cli_errors()
"""What an inference CLI reports as ``error: <one line>`` with exit status 2."""


def run_cli(
    args: argparse.Namespace,
    run: Callable[[argparse.Namespace, Any], int],
    errors: tuple[type[Exception], ...] = CLI_ERRORS,
) -> int:
    """An inference CLI's body under the launcher's process group: ``run(args, env)``, with ``errors`` as
    one ``error:`` line and exit status 2, and the group shut down however it ends."""
    from trainer import distributed

    try:
        env = distributed.init_distributed(args.timeout_min)
    except distributed.LauncherError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    try:
        return run(args, env)
    except errors as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    finally:
        distributed.shutdown()


def rank0_bar(total: int, desc: str, is_main: bool) -> Any:
    """A tqdm bar in images on rank 0 (silent elsewhere); fractional updates show as whole images."""
    from tqdm import tqdm

    return tqdm(
        total=total,
        desc=f"rank 0: {desc}",
        unit="img",
        bar_format="{l_bar}{bar}| {n:.0f}/{total_fmt} [{elapsed}<{remaining}, {rate_fmt}]",
        dynamic_ncols=True,
        disable=not is_main,
    )
