"""The Gaussian diffusion process: forward q, posterior, the model's p, training losses and bits/dim.

Conventions (Ho et al. 2020 "DDPM"; Nichol & Dhariwal 2021 "Improved DDPM"):
- timesteps t = 0..T-1, t = 0 is the first noising step (paper t = 1);
- tables are float64 numpy arrays, gathered per batch and cast to float32 (float64 inputs stay
  float64, which the tests use for tight checks);
- model outputs may be bf16 (DeepSpeed bf16 engines): they are cast to float32 before any variance,
  KL or likelihood arithmetic, and that arithmetic runs with autocast disabled.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from enum import Enum
from typing import Any, TypeVar

import numpy as np
import torch
from torch import Tensor

from .kl import discretized_gaussian_log_likelihood, mean_flat, nats_to_bpd, normal_kl

Model = Callable[..., Tensor]
"""``model(x_t, t, **model_kwargs)``: t holds original (training) timestep indices."""
ProgressFn = Callable[[int, int], None]
"""``progress(done, total)``, called after each step."""


class ModelMeanType(str, Enum):
    EPSILON = "epsilon"
    """The model predicts the noise ε (Ho et al. 2020, eq. 11)."""
    START_X = "x0"
    """The model predicts x_0 directly."""


class ModelVarType(str, Enum):
    FIXED_SMALL = "fixed_small"
    """Σ = β̃_t, the posterior variance (log β̃ at t = 0 uses β̃ at t = 1)."""
    FIXED_LARGE = "fixed_large"
    """Σ = β_t for t ≥ 1 and β̃_1 at t = 0 (improved-diffusion's choice: β_0 is tiny and would make the
    decoder term of the bound needlessly sharp)."""
    LEARNED_RANGE = "learned_range"
    """Model outputs 2C channels (mean part, v); log Σ = frac·log β_t + (1−frac)·log β̃_t,
    frac = (v + 1)/2 (Nichol & Dhariwal 2021, eq. 15)."""


class LossType(str, Enum):
    MSE = "mse"
    """L_simple: mean over pixels of the squared error of the mean parameterisation."""
    HYBRID = "hybrid"
    """L_simple + λ·L_vlb with the mean detached inside L_vlb (Nichol & Dhariwal 2021, eq. 16)."""
    KL = "kl"
    """L_vlb alone (mean and variance both trained by it)."""


E = TypeVar("E", bound=Enum)


def parse_enum(cls: type[E], value: str | E, key: str) -> E:
    """``cls(value)`` with a one-line error naming the key and the allowed values."""
    try:
        return cls(value)
    except ValueError:
        allowed = ", ".join(repr(m.value) for m in cls)
        raise ValueError(f"unknown {key} {value!r}; expected one of {allowed}") from None


@contextmanager
def fp32_math(device: torch.device) -> Iterator[None]:
    """Disable autocast so the variance/KL arithmetic runs in the tensors' own (float32) precision."""
    with torch.autocast(device_type=device.type, enabled=False):
        yield


def randn(
    shape: Sequence[int],
    *,
    device: torch.device | str | None = None,
    generator: torch.Generator | None = None,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """Standard normal noise; with a generator, drawn on the generator's device and moved, so a CPU
    generator gives the same numbers whatever the target device."""
    if generator is None:
        return torch.randn(tuple(shape), device=device, dtype=dtype)
    return torch.randn(tuple(shape), generator=generator, device=generator.device, dtype=dtype).to(device)


def _compute_dtype(x: Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


class GaussianDiffusion:
    """A (possibly respaced) Gaussian diffusion process with T = len(betas) steps.

    ``timestep_map[k]`` is the original training timestep of step k; the model is always called with
    mapped timesteps, so a respaced process drives a model trained on the full process.
    """

    def __init__(
        self,
        betas: Sequence[float] | np.ndarray,
        mean_type: ModelMeanType | str = ModelMeanType.EPSILON,
        var_type: ModelVarType | str = ModelVarType.FIXED_SMALL,
        loss_type: LossType | str = LossType.MSE,
        vlb_weight: float = 0.001,
        timestep_map: Sequence[int] | np.ndarray | None = None,
        base_num_timesteps: int | None = None,
    ) -> None:
        betas = np.asarray(betas, dtype=np.float64)
        if betas.ndim != 1 or betas.size < 1:
            raise ValueError(f"betas must be a non-empty 1-D sequence, got shape {betas.shape}")
        if not np.all((betas > 0.0) & (betas < 1.0)):
            raise ValueError(f"every beta must lie in (0, 1); got min {betas.min()}, max {betas.max()}")
        self.mean_type = parse_enum(ModelMeanType, mean_type, "mean_type")
        self.var_type = parse_enum(ModelVarType, var_type, "var_type")
        self.loss_type = parse_enum(LossType, loss_type, "loss")
        if self.loss_type is LossType.HYBRID and self.var_type is not ModelVarType.LEARNED_RANGE:
            raise ValueError(
                f"loss 'hybrid' needs var_type 'learned_range' (L_vlb trains the variance), got {self.var_type.value!r}"
            )
        if not vlb_weight >= 0.0:
            raise ValueError(f"vlb_weight must be >= 0, got {vlb_weight}")
        self.vlb_weight = float(vlb_weight)

        T = betas.size
        self.num_timesteps = int(T)
        if timestep_map is None:
            timestep_map = np.arange(T, dtype=np.int64)
        self.timestep_map = np.asarray(timestep_map, dtype=np.int64)
        if self.timestep_map.shape != (T,):
            raise ValueError(f"timestep_map must have {T} entries, got shape {self.timestep_map.shape}")
        self.base_num_timesteps = int(base_num_timesteps if base_num_timesteps is not None else T)

        alphas = 1.0 - betas
        ac = np.cumprod(alphas)
        ac_prev = np.append(1.0, ac[:-1])
        post_var = betas * (1.0 - ac_prev) / (1.0 - ac)
        # β̃_0 = 0: its log is clipped to log β̃_1 (a one-step process has no β̃_1 and uses β_0).
        clipped = np.append(post_var[1], post_var[1:]) if T > 1 else betas.copy()
        self.betas = betas
        self.alphas_cumprod = ac
        self.alphas_cumprod_prev = ac_prev
        self.alphas_cumprod_next = np.append(ac[1:], 0.0)
        self.posterior_variance = post_var
        self.posterior_log_variance_clipped = np.log(clipped)
        # Fixed-large: β_t, except β̃_1 at t = 0, as improved-diffusion (a one-step process keeps β_0).
        large = np.append(post_var[1], betas[1:]) if T > 1 else betas.copy()
        self._np: dict[str, np.ndarray] = {
            "betas": betas,
            "log_betas": np.log(betas),
            "fixed_large_log_variance": np.log(large),
            "alphas_cumprod": ac,
            "alphas_cumprod_prev": ac_prev,
            "sqrt_alphas_cumprod": np.sqrt(ac),
            "sqrt_one_minus_alphas_cumprod": np.sqrt(1.0 - ac),
            "log_one_minus_alphas_cumprod": np.log(1.0 - ac),
            "sqrt_recip_alphas_cumprod": np.sqrt(1.0 / ac),
            "sqrt_recipm1_alphas_cumprod": np.sqrt(1.0 / ac - 1.0),
            "posterior_variance": post_var,
            "posterior_log_variance_clipped": self.posterior_log_variance_clipped,
            # μ̃_t = coef1·x_0 + coef2·x_t (Ho et al. 2020, eq. 7)
            "posterior_mean_coef1": betas * np.sqrt(ac_prev) / (1.0 - ac),
            "posterior_mean_coef2": (1.0 - ac_prev) * np.sqrt(alphas) / (1.0 - ac),
        }
        self._cache: dict[tuple[str, torch.device], Tensor] = {}

    # ------------------------------------------------------------------ tables
    @property
    def learned_variance(self) -> bool:
        return self.var_type is ModelVarType.LEARNED_RANGE

    def table(self, name: str, device: torch.device | str = "cpu") -> Tensor:
        """A float64 table (or the int64 ``timestep_map``) as a tensor on ``device``, cached."""
        device = torch.device(device)
        key = (name, device)
        if key not in self._cache:
            src = self.timestep_map if name == "timestep_map" else self._np[name]
            self._cache[key] = torch.as_tensor(src, device=device)
        return self._cache[key]

    def extract(self, name: str, t: Tensor, like: Tensor) -> Tensor:
        """Table values at t, shaped [B, 1, ...] to broadcast against ``like``, in its compute dtype."""
        vals = self.table(name, t.device)[t].to(_compute_dtype(like))
        return vals.reshape(t.shape[0], *([1] * (like.ndim - 1)))

    def map_timesteps(self, t: Tensor) -> Tensor:
        """Original training timesteps of this process's steps t."""
        return self.table("timestep_map", t.device)[t]

    # ------------------------------------------------------------- forward q
    def q_mean_variance(self, x_start: Tensor, t: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Mean, variance and log-variance of q(x_t | x_0) = N(√ᾱ_t x_0, (1 − ᾱ_t) I) (DDPM eq. 4)."""
        mean = self.extract("sqrt_alphas_cumprod", t, x_start) * x_start
        var = 1.0 - self.extract("alphas_cumprod", t, x_start)
        log_var = self.extract("log_one_minus_alphas_cumprod", t, x_start)
        return mean, var.expand_as(mean), log_var.expand_as(mean)

    def q_sample(
        self,
        x_start: Tensor,
        t: Tensor,
        noise: Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """x_t = √ᾱ_t x_0 + √(1 − ᾱ_t) ε."""
        if noise is None:
            noise = randn(x_start.shape, device=x_start.device, generator=generator, dtype=x_start.dtype)
        return (
            self.extract("sqrt_alphas_cumprod", t, x_start) * x_start
            + self.extract("sqrt_one_minus_alphas_cumprod", t, x_start) * noise
        )

    def q_posterior_mean_variance(self, x_start: Tensor, x_t: Tensor, t: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Mean, variance β̃_t and clipped log-variance of q(x_{t-1} | x_t, x_0) (DDPM eqs. 6-7)."""
        mean = (
            self.extract("posterior_mean_coef1", t, x_t) * x_start + self.extract("posterior_mean_coef2", t, x_t) * x_t
        )
        var = self.extract("posterior_variance", t, x_t).expand_as(mean)
        log_var = self.extract("posterior_log_variance_clipped", t, x_t).expand_as(mean)
        return mean, var, log_var

    def predict_xstart_from_eps(self, x_t: Tensor, t: Tensor, eps: Tensor) -> Tensor:
        """x_0 = (x_t − √(1 − ᾱ_t) ε)/√ᾱ_t."""
        return (
            self.extract("sqrt_recip_alphas_cumprod", t, x_t) * x_t
            - self.extract("sqrt_recipm1_alphas_cumprod", t, x_t) * eps
        )

    def predict_eps_from_xstart(self, x_t: Tensor, t: Tensor, x_start: Tensor) -> Tensor:
        """ε = (x_t/√ᾱ_t − x_0)/√(1/ᾱ_t − 1)."""
        return (self.extract("sqrt_recip_alphas_cumprod", t, x_t) * x_t - x_start) / self.extract(
            "sqrt_recipm1_alphas_cumprod", t, x_t
        )

    # ------------------------------------------------------------- model p
    def model_output(self, model: Model, x: Tensor, t: Tensor, model_kwargs: dict[str, Any] | None = None) -> Tensor:
        """Call the model with ORIGINAL timesteps and return its output in the compute dtype (float32,
        or float64 for float64 inputs), after checking its shape."""
        out = model(x, self.map_timesteps(t), **(model_kwargs or {}))
        channels = x.shape[1] * (2 if self.learned_variance else 1)
        expected = (x.shape[0], channels, *x.shape[2:])
        if tuple(out.shape) != expected:
            why = " (learned_range needs 2*C: mean part and v)" if self.learned_variance else ""
            raise ValueError(
                f"model output has shape {tuple(out.shape)}, expected {expected}{why} "
                f"for var_type {self.var_type.value!r}"
            )
        return out.to(_compute_dtype(x))

    def split_output(self, output: Tensor) -> tuple[Tensor, Tensor | None]:
        """(mean part, v) for learned variance; (output, None) otherwise."""
        if self.learned_variance:
            mean_part, v = torch.chunk(output, 2, dim=1)
            return mean_part, v
        return output, None

    def p_mean_variance_from_output(
        self,
        output: Tensor,
        x: Tensor,
        t: Tensor,
        clip_denoised: bool = False,
        denoised_fn: Callable[[Tensor], Tensor] | None = None,
    ) -> dict[str, Tensor]:
        """p(x_{t-1} | x_t) from a model output: mean, variance, log_variance, pred_xstart, eps.

        The mean is always μ̃(x̂_0, x_t) (DDPM eq. 7), which for ε-prediction without clipping equals
        DDPM eq. 11. ``eps`` is re-derived from the (possibly clipped) x̂_0.
        """
        with fp32_math(x.device):
            output = output.to(_compute_dtype(x))
            mean_part, v = self.split_output(output)
            if self.var_type is ModelVarType.LEARNED_RANGE:
                assert v is not None
                min_log = self.extract("posterior_log_variance_clipped", t, x)
                max_log = self.extract("log_betas", t, x)
                frac = (v + 1.0) / 2.0
                log_var = frac * max_log + (1.0 - frac) * min_log
            elif self.var_type is ModelVarType.FIXED_LARGE:
                log_var = self.extract("fixed_large_log_variance", t, x).expand_as(x)
            else:
                log_var = self.extract("posterior_log_variance_clipped", t, x).expand_as(x)

            if self.mean_type is ModelMeanType.EPSILON:
                pred_xstart = self.predict_xstart_from_eps(x, t, mean_part)
            else:
                pred_xstart = mean_part
            if denoised_fn is not None:
                pred_xstart = denoised_fn(pred_xstart)
            if clip_denoised:
                pred_xstart = pred_xstart.clamp(-1.0, 1.0)
            mean, _, _ = self.q_posterior_mean_variance(pred_xstart, x, t)
            eps = self.predict_eps_from_xstart(x, t, pred_xstart)
            return {
                "mean": mean,
                "variance": torch.exp(log_var),
                "log_variance": log_var,
                "pred_xstart": pred_xstart,
                "eps": eps,
            }

    def p_mean_variance(
        self,
        model: Model,
        x: Tensor,
        t: Tensor,
        clip_denoised: bool = True,
        denoised_fn: Callable[[Tensor], Tensor] | None = None,
        model_kwargs: dict[str, Any] | None = None,
    ) -> dict[str, Tensor]:
        """Call the model and return p(x_{t-1} | x_t) (see ``p_mean_variance_from_output``), plus
        ``model_output``."""
        output = self.model_output(model, x, t, model_kwargs)
        out = self.p_mean_variance_from_output(output, x, t, clip_denoised, denoised_fn)
        out["model_output"] = output
        return out

    def predict_eps(self, model: Model, x: Tensor, t: Tensor, model_kwargs: dict[str, Any] | None = None) -> Tensor:
        """The model's unclipped ε̂(x_t, t) whatever its parameterisation (variance channels dropped)."""
        mean_part, _ = self.split_output(self.model_output(model, x, t, model_kwargs))
        if self.mean_type is ModelMeanType.EPSILON:
            return mean_part
        with fp32_math(x.device):
            return self.predict_eps_from_xstart(x, t, mean_part)

    def p_sample(
        self,
        model: Model,
        x: Tensor,
        t: Tensor,
        clip_denoised: bool = True,
        denoised_fn: Callable[[Tensor], Tensor] | None = None,
        model_kwargs: dict[str, Any] | None = None,
        noise: Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> dict[str, Tensor]:
        """One ancestral step x_{t-1} ~ p(x_{t-1} | x_t) (DDPM Algorithm 2); no noise at t = 0."""
        out = self.p_mean_variance(model, x, t, clip_denoised, denoised_fn, model_kwargs)
        if noise is None:
            noise = randn(x.shape, device=x.device, generator=generator, dtype=out["mean"].dtype)
        nonzero = (t != 0).to(out["mean"].dtype).reshape(-1, *([1] * (x.ndim - 1)))
        sample = out["mean"] + nonzero * torch.exp(0.5 * out["log_variance"]) * noise
        return {"sample": sample, "pred_xstart": out["pred_xstart"], "mean": out["mean"]}

    # ------------------------------------------------------------ L_vlb
    def vb_terms_bpd(
        self,
        output: Tensor,
        x_start: Tensor,
        x_t: Tensor,
        t: Tensor,
        clip_denoised: bool = False,
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """Per-sample L_t in bits/dim from a model output (Nichol & Dhariwal 2021, eqs. 4-6):
        KL(q(x_{t-1} | x_t, x_0) ‖ p(x_{t-1} | x_t)) for t > 0, the discretized decoder NLL
        −log p(x_0 | x_1) for t = 0. Returns (vb [B], p dict)."""
        p = self.p_mean_variance_from_output(output, x_t, t, clip_denoised)
        with fp32_math(x_t.device):
            true_mean, _, true_log_var = self.q_posterior_mean_variance(x_start, x_t, t)
            vb = nats_to_bpd(normal_kl(true_mean, true_log_var, p["mean"], p["log_variance"]))
            # The decoder term is costly (log Φ) and only needed where t = 0: compute it on those rows.
            first = (t == 0).nonzero(as_tuple=True)[0]
            if first.numel() > 0:
                nll = nats_to_bpd(
                    -discretized_gaussian_log_likelihood(
                        x_start[first], p["mean"][first], 0.5 * p["log_variance"][first]
                    )
                )
                vb = vb.index_put((first,), nll)
            return vb, p

    def prior_bpd(self, x_start: Tensor) -> Tensor:
        """KL(q(x_T | x_0) ‖ N(0, I)) per sample in bits/dim; no parameters, so it only measures how
        well the schedule destroys the signal."""
        x_start = x_start.to(_compute_dtype(x_start))
        with fp32_math(x_start.device):
            t = torch.full((x_start.shape[0],), self.num_timesteps - 1, device=x_start.device)
            mean, _, log_var = self.q_mean_variance(x_start, t)
            return nats_to_bpd(normal_kl(mean, log_var, torch.zeros_like(mean), torch.zeros_like(mean)))

    # ------------------------------------------------------------ training
    def training_losses(
        self,
        model: Model,
        x_start: Tensor,
        t: Tensor,
        model_kwargs: dict[str, Any] | None = None,
        noise: Tensor | None = None,
    ) -> dict[str, Tensor]:
        """Per-sample loss terms, each of shape [B]:

        - ``mse``: L_simple, mean over pixels of (target − prediction)², target ε or x_0;
        - ``vb``: the unweighted L_t in bits/dim (always present; with loss 'mse' it is computed
          without gradient, for monitoring and for the loss-aware timestep sampler);
        - ``loss``: what to minimise (before importance weights):
            mse    → mse
            hybrid → mse + λ·T·vb, with the mean part detached inside vb
            kl     → T·vb

        Why λ·T: L_vlb = Σ_{t=0}^{T-1} L_t (+ the parameter-free prior term), and a uniformly drawn
        t gives the unbiased one-sample estimate T·L_t of it. So "L_hybrid = L_simple + λ·L_vlb with
        λ = 0.001" (Nichol & Dhariwal 2021, eq. 16) is, per sampled t, mse + 0.001·T·L_t — the same
        as improved-diffusion's "RESCALED_MSE", which multiplies the vb term by T/1000. With a
        non-uniform timestep sampler the caller's 1/(T·p_t) weights keep the estimate unbiased.

        The detach makes L_vlb train only the variance (v channels) while L_simple alone trains the
        mean (Nichol & Dhariwal 2021, sec. 3.1).
        """
        if t.ndim != 1 or t.shape[0] != x_start.shape[0]:
            raise ValueError(f"t must have shape [{x_start.shape[0]}], got {tuple(t.shape)}")
        # Checked on the device: reading t on the host would stall a GPU every training step. On the CPU
        # this raises at once; on CUDA it is a device-side assert (t comes from our timestep samplers).
        torch._assert_async(
            ((t >= 0) & (t < self.num_timesteps)).all(), f"timesteps must lie in [0, {self.num_timesteps - 1}]"
        )
        x_start = x_start.to(_compute_dtype(x_start))
        if noise is None:
            noise = torch.randn_like(x_start)
        noise = noise.to(x_start.dtype)
        x_t = self.q_sample(x_start, t, noise=noise)
        output = self.model_output(model, x_t, t, model_kwargs)

        with fp32_math(x_start.device):
            mean_part, v = self.split_output(output)
            target = noise if self.mean_type is ModelMeanType.EPSILON else x_start
            mse = mean_flat((target - mean_part) ** 2)
            if self.loss_type is LossType.KL:
                vb, _ = self.vb_terms_bpd(output, x_start, x_t, t)
                loss = self.num_timesteps * vb
            elif self.loss_type is LossType.HYBRID:
                assert v is not None
                frozen = torch.cat([mean_part.detach(), v], dim=1)  # stop-gradient on the mean
                vb, _ = self.vb_terms_bpd(frozen, x_start, x_t, t)
                loss = mse + self.vlb_weight * self.num_timesteps * vb
            else:
                with torch.no_grad():
                    vb, _ = self.vb_terms_bpd(output.detach(), x_start, x_t, t)
                loss = mse
        return {"loss": loss, "mse": mse, "vb": vb}

    # ------------------------------------------------------------ evaluation
    @torch.no_grad()
    def calc_bpd_loop(
        self,
        model: Model,
        x_start: Tensor,
        model_kwargs: dict[str, Any] | None = None,
        clip_denoised: bool = True,
        progress: ProgressFn | None = None,
        generator: torch.Generator | None = None,
    ) -> dict[str, Tensor]:
        """The full variational bound for a batch, every timestep evaluated (one noise draw each).

        Returns ``total_bpd`` [B] (= Σ_t vb + prior), ``prior_bpd`` [B], and per-timestep [B, T]
        tables indexed by t: ``vb`` (L_t in bits/dim), ``xstart_mse`` (x̂_0 vs x_0) and ``mse``
        (ε̂ vs ε, with ε̂ re-derived from the possibly clipped x̂_0).
        """
        x_start = x_start.to(_compute_dtype(x_start))
        B, T = x_start.shape[0], self.num_timesteps
        vb = torch.zeros(B, T, device=x_start.device, dtype=x_start.dtype)
        xstart_mse = torch.zeros_like(vb)
        mse = torch.zeros_like(vb)
        for i, step in enumerate(range(T - 1, -1, -1)):
            t = torch.full((B,), step, device=x_start.device, dtype=torch.long)
            noise = randn(x_start.shape, device=x_start.device, generator=generator, dtype=x_start.dtype)
            x_t = self.q_sample(x_start, t, noise=noise)
            output = self.model_output(model, x_t, t, model_kwargs)
            terms, p = self.vb_terms_bpd(output, x_start, x_t, t, clip_denoised=clip_denoised)
            vb[:, step] = terms
            xstart_mse[:, step] = mean_flat((p["pred_xstart"] - x_start) ** 2)
            mse[:, step] = mean_flat((p["eps"] - noise) ** 2)
            if progress is not None:
                progress(i + 1, T)
        prior = self.prior_bpd(x_start)
        return {
            "total_bpd": vb.sum(dim=1) + prior,
            "prior_bpd": prior,
            "vb": vb,
            "xstart_mse": xstart_mse,
            "mse": mse,
        }


__all__ = [
    "GaussianDiffusion",
    "LossType",
    "Model",
    "ModelMeanType",
    "ModelVarType",
    "ProgressFn",
    "fp32_math",
    "parse_enum",
    "randn",
]
