"""Typed configuration: the schema, YAML loading, and dotted command-line overrides.

Every other module receives one of these objects; nothing else parses YAML or reads the
environment for settings. Errors are raised as :class:`ConfigError` with a one-line message
that names the file, the key and the offending value.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator


class ConfigError(ValueError):
    """A configuration problem, with a message fit to print on one line."""


class _Section(BaseModel):
    # extra="forbid": a typo in a key is an error, not a silently ignored setting.
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class DataConfig(_Section):
    root: str = "data/digits16"
    """Directory written by ``data_prep`` (holds ``manifest.json``)."""
    train_shards: str | None = None
    """Shard URL(s) for training, overriding the manifest: a brace pattern, ``pipe:``/``http(s)`` URL,
    or several separated by spaces. Relative paths are resolved against ``root``."""
    val_shards: str | None = None
    """Shard URL(s) for evaluation, overriding the manifest (same forms as ``train_shards``)."""
    batch_size: int = Field(64, gt=0)
    """Per-rank micro-batch size; with ``global_batch_size`` set, the largest micro-batch a rank may use."""
    global_batch_size: int | None = Field(None, gt=0)
    """Images per optimizer step over all ranks. When set, the per-rank micro-batch and
    ``train.grad_accum`` are derived from it and the world size, so a preset means the same training on
    any number of GPUs; a split that is impossible stops with one line."""
    num_workers: int | None = Field(None, ge=0)
    """DataLoader worker processes per rank (0: decode in the training process). None: 4 on CUDA
    (decoding must keep up with a GPU), 0 on CPU (the cores are busy training)."""
    partitions: int | None = Field(None, gt=0)
    """Canonical data partitions (``trainer/data/canonical.py``): the training set of every epoch is cut into this
    many contiguous parts, and each global batch takes the same number of samples from each. It fixes the data
    order whatever the number of ranks: it must divide the global batch, and the world size must divide it (a
    resume on another number of ranks continues the same data order when it does). None: the largest divisor
    of the global batch up to 64."""
    shuffle_buffer: int = Field(1000, ge=0)
    """Samples each canonical partition holds to shuffle the piece of a shard it reads (drained at the piece's
    end; 0 or 1: no shuffle). Per partition: a rank holds one buffer per partition it owns."""
    random_flip: bool = True
    """Flip training images left-right with probability 1/2 (drawn per sample on the device, from the sample's
    own generator: ``trainer/per_sample.py``)."""
    seed: int = 0
    """Data-order seed (the shard order and shuffles of every epoch)."""
    on_error: Literal["skip", "raise"] = "skip"
    """Corrupt samples, truncated or unreadable shards: "skip" (warn once per shard, count in
    ``stream.stats()``) or "raise" (stop with the first problem)."""
    prefetch_factor: int = Field(2, ge=1)
    """Batches each DataLoader worker prepares ahead (only with ``num_workers > 0``)."""
    pin_memory: bool | None = None
    """Page-locked batches for faster, asynchronous host-to-GPU copies. None: on for CUDA, off on CPU."""


class ModelConfig(_Section):
    """The UNet (``trainer.models.unet``); shapes are checked against the image size at build time."""

    channels: int = Field(128, gt=0)
    """Base width; level ``i`` has ``channels * channel_mult[i]`` channels."""
    channel_mult: list[int] = Field(default_factory=lambda: [1, 2, 2, 2], min_length=1)
    """One multiplier per resolution level; the image is halved between levels."""
    num_res_blocks: int = Field(3, gt=0)
    """Residual blocks per level on the way down (the way up has one more)."""
    attention_resolutions: list[int] = Field(default_factory=lambda: [16, 8])
    """Resolutions in pixels (e.g. 16 = the 16×16 level) whose ResBlocks are followed by self-attention.
    The middle block always has attention."""
    num_heads: int = Field(4, gt=0)
    num_head_channels: int = -1
    """Channels per attention head; when > 0 it overrides ``num_heads``."""
    num_heads_upsample: int = -1
    """Heads of the attention blocks on the way up (improved-diffusion's flag of the same name); -1: as the
    rest of the network (``num_heads`` / ``num_head_channels``)."""
    rescale_timesteps: bool = False
    """Feed the network t·1000/T instead of t (improved-diffusion's ``rescale_timesteps``, which its CIFAR-10 and
    ImageNet-64 models were trained with at T = 4000): training, sampling, bits/dim and the export all see the
    same scaled values, because the UNet applies it itself. Imported checkpoints set it from their flags."""
    dropout: float = Field(0.1, ge=0.0, lt=1.0)
    """Dropout inside every ResBlock (paper: 0.3 on CIFAR-10, 0 on ImageNet 64)."""
    use_scale_shift_norm: bool = True
    """FiLM conditioning: ``norm(h)·(1+scale)+shift`` from the timestep embedding, instead of adding it."""
    resblock_updown: bool = False
    """Resample with ResBlocks (BigGAN style) instead of strided / nearest + conv layers."""
    class_cond: bool = False
    """Class-conditional embedding (plus a null class for unconditional use)."""
    label_dropout: float = 0.1
    """With ``class_cond``: the fraction of training labels replaced by the null class (each label
    independently, drawn per micro-batch), so that the null class is trained and the model can sample
    unconditionally and with classifier-free guidance (Ho & Salimans 2022, who use 0.1-0.2; see
    ``trainer/guidance.py``). 0 never trains the null class. In [0, 1); no effect when ``class_cond``
    is false."""
    use_checkpoint: bool = False
    """Activation (gradient) checkpointing per block."""
    channels_last: bool = False
    """Keep weights and activations in NHWC (faster convolutions on recent GPUs)."""
    norm_groups: int = Field(32, gt=0)
    """GroupNorm groups; must divide every level's channel count."""

    @field_validator("channel_mult")
    @classmethod
    def _positive_mults(cls, v: list[int]) -> list[int]:
        if any(m <= 0 for m in v):
            raise ValueError(f"every multiplier must be > 0, got {v}")
        return v

    @field_validator("label_dropout")
    @classmethod
    def _dropout_is_a_fraction(cls, v: float) -> float:
        if not 0.0 <= v < 1.0:
            raise ValueError(
                "must lie in [0, 1): it is the fraction of training labels replaced by the null class "
                "(1 would never train the conditional model)"
            )
        return v


class DiffusionConfig(_Section):
    steps: int = Field(4000, gt=1)
    """T, the number of diffusion steps used in training."""
    schedule: Literal["cosine", "linear"] = "cosine"
    mean_type: Literal["epsilon", "x0"] = "epsilon"
    var_type: Literal["learned_range", "fixed_small", "fixed_large"] = "learned_range"
    loss: Literal["hybrid", "mse", "kl"] = "hybrid"
    vlb_weight: float = Field(0.001, ge=0.0)
    """λ in L_hybrid = L_simple + λ·L_vlb (Nichol & Dhariwal 2021, eq. 16)."""
    timestep_sampler: Literal["uniform", "loss-second-moment"] = "uniform"
    """How t is drawn: uniformly, or with p_t ∝ sqrt(E[L_t²]) from a loss history shared by all ranks
    (Nichol & Dhariwal 2021, eq. 18; see ``trainer/timesteps.py``). What the history is fed is
    ``history_term``; with loss ``mse`` only ``history_term: loss`` is allowed."""
    history_term: Literal["vb", "loss"] = "loss"
    """What the loss-second-moment history is fed, per sample and unweighted (before 1/(T p_t)):
    "vb": the L_vlb term L_t in bits/dim (the part of the hybrid objective whose noise the paper's importance
    sampling targets; the paper found no gain for L_hybrid); "loss": the per-sample loss being optimised
    (mse + λ·T·L_t under hybrid, L_simple under mse, T·L_t under kl), improved-diffusion's choice
    (``losses["loss"]``). Under ``kl`` both give the same p_t (the history scales by T). Either way the
    weights multiply the whole loss, so the objective's estimate stays unbiased; only its variance differs.
    The default "loss" won experiment 4 of ``bench/experiments/run.py`` (L_hybrid, digits 16x16, 1000 steps,
    2 seeds, exact bits/dim on 64 held-out images): fed "loss" 2.965, uniform t 2.984, fed "vb" 3.043; "vb" −
    "loss" +0.078 bits/dim, 95 % paired interval [+0.068, +0.088]; the training loss was also the least noisy
    fed "loss" (docs/RESULTS.md). Fed "vb", p_t piles
    onto the few t where L_t is large and L_simple elsewhere gets weights up to 1/u: unbiased but noisier.
    No effect with ``timestep_sampler: uniform``."""
    history_per_term: int = Field(10, gt=0)
    """N: recent L_t values kept per t; t is drawn uniformly until every t has N of them."""
    uniform_prob: float = Field(0.001, ge=0.0, le=1.0)
    """u: uniform share mixed into the importance distribution, p = (1-u)·p_raw + u/T; it bounds
    the importance weight 1/(T p_t) by 1/u."""

    @property
    def learn_sigma(self) -> bool:
        """The model predicts the variance too: ε and v, 2·C output channels (learned range, eq. 15)."""
        return self.var_type == "learned_range"

    def output_channels(self, image_channels: int) -> int:
        """Channels the UNet outputs for images of ``image_channels`` channels."""
        return image_channels * (2 if self.learn_sigma else 1)

    @model_validator(mode="after")
    def _loss_needs_variance(self) -> DiffusionConfig:
        if self.loss == "hybrid" and self.var_type != "learned_range":
            raise ValueError("loss 'hybrid' needs var_type 'learned_range' (L_vlb trains the variance)")
        if self.loss == "mse" and self.var_type == "learned_range":
            raise ValueError(
                "loss 'mse' with var_type 'learned_range' never trains the variance channels: "
                "use var_type fixed_small/fixed_large, or loss hybrid"
            )
        return self

    @model_validator(mode="after")
    def _importance_sampling_needs_vlb(self) -> DiffusionConfig:
        # Under mse the L_vlb term is only monitored: a history of it would weight L_simple by how noisy
        # a term that is not optimised is. A history of the optimised loss itself (L_simple) is coherent.
        if self.timestep_sampler == "loss-second-moment" and self.loss == "mse" and self.history_term == "vb":
            raise ValueError(
                "timestep_sampler 'loss-second-moment' with history_term 'vb' needs loss 'hybrid' or 'kl' "
                "(its history is fed the L_vlb term, which loss 'mse' does not optimise); "
                "with loss 'mse' set history_term 'loss'"
            )
        return self


class PhemaConfig(_Section):
    """Post-hoc EMA (Karras et al. 2024, EDM2): power-function EMA profiles tracked during training, with
    periodic snapshots from which ``python -m trainer.phema reconstruct`` builds the EMA of any length
    afterwards (``trainer/phema``)."""

    enabled: bool = False
    sigma_rels: list[float] = Field(default_factory=lambda: [0.05, 0.10], min_length=1)
    """The tracked profiles, by relative width σ_rel = std/training length (EDM2 eq. 2), in (0, 0.2887]."""
    every_steps: int = Field(1000, gt=0)
    """Kept optimizer steps between snapshots (the last step writes one too)."""
    every_images: int | None = Field(None, gt=0)
    """When set, the interval in training images instead (rounded to whole steps of the global batch)."""
    keep: int = Field(0, ge=0)
    """Newest snapshots kept in ``<output_dir>/phema`` (0: all); never pruned with checkpoints."""

    @field_validator("sigma_rels")
    @classmethod
    def _widths_in_range(cls, v: list[float]) -> list[float]:
        limit = (1.0 / 12.0) ** 0.5
        if any(not 0.0 < s <= limit for s in v) or len(set(v)) != len(v):
            raise ValueError(f"every sigma_rel must lie in (0, {limit:.4f}] and be distinct, got {v}")
        return v


class TrainConfig(_Section):
    total_steps: int = Field(500_000, gt=0)
    """Optimizer steps."""
    lr: float = Field(1e-4, gt=0.0)
    weight_decay: float = Field(0.0, ge=0.0)
    warmup_steps: int = Field(0, ge=0)
    lr_schedule: Literal["constant", "cosine"] = "constant"
    grad_accum: int = Field(1, gt=0)
    """Micro-batches per optimizer step. With bf16, ZeRO 0/2/3 accumulate gradients in bf16; for long
    accumulation set ``train.deepspeed={data_types: {grad_accum_dtype: fp32}}`` (DeepSpeed's option)."""
    grad_clip: float = Field(1.0, ge=0.0)
    """Global gradient-norm clip; 0 disables it."""
    ema_rates: list[float] = Field(default_factory=lambda: [0.9999])
    phema: PhemaConfig = Field(default_factory=PhemaConfig)
    """Post-hoc EMA: power-function profiles and their snapshots (off by default)."""
    precision: Literal["auto", "bf16", "fp32"] = "auto"
    """"auto": the DeepSpeed JSON's ``bf16.enabled`` if ``deepspeed_config`` sets it, else bf16 where the
    device computes it natively (CUDA with bf16 support; a CPU with AVX512-BF16 or AMX) and fp32 elsewhere
    (emulated bf16 on an AVX2 CPU is ~10x slower than fp32). Resolved once at start and logged."""
    compile: bool = False
    """``torch.compile`` the UNet (CUDA: faster steps after a compile of a minute or two)."""
    init_from: str | None = None
    """Fine-tune: an export (``export.pt``, or a run / checkpoint directory holding one; ours, or an improved-diffusion
    checkpoint imported with ``python -m trainer.convert from-iddpm``) whose EMA weights (at its ``sample.ema_rate``)
    initialise a NEW run's model and every EMA; the optimizer, LR schedule and counters start fresh, on any ZeRO
    stage. ``model`` and ``diffusion`` must describe the same network (start from the import's ``config.yaml`` as
    ``base``). A run that resumes from its own checkpoint continues from that (the file is still checked at
    every start, so keep it where it is). An imported class-conditional model's null-class
    row is fresh: ``model.label_dropout`` trains it."""
    zero_stage: int | None = Field(None, ge=0, le=3)
    """None: the DeepSpeed JSON's ``zero_optimization.stage`` if set, else 2."""
    seed: int = 0
    log_every: int = Field(10, gt=0)
    sample_every: int = Field(0, ge=0)
    """Optimizer steps between sample grids during training; 0 samples only at the end."""
    importance_plot_every: int = Field(0, ge=0)
    """Steps between timestep-importance plots; 0 uses ``ckpt_every``."""
    eval_every: int = Field(0, ge=0)
    """Optimizer steps between evaluations logged to MLflow as ``eval/*`` against the step (the last step
    evaluates too); 0: off. Each one uses the EMA weights (the first of ``ema_rates``): a bits/dim estimate on
    validation images and, with ``eval_features`` and ``eval_reference``, FID/precision/recall/KID of fresh
    samples (``trainer/evaluation/periodic.py``). Training is unchanged by it: it draws only from its own generators."""
    eval_images: int = Field(256, gt=0)
    """Validation images for the bits/dim estimate: the first N of the ``val`` split in manifest order (all of
    it when smaller), the same at every evaluation and on any number of ranks."""
    eval_timesteps: int = Field(50, gt=0)
    """K for the bits/dim estimate: t = 1..T-1 is cut into K equal strata; each image gets one t per stratum,
    drawn uniformly within it (fixed seed: the same at every evaluation) and weighted by the stratum's size,
    plus the decoder term t = 0: K + 1 network calls per image instead of T, an unbiased estimate of the
    bound. Capped at T-1, where the estimate is the exact bound."""
    eval_features: str | None = None
    """Feature network for FID during training (``trainer.evaluation.features.load_feature_net``: ``inception``,
    ``inception:/path.pth`` or a .pt/.pth file); set together with ``eval_reference``, or neither."""
    eval_reference: str | None = None
    """Reference statistics ``.npz`` (``trainer/evaluate.py stats``) computed with ``eval_features``."""
    eval_fid_samples: int = Field(2000, gt=1)
    """Images sampled (with ``sample.method``) for each FID evaluation, the same noise every time."""
    eval_sample_steps: str = "ddim50"
    """Respacing of the FID samples, in ``sample.steps`` syntax ("ddim50", "50", ...)."""
    max_bad_steps: int = Field(20, gt=0)
    """Consecutive optimizer steps with a non-finite loss or gradient (each skipped on every rank) after
    which the run stops with an error; the newest checkpoint, whose weights are finite, stays latest."""
    ckpt_every: int = Field(1000, gt=0)
    keep_last: int = Field(3, gt=0)
    async_checkpoint: bool = True
    """Write checkpoints in the background: the loop pays only for a copy of the state into host memory
    (pinned on CUDA); files, fsync, ``COMPLETE``, ``latest`` and pruning follow on a writer thread, one save
    at a time. False writes them before training continues."""
    ckpt_failures_allowed: int = Field(3, ge=0)
    """Failed checkpoint saves in a row (full disk, quota, I/O error) after which the run stops (exit 5);
    below it the run warns and retries at the next checkpoint step. A failed final save always stops it."""
    output_dir: str = "runs/default"
    deepspeed_config: str | None = None
    """A DeepSpeed JSON file merged under the settings derived from this config."""
    deepspeed: dict[str, Any] = Field(default_factory=dict)
    """Extra DeepSpeed config keys, merged last (they win)."""
    collective_timeout_min: float = Field(30.0, gt=0)
    """Minutes a collective may wait for its peers before it raises (NCCL and gloo). A dead or stuck rank
    then ends the job instead of holding the allocation until its time limit. It must exceed the longest
    legitimate wait at a collective: rank 0 writing or converting a checkpoint, a slow first step."""
    hang_timeout_min: float = Field(10.0, ge=0)
    """Minutes a rank may go without finishing a step before the hang watchdog (``trainer/watchdog.py``)
    dumps every rank's stacks to ``<output_dir>/hangs/<time>/`` and fails the run (exit 4); fractions allowed,
    0 turns it off. Must be below ``collective_timeout_min``, or the collective timeout fires first and
    says nothing about which rank hung. Armed at the first finished step; paused during evaluation and grids."""

    @field_validator("ema_rates")
    @classmethod
    def _rates_in_unit_interval(cls, v: list[float]) -> list[float]:
        if any(not 0.0 < r < 1.0 for r in v):
            raise ValueError(f"every EMA rate must lie in (0, 1), got {v}")
        return v

    @field_validator("eval_sample_steps", mode="before")
    @classmethod
    def _eval_steps_as_text(cls, v: Any) -> Any:
        return str(v) if isinstance(v, int) and not isinstance(v, bool) else v

    @model_validator(mode="after")
    def _hang_timeout_below_collective_timeout(self) -> TrainConfig:
        if self.hang_timeout_min >= self.collective_timeout_min:
            raise ValueError(
                f"hang_timeout_min {self.hang_timeout_min:g} must be below collective_timeout_min "
                f"{self.collective_timeout_min:g} (else the collective timeout ends a hung run undiagnosed)"
            )
        return self

    @model_validator(mode="after")
    def _fid_needs_features_and_reference(self) -> TrainConfig:
        if (self.eval_features is None) != (self.eval_reference is None):
            names = ("eval_features", "eval_reference")
            given, absent = names if self.eval_reference is None else names[::-1]
            raise ValueError(
                f"{given} is set without {absent}: FID during training needs both (a feature network and "
                "reference statistics computed with it), or neither"
            )
        return self


class SampleConfig(_Section):
    num_samples: int = Field(64, gt=0)
    batch_size: int = Field(64, gt=0)
    method: Literal["ddpm", "ddim", "euler", "heun", "sde", "pc"] = "ddpm"
    steps: str = "50"
    """Respacing: "50", "10,15,20" (per section) or "ddim50"; empty string for all T steps. Checked
    against ``diffusion.steps`` when the config loads (see ``Config._sample_steps_fit_schedule``)."""

    @field_validator("steps", mode="before")
    @classmethod
    def _steps_as_text(cls, v: Any) -> Any:
        return str(v) if isinstance(v, int) and not isinstance(v, bool) else v

    eta: float = Field(0.0, ge=0.0)
    """DDIM η (0: deterministic)."""
    churn: float = Field(0.0, ge=0.0)
    """EDM (Heun/Euler) stochastic churn S_churn; 0 is the deterministic ODE."""
    snr: float = Field(0.16, gt=0.0)
    """Method ``pc``: the Langevin corrector's signal-to-noise ratio (Song et al. 2021, Algorithm 5)."""
    corrector_steps: int = Field(1, ge=1)
    """Method ``pc``: Langevin corrector steps before each predictor step (each costs one network call)."""
    clip_denoised: bool = True
    use_ema: bool = True
    ema_rate: float | None = None
    """Which of ``train.ema_rates`` to sample from; None takes the first."""
    seed: int = 0


class TrackingConfig(_Section):
    enabled: bool = True
    uri: str = "sqlite:///mlflow.db"
    experiment: str = "iddpm"
    run_name: str | None = None
    request_timeout_s: float = Field(10.0, gt=0)
    request_max_retries: int = Field(2, ge=0)


class ClusterConfig(_Section):
    """Defaults for ``cluster/submit.py``; its command-line flags win."""

    nodes: int = Field(1, ge=1)
    """Nodes to allocate (``--nodes``)."""
    gpus_per_node: int = Field(0, ge=0)
    """GPUs per node; one task (process) is started per GPU. 0 on a CPU-only cluster."""
    tasks_per_node: int | None = Field(None, ge=1)
    """Processes per node when ``gpus_per_node`` is 0 (None means 1); must equal it otherwise."""
    cpus_per_task: int = Field(4, ge=1)
    """CPU cores per process; also its OMP_NUM_THREADS unless the environment sets one."""
    mem_gb: float | None = Field(None, gt=0)
    """Memory per node in GB (``--mem``); None takes the partition's default."""
    time_min: int = Field(60, ge=1)
    """Time limit in minutes. submitit asks SLURM for SIGUSR2 ``signal_delay_s`` before it."""
    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    constraint: str | None = None
    """Node features (``--constraint``), e.g. ``a100|h100``."""
    exclusive: bool = False
    """Whole nodes only (``--exclusive``)."""
    job_name: str = "iddpm"
    folder: str = "runs/slurm/%j"
    """submitit's folder: sbatch script, pickles and per-rank logs. ``%j`` becomes the job id;
    ``cluster/status.py`` lists the jobs under the part before the first ``%``."""
    dependency: str | None = None
    """sbatch ``--dependency``, e.g. ``afterok:1234``."""
    slurm_args: dict[str, Any] = Field(default_factory=dict)
    """Extra ``#SBATCH --key=value`` lines (``True`` for a bare flag), e.g. ``{mail-type: END}``."""
    setup: list[str] = Field(default_factory=list)
    """Shell lines run in the batch script before the tasks start, e.g. ``module load cuda``."""
    signal_delay_s: int = Field(90, ge=10)
    """Seconds before the time limit at which SLURM sends SIGUSR2 (checkpoint and requeue): must cover
    finishing a step plus writing a checkpoint."""
    max_requeues: int = Field(10, ge=0)
    """Requeues allowed after the time limit is reached (preemptions are not counted)."""


class Config(_Section):
    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    diffusion: DiffusionConfig = Field(default_factory=DiffusionConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    sample: SampleConfig = Field(default_factory=SampleConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    cluster: ClusterConfig = Field(default_factory=ClusterConfig)

    @model_validator(mode="after")
    def _sample_rate_is_trained(self) -> Config:
        rate = self.sample.ema_rate
        if rate is not None and rate not in self.train.ema_rates:
            raise ValueError(f"sample.ema_rate {rate} is not one of train.ema_rates {self.train.ema_rates}")
        return self

    @model_validator(mode="after")
    def _sample_steps_fit_schedule(self) -> Config:
        # Checked here, against T, rather than on SampleConfig: "ddim7" or "200" is only wrong for some
        # diffusion.steps, and a bad spec otherwise surfaces after training, losing the final grid.
        _check_respacing("sample.steps", self.sample.steps, self.diffusion.steps)
        # FID during training samples with train.eval_sample_steps: "ddim50" is the default and wrong for a small T.
        if self.train.eval_every and self.train.eval_features:
            _check_respacing("train.eval_sample_steps", self.train.eval_sample_steps, self.diffusion.steps)
        return self

    @property
    def sample_ema_rate(self) -> float:
        return self.sample.ema_rate if self.sample.ema_rate is not None else self.train.ema_rates[0]

    def to_flat_dict(self) -> dict[str, Any]:
        """``{"train.lr": 1e-4, ...}``: the form MLflow params take."""
        out: dict[str, Any] = {}

        def walk(prefix: str, value: Any) -> None:
            if isinstance(value, dict) and value:
                for k, v in value.items():
                    walk(f"{prefix}.{k}" if prefix else str(k), v)
            else:
                out[prefix] = value

        walk("", self.model_dump(mode="json"))
        return out


def _check_respacing(key: str, spec: str, num_timesteps: int) -> None:
    """A respacing spec that cannot cut T steps is refused at load time, naming ``key``."""
    # The respacing parser itself is reused (imported late: it pulls in torch).
    from trainer.diffusion.respace import space_timesteps

    try:
        space_timesteps(num_timesteps, spec)
    except ValueError as err:
        reason = str(err).removeprefix(f"respacing {spec.strip()!r}: ")
        # The parser's own message names T where T is the problem ("... of 100 steps", "(T = 100)").
        raise ValueError(f"{key}: {reason} (got {spec!r})") from None


# --------------------------------------------------------------------------- loading

BASE_KEY = "base"
"""A YAML file may name another (relative to itself) whose values it overrides."""


def _read_yaml(path: Path, seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    if path in seen:
        raise ConfigError(f"{path}: circular '{BASE_KEY}' chain")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{path}{where}: invalid YAML ({getattr(err, 'problem', err)})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping, got {type(data).__name__}")
    base = data.pop(BASE_KEY, None)
    if base is None:
        return data
    parent = _read_yaml((path.parent / str(base)).resolve(), (*seen, path))
    return _deep_merge(parent, data)


def _deep_merge(lower: dict[str, Any], upper: dict[str, Any]) -> dict[str, Any]:
    merged = dict(lower)
    for key, value in upper.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def parse_override(text: str) -> tuple[list[str], Any]:
    """``"train.lr=2e-4"`` → (["train", "lr"], 0.0002). Values are parsed as YAML scalars/lists."""
    if "=" not in text:
        raise ConfigError(f"override {text!r}: expected key.path=value")
    key, raw = text.split("=", 1)
    parts = key.strip().split(".")
    if not all(parts):
        raise ConfigError(f"override {text!r}: empty key segment")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    # YAML 1.1 reads "2e-4" as a string; users mean a number.
    if isinstance(value, str):
        with contextlib.suppress(ValueError):
            value = float(value) if any(c in value for c in ".eE") else value
    return parts, value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    out = json.loads(json.dumps(data))  # deep copy of plain YAML data
    for text in overrides:
        parts, value = parse_override(text)
        node = out
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"override {text!r}: '{part}' is not a section")
            node = child
        node[parts[-1]] = value
    return out


def _format_validation_error(err: ValidationError, source: str) -> str:
    first = err.errors()[0]
    key = ".".join(str(p) for p in first["loc"])
    msg = first["msg"].removeprefix("Value error, ")
    if first["type"] == "extra_forbidden":
        msg = "unknown key"
    value = first.get("input")
    shown = "" if first["type"] in ("extra_forbidden", "missing") or isinstance(value, dict) else f" (got {value!r})"
    more = f" [+{err.error_count() - 1} more]" if err.error_count() > 1 else ""
    where = f"{key}: " if key else ""
    return f"{source}: {where}{msg}{shown}{more}"


def config_from_dict(data: dict[str, Any], source: str = "config") -> Config:
    try:
        return Config.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_format_validation_error(err, source)) from None


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> Config:
    """Read a YAML config (following ``base:``), apply dotted overrides, and validate."""
    data: dict[str, Any] = _read_yaml(Path(path).resolve()) if path is not None else {}
    data = apply_overrides(data, list(overrides or []))
    return config_from_dict(data, source=str(path) if path is not None else "config")


def dump_config(cfg: Config) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
