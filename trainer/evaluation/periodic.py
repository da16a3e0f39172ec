"""Evaluation during training (``train.eval_every``): a cheap quality signal logged to MLflow against the step.

Each evaluation uses the EMA weights (the first of ``train.ema_rates``), gathered to a full float32 copy the
way the end-of-run sample grid gets them (collective under ZeRO-3), in a separate inference model: the
training module, its mode and its gradients are never touched.

**Bits/dim estimate** (``eval/val_bpd_est``). The bound L = L_0 + Σ_{t=1}^{T-1} L_t + L_prior needs T network
calls per image (4000 in the paper). The decoder term L_0 is evaluated exactly; t = 1..T-1 is cut into K
equal strata (``train.eval_timesteps``) and each image gets one timestep per stratum, drawn uniformly within
it, whose L_t is weighted by the stratum's size: K + 1 calls per image, and an unbiased estimate of the bound
(stratified sampling: E[size · L_t] over the stratum is its sum). The draws (and the noise) come from
generators of fixed seed, so every evaluation uses the same timesteps and noise per image and the curve
compares like with like. (A fixed midpoint per stratum is not unbiased: L_t falls steeply over the first
strata, and on the quickstart model, T = 1000 and K = 50, the midpoint rule gave 2.46 bits/dim for an exact
3.03.) Noise is drawn per (image part, stratum), so a term does not depend on the number of ranks or on the
training RNG. The images are the first ``train.eval_images`` of the ``val`` split in manifest order, cut into
parts of fixed content (``sample.batch_size`` images, one network batch) dealt round-robin to the ranks;
per-rank sums are all-reduced in float64. Also logged: ``eval/val_bpd_t0`` (L_0), ``eval/val_bpd_q1..q4``
(the estimated Σ L_t over t in [1, T/4), [T/4, T/2), [T/2, 3T/4), [3T/4, T), as ``evaluate.py`` reports
them; each drawn term counts in the quarter its t falls in, so these are unbiased too) and
``eval/val_prior_bpd``; they add up to ``eval/val_bpd_est``.

**FID** (with ``train.eval_features`` and ``train.eval_reference``): ``train.eval_fid_samples`` images
sampled with ``sample.method`` and ``train.eval_sample_steps``, in parts of fixed content seeded per part
(the same noise at every evaluation), dealt over the ranks and gathered as uint8 to rank 0, which extracts
features with the network built once at start-up and logs ``eval/fid``, ``eval/precision``,
``eval/recall``, ``eval/kid`` (and ``eval/sfid`` / ``eval/is`` when the network gives them).

Nothing here draws from the global RNG that the checkpoint saves for exact resume: building modules (which
initialises their weights) runs inside ``torch.random.fork_rng`` and all noise comes from local generators,
so a run with evaluations trains bit for bit like one without.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from trainer import distributed
from trainer.config import Config, ConfigError
from trainer.diffusion import GaussianDiffusion
from trainer.diffusion.gaussian import randn
from trainer.evaluation.parts import split_range

GROUPS = ("t0", "q1", "q2", "q3", "q4")
"""How the terms of the bound are reported: L_0, then Σ L_t by quarter of T (the last quarter holds T-1)."""

BPD_STREAM, FID_STREAM, TIMESTEP_STREAM = 1, 2, 3
"""Seed streams of the evaluation (mixed with train.seed, the part and the stratum)."""


# ------------------------------------------------------------------------------------ the estimator


def strata(num_timesteps: int, count: int) -> list[tuple[int, int]]:
    """``[lo, hi)`` of each stratum: ``(0, 1)`` (the decoder term, always exact), then ``count`` contiguous strata
    of 1..T-1 whose sizes differ by at most one. ``count`` is capped at T-1, where every t is its own stratum
    and the estimate is the exact bound. The sizes sum to T."""
    T = int(num_timesteps)
    if T < 2 or count < 1:
        raise ValueError(f"strata: need T >= 2 and at least one stratum, got T={T}, K={count}")
    K = min(int(count), T - 1)
    return [(0, 1)] + [(1 + j * (T - 1) // K, 1 + (j + 1) * (T - 1) // K) for j in range(K)]


def draw_timesteps(bounds: Sequence[tuple[int, int]], n: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """``[n, len(bounds)]`` timesteps: for each of ``n`` images one t drawn uniformly in each stratum."""
    lo = torch.tensor([a for a, _ in bounds], dtype=torch.long)
    size = torch.tensor([b - a for a, b in bounds], dtype=torch.long)
    u = torch.rand((n, len(bounds)), generator=generator, dtype=torch.float64)
    return lo + torch.minimum((u * size).long(), size - 1)


def term_group(t: int, num_timesteps: int) -> str:
    """``t0`` for the decoder term, else the quarter ``q1``..``q4`` of T that ``t`` falls in."""
    if t == 0:
        return "t0"
    T = num_timesteps
    for i, bound in enumerate((T // 4, T // 2, 3 * T // 4)):
        if t < bound:
            return f"q{i + 1}"
    return "q4"


NoiseSource = torch.Generator | Callable[[int], torch.Generator] | None


@torch.no_grad()
def bpd_terms(
    diffusion: GaussianDiffusion,
    model: Callable[..., torch.Tensor],
    x_start: torch.Tensor,
    timesteps: torch.Tensor,
    model_kwargs: dict[str, Any] | None = None,
    generator: NoiseSource = None,
    clip_denoised: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """L_t in bits/dim of each image at its timesteps ``timesteps[i, j]`` ([B, J], one batched network call
    per column j; the result is [B, J] float64) and the prior term ([B], float64), computed as
    :meth:`GaussianDiffusion.calc_bpd_loop` computes the full bound.

    Columns are visited from the last to the first with one noise draw each, as ``calc_bpd_loop`` visits
    t = T-1 .. 0: with a single ``generator`` and ``timesteps[:, j] = j`` for all T columns the terms are
    exactly that loop's. ``generator`` may instead be a function j -> generator (a noise stream per column)."""
    x_start = x_start if x_start.dtype == torch.float64 else x_start.float()
    B = x_start.shape[0]
    timesteps = torch.as_tensor(timesteps, dtype=torch.long)
    if timesteps.ndim != 2 or timesteps.shape[0] != B:
        raise ValueError(f"timesteps must have shape [{B}, J], got {tuple(timesteps.shape)}")
    out = torch.zeros(B, timesteps.shape[1], dtype=torch.float64, device=x_start.device)
    for j in reversed(range(timesteps.shape[1])):
        gen = generator(j) if callable(generator) else generator
        t = timesteps[:, j].to(x_start.device)
        noise = randn(x_start.shape, device=x_start.device, generator=gen, dtype=x_start.dtype)
        x_t = diffusion.q_sample(x_start, t, noise=noise)
        output = diffusion.model_output(model, x_t, t, model_kwargs)
        vb, _ = diffusion.vb_terms_bpd(output, x_start, x_t, t, clip_denoised=clip_denoised)
        out[:, j] = vb.double()
    return out, diffusion.prior_bpd(x_start).double()


def weighted_sums(
    terms: torch.Tensor,
    prior: torch.Tensor,
    timesteps: torch.Tensor,
    bounds: Sequence[tuple[int, int]],
    num_timesteps: int,
) -> dict[str, torch.Tensor]:
    """Per-image estimate ``total`` (Σ_j size_j · L_{t_j} + prior), ``prior`` and each of :data:`GROUPS`
    (each term counted in the group of its own t), float64."""
    sizes = torch.tensor([b - a for a, b in bounds], dtype=torch.float64, device=terms.device)
    weighted = terms.double() * sizes
    out = {"total": weighted.sum(dim=1) + prior.double(), "prior": prior.double()}
    # The index in GROUPS of each term, as term_group() says: 0 for t = 0, else 1 + the quarter boundaries <= t.
    T = num_timesteps
    t = timesteps.to(terms.device)
    edges = torch.tensor([T // 4, T // 2, 3 * T // 4], dtype=torch.long, device=terms.device)
    group = torch.where(t == 0, 0, 1 + torch.bucketize(t, edges, right=True))
    for i, g in enumerate(GROUPS):
        out[g] = torch.where(group == i, weighted, 0.0).sum(dim=1)
    return out


def _seed(*key: int) -> int:
    """A 63-bit seed from a tuple of integers (SeedSequence mixes them: nearby keys, unrelated streams)."""
    return int(np.random.SeedSequence([int(k) for k in key]).generate_state(1, dtype=np.uint64)[0] >> np.uint64(1))


def _generator(device: torch.device, seed: int) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(seed)


def _fork_rng(device: torch.device) -> AbstractContextManager[Any]:
    return torch.random.fork_rng(devices=[device] if device.type == "cuda" else [])


# ------------------------------------------------------------------------------------ the evaluator


@dataclass
class _FID:
    net: Any  # trainer.evaluation.features.FeatureNet on rank 0, None elsewhere
    reference: Any  # trainer.evaluation.quality.Reference on rank 0, None elsewhere
    num_samples: int
    respacing: str


class PeriodicEval:
    """Built once by :meth:`create` (every rank); :meth:`run` is one evaluation (collective)."""

    def __init__(
        self,
        cfg: Config,
        env: distributed.DistEnv,
        diffusion: GaussianDiffusion,
        image_size: int,
        channels: int,
        num_classes: int | None,
        parts: dict[int, tuple[torch.Tensor, torch.Tensor]],
        num_images: int,
        fid: _FID | None,
    ) -> None:
        self.cfg, self.env, self.diffusion = cfg, env, diffusion
        self.image_size, self.channels, self.num_classes = image_size, channels, num_classes
        self.parts = parts
        """This rank's parts of the validation subset: part index -> (images [n, C, H, W], labels [n])."""
        self.num_images = num_images
        self.fid = fid
        self.rate = cfg.train.ema_rates[0]
        self.bounds = strata(diffusion.num_timesteps, cfg.train.eval_timesteps)

    # -- construction
    @classmethod
    def create(
        cls, cfg: Config, env: distributed.DistEnv, manifest: Any, purpose: str | None = None
    ) -> PeriodicEval | None:
        """None when ``train.eval_every`` is 0. Reads this rank's share of the validation subset and, on rank 0,
        loads the feature network and the reference statistics; any problem is a ConfigError (one line, on
        every rank) raised before training starts. ``purpose`` heads the line that says what is evaluated
        (default: the training run's cadence and EMA)."""
        if not cfg.train.eval_every:
            return None
        from trainer.data import DataError, read_ranges, split_size
        from trainer.diffusion import diffusion_from_config

        tc = cfg.train
        num_classes = manifest.num_classes if cfg.model.class_cond else None
        # Read in this process: no loader workers for a few hundred images.
        data_cfg = cfg.data.model_copy(update={"num_workers": 0, "pin_memory": False})
        n = min(tc.eval_images, split_size(data_cfg, manifest, "val"))
        if n == 0:
            raise ConfigError(f"train.eval_every: the val split of {cfg.data.root} has no images to evaluate on")
        ranges = split_range(n, cfg.sample.batch_size)
        mine = list(range(env.rank, len(ranges), env.world_size))
        got: dict[int, dict[int, tuple[torch.Tensor, int]]] = {k: {} for k in mine}
        error = None
        with _fork_rng(env.device):
            try:
                if mine:
                    for x, y, pos in read_ranges(data_cfg, manifest, "val", [ranges[k] for k in mine]):
                        for xi, yi, p in zip(x, y.tolist(), pos.tolist(), strict=True):
                            got[p // cfg.sample.batch_size][p] = (xi.clone(), yi)
            except DataError as err:  # data.on_error=raise: every rank stops, not only the one that read it
                error = str(err)
            if distributed.any_rank(error is not None, env.device):
                raise ConfigError(f"train.eval_every: {error or 'another rank could not read its validation images'}")
            fid = cls._load_fid(cfg, env, manifest) if tc.eval_features and tc.eval_reference else None
        parts = {}
        for k, items in got.items():
            if items:  # images lost to corrupt data are simply absent (the data log names them)
                order = sorted(items)
                parts[k] = (
                    torch.stack([items[i][0] for i in order]),
                    torch.tensor([items[i][1] for i in order], dtype=torch.long),
                )
        diffusion = diffusion_from_config(cfg.diffusion)
        if env.is_main:
            K = min(tc.eval_timesteps, diffusion.num_timesteps - 1)
            fewer = (
                f" (the whole val split: fewer than train.eval_images={tc.eval_images})" if n < tc.eval_images else ""
            )
            what = f"bits/dim estimate on {n} val images{fewer}, {K + 1} of T={diffusion.num_timesteps} timesteps each"
            if fid is not None:
                what += f"; FID on {fid.num_samples} samples ({cfg.sample.method} {fid.respacing}, {tc.eval_features})"
            purpose = purpose or f"evaluation every {tc.eval_every} steps with EMA {cfg.train.ema_rates[0]}"
            print(f"{purpose}: {what}", flush=True)
        return cls(cfg, env, diffusion, manifest.image_size, manifest.channels, num_classes, parts, n, fid)

    @staticmethod
    def _load_fid(cfg: Config, env: distributed.DistEnv, manifest: Any) -> _FID:
        """The feature network and reference on rank 0, checked on a dummy batch of the run's image shape."""
        from trainer.evaluation.features import load_feature_net
        from trainer.evaluation.quality import QualityError, check_feature_net, load_reference

        tc = cfg.train
        net = ref = None
        error = None
        if env.is_main:
            try:
                ref, meta = load_reference(tc.eval_reference)  # first: cheaper than loading a network
                net = load_feature_net(tc.eval_features, env.device)
                if not meta.get("assumes"):  # guided-diffusion / EDM batches record no network (FID only here)
                    check_feature_net(meta, net.name, tc.eval_reference)
                dummy = np.zeros((2, manifest.image_size, manifest.image_size, manifest.channels), dtype=np.uint8)
                dim = net.extract(dummy, device=env.device).pool.shape[1]
                if dim != ref.pool.mean.shape[0]:
                    raise QualityError(
                        f"feature network {tc.eval_features} gives {dim}-d features, reference {tc.eval_reference} "
                        f"holds {ref.pool.mean.shape[0]}-d statistics"
                    )
            except (ValueError, OSError, RuntimeError) as err:  # QualityError is a ValueError
                first = " ".join(str(err).split())[:400]
                error = f"train.eval_features/eval_reference: {first}"
        error = distributed.broadcast_object(error, env.device)
        if error:
            raise ConfigError(error)
        return _FID(net, ref, tc.eval_fid_samples, tc.eval_sample_steps)

    # -- one evaluation
    def run(self, step: int, ema: Any, tracker: Any) -> dict[str, float]:
        """Evaluate the EMA weights at ``step`` and log ``eval/*`` (collective: every rank calls it). Returns the
        metrics on rank 0 (an empty dict elsewhere)."""
        from trainer.evaluation.inference import build_inference_model

        env = self.env
        t0 = time.perf_counter()
        weights = ema.full_state_dict(self.rate)  # collective under ZeRO-3 (as for the sample grid)
        with _fork_rng(env.device), torch.no_grad():
            model = build_inference_model(
                self.cfg, weights, self.image_size, self.channels, self.num_classes, env.device
            )  # eval mode; building it initialises weights from the (forked) global RNG
            del weights
            metrics = self._bpd(model, step)
            t_bpd = time.perf_counter() - t0
            if self.fid is not None:
                metrics.update(self._fid(model))
        del model
        seconds = time.perf_counter() - t0
        if not env.is_main:
            return {}
        metrics["eval/seconds"] = seconds
        tracker.log_metrics(metrics, step=step)
        line = f"eval step {step}: "
        if "eval/val_bpd_est" in metrics:
            q = " ".join(f"{g} {metrics[f'eval/val_bpd_{g}']:.3f}" for g in GROUPS)
            line += (
                f"val bits/dim ~ {metrics['eval/val_bpd_est']:.4f} ({int(metrics['eval/val_images'])} images, "
                f"{len(self.bounds)} of T={self.diffusion.num_timesteps} timesteps each; {q} prior "
                f"{metrics['eval/val_prior_bpd']:.4f}) {t_bpd:.1f}s"
            )
        else:
            line += "no validation image could be read"
        if "eval/fid" in metrics:
            line += (
                f" | fid {metrics['eval/fid']:.3f} precision {metrics['eval/precision']:.3f} recall "
                f"{metrics['eval/recall']:.3f} kid {metrics['eval/kid']:.5f} ({self.fid.num_samples} samples, "
                f"{self.cfg.sample.method} {self.fid.respacing}) {seconds - t_bpd:.1f}s"
            )
        print(f"{line} | {seconds:.1f}s in all", flush=True)
        return metrics

    def _bpd(self, model: torch.nn.Module, step: int) -> dict[str, float]:
        env, device, T = self.env, self.env.device, self.diffusion.num_timesteps
        seed = self.cfg.train.seed
        sums = torch.zeros(2 + len(GROUPS), dtype=torch.float64, device=device)  # count, total, groups
        prior = torch.zeros((), dtype=torch.float64, device=device)
        for k, (x, y) in sorted(self.parts.items()):
            kwargs = {"y": y.to(device)} if self.num_classes else {}

            def noise(j: int, k: int = k) -> torch.Generator:
                return _generator(device, _seed(seed, BPD_STREAM, k, j))

            # The same timesteps per image at every evaluation: a CPU generator of fixed seed per part.
            ts = draw_timesteps(self.bounds, x.shape[0], torch.Generator().manual_seed(_seed(seed, TIMESTEP_STREAM, k)))
            terms, prior_k = bpd_terms(self.diffusion, model, x.to(device), ts, kwargs, noise)
            per_image = weighted_sums(terms, prior_k, ts, self.bounds, T)
            sums[0] += x.shape[0]
            sums[1] += per_image["total"].sum()
            for i, g in enumerate(GROUPS):
                sums[2 + i] += per_image[g].sum()
            prior += per_image["prior"].sum()
        sums = torch.cat([sums, prior[None]])
        if dist.is_available() and dist.is_initialized() and env.world_size > 1:
            dist.all_reduce(sums)
        values = sums.tolist()
        n = values[0]
        if n == 0:
            return {}
        out = {"eval/val_bpd_est": values[1] / n, "eval/val_prior_bpd": values[-1] / n, "eval/val_images": n}
        out.update({f"eval/val_bpd_{g}": values[2 + i] / n for i, g in enumerate(GROUPS)})
        if not math.isfinite(out["eval/val_bpd_est"]) and env.is_main:
            print(f"warning: eval step {step}: the bits/dim estimate is not finite", flush=True)
        return out

    def _fid(self, model: torch.nn.Module) -> dict[str, float]:
        from trainer.evaluation.inference import generate_uint8
        from trainer.evaluation.quality import compute_all

        assert self.fid is not None
        env, device, s = self.env, self.env.device, self.cfg.sample
        shape = (self.channels, self.image_size, self.image_size)
        ranges = split_range(self.fid.num_samples, s.batch_size)
        made: dict[int, np.ndarray] = {}
        for k in range(env.rank, len(ranges), env.world_size):
            lo, hi = ranges[k]
            kwargs = {"y": (torch.arange(lo, hi) % self.num_classes).to(device)} if self.num_classes else {}
            gen = _generator(device, _seed(self.cfg.train.seed, FID_STREAM, k))
            made[k] = generate_uint8(
                model, self.diffusion, s, (hi - lo, *shape), device, kwargs, gen, respacing=self.fid.respacing
            )
        if dist.is_available() and dist.is_initialized() and env.world_size > 1:
            gathered: list[Any] | None = [None] * env.world_size if env.is_main else None
            dist.gather_object(made, gathered, dst=0)
            if gathered is not None:
                made = {k: v for part in gathered for k, v in part.items()}
        if not env.is_main:
            return {}
        images = np.concatenate([made[k] for k in sorted(made)])
        feats = self.fid.net.extract(images, batch_size=s.batch_size, device=device)
        q = compute_all(self.fid.reference, feats)
        out = {"eval/fid": q["fid"], "eval/precision": q["precision"], "eval/recall": q["recall"]}
        out["eval/kid"] = q["kid_mean"]
        for key in ("sfid", "is"):
            if key in q:
                out[f"eval/{key}"] = q[key]
        return out
