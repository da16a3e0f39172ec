"""The denoising UNet of Ho et al. 2020 with the changes of Nichol & Dhariwal 2021 (Improved DDPM).

Layout (one level per entry of ``channel_mult``; resolution halves between levels)::

    conv_in ─▶ [ResBlock (+Attention)] × num_res_blocks ─▶ Downsample ─▶ ... ─▶ middle
    middle: ResBlock ─▶ Attention ─▶ ResBlock
    ... ─▶ [concat skip ─▶ ResBlock (+Attention)] × (num_res_blocks + 1) ─▶ Upsample ─▶ ...
    ─▶ GroupNorm ─▶ SiLU ─▶ conv_out (zero-initialised)

Attention rule: ``attention_resolutions`` lists resolutions in pixels (e.g. ``[16, 8]`` for a 32×32
model); every ResBlock of the down and up paths at those resolutions is followed by an attention
block, and the middle block always has one (as in the released Improved DDPM code).

Conditioning: a sinusoidal embedding of the original timestep value goes through a 2-layer MLP
(width 4·channels); an optional class embedding with one extra "null" row is added to it. Each
ResBlock receives the result either as an added bias or, with ``use_scale_shift_norm``, as a FiLM
``norm(h)·(1 + scale) + shift`` (Nichol & Dhariwal 2021, Sec. 3 / App. A).

With ``learn_sigma`` the network emits 2·C channels: ε and the variance interpolation v
(Nichol & Dhariwal 2021, eq. 15); how they are used is the diffusion code's business.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from trainer.models.nn import GroupNorm32, timestep_embedding, zero_module

if TYPE_CHECKING:
    from trainer.config import Config, ModelConfig


def _silu_norm(channels: int, groups: int) -> nn.Sequential:
    return nn.Sequential(GroupNorm32(groups, channels), nn.SiLU())


class TimestepEmbedding(nn.Module):
    """Original timestep values ``[N]`` → conditioning vector ``[N, 4·channels]``."""

    def __init__(self, channels: int, embed_dim: int) -> None:
        super().__init__()
        self.channels = channels
        self.mlp = nn.Sequential(nn.Linear(channels, embed_dim), nn.SiLU(), nn.Linear(embed_dim, embed_dim))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        # The sinusoid is computed in float32 (bf16 cannot resolve t vs t+1 at t ~ 4000), then
        # cast to the parameters' dtype so a bf16 module gets bf16 input.
        emb = timestep_embedding(t, self.channels)
        return self.mlp(emb.to(self.mlp[0].weight.dtype))


class Downsample(nn.Module):
    """Halve the resolution: a stride-2 3×3 convolution, or 2×2 average pooling without a conv."""

    def __init__(self, channels: int, use_conv: bool) -> None:
        super().__init__()
        self.op = nn.Conv2d(channels, channels, 3, stride=2, padding=1) if use_conv else nn.AvgPool2d(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x)


class Upsample(nn.Module):
    """Double the resolution: nearest-neighbour, then (optionally) a 3×3 convolution."""

    def __init__(self, channels: int, use_conv: bool) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1) if use_conv else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x, scale_factor=2.0, mode="nearest")
        return self.conv(x) if self.conv is not None else x


class ResBlock(nn.Module):
    """Pre-activation residual block conditioned on the embedding, optionally resampling.

    ``h = conv(silu(norm(x)))``; ``h = norm(h)·(1+scale)+shift`` (scale-shift) or ``norm(h + e)``;
    ``h = conv_zero(dropout(silu(h)))``; output ``skip(x) + h``. With ``up``/``down`` both the branch
    and the skip are resampled (without convolutions) before the first conv, as in BigGAN.
    """

    def __init__(
        self,
        in_channels: int,
        emb_channels: int,
        out_channels: int,
        dropout: float,
        use_scale_shift_norm: bool,
        norm_groups: int,
        up: bool = False,
        down: bool = False,
    ) -> None:
        super().__init__()
        self.use_scale_shift_norm = use_scale_shift_norm
        self.in_act = _silu_norm(in_channels, norm_groups)
        if up:
            self.resample: nn.Module = Upsample(in_channels, use_conv=False)
        elif down:
            self.resample = Downsample(in_channels, use_conv=False)
        else:
            self.resample = nn.Identity()
        self.in_conv = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.emb_proj = nn.Sequential(
            nn.SiLU(), nn.Linear(emb_channels, 2 * out_channels if use_scale_shift_norm else out_channels)
        )
        self.out_norm = GroupNorm32(norm_groups, out_channels)
        self.out_rest = nn.Sequential(
            nn.SiLU(), nn.Dropout(dropout), zero_module(nn.Conv2d(out_channels, out_channels, 3, padding=1))
        )
        self.skip = nn.Identity() if in_channels == out_channels else nn.Conv2d(in_channels, out_channels, 1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.in_act(x)
        h = self.in_conv(self.resample(h))
        x = self.resample(x)
        e = self.emb_proj(emb).to(h.dtype)[:, :, None, None]
        if self.use_scale_shift_norm:
            scale, shift = e.chunk(2, dim=1)
            h = self.out_norm(h) * (1 + scale) + shift
        else:
            h = self.out_norm(h + e)
        return self.skip(x) + self.out_rest(h)


class AttentionBlock(nn.Module):
    """Multi-head self-attention over all spatial positions, residual, zero-initialised output."""

    def __init__(self, channels: int, num_heads: int, norm_groups: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.norm = GroupNorm32(norm_groups, channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj = zero_module(nn.Conv2d(channels, channels, 1))

    def forward(self, x: torch.Tensor, emb: torch.Tensor | None = None) -> torch.Tensor:
        n, c, hgt, wid = x.shape
        # [N, HW, 3C]: a free view when activations are channels_last, and then q, k, v below
        # have a unit-stride last dimension, as the fused (flash / memory-efficient) kernels want.
        qkv = self.qkv(self.norm(x)).flatten(2).transpose(1, 2)
        q, k, v = qkv.reshape(n, hgt * wid, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v)  # [N, heads, HW, head_dim], scale 1/sqrt(head_dim)
        out = out.transpose(1, 2).reshape(n, hgt * wid, c).transpose(1, 2).reshape(n, c, hgt, wid)
        return x + self.proj(out)


class TimestepSequential(nn.Sequential):
    """A sequence of layers where those that take the embedding receive it."""

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        for layer in self:
            x = layer(x, emb) if isinstance(layer, (ResBlock, AttentionBlock)) else layer(x)
        return x


class UNet(nn.Module):
    """The Improved DDPM UNet. Arguments mirror :class:`trainer.config.ModelConfig`.

    ``forward(x, t, y=None)``: ``x`` ``[N, in_channels, H, W]``, ``t`` ``[N]`` original timestep
    values, ``y`` ``[N]`` class labels in ``0..num_classes`` (``num_classes`` = null class) or
    ``None`` (null class for every sample). Returns ``[N, out_channels, H, W]`` in the dtype of the
    computation (bf16 under autocast or with bf16 parameters); the caller casts as needed.
    """

    def __init__(
        self,
        *,
        image_size: int,
        in_channels: int,
        out_channels: int,
        channels: int = 128,
        channel_mult: Sequence[int] = (1, 2, 2, 2),
        num_res_blocks: int = 3,
        attention_resolutions: Sequence[int] = (16, 8),
        num_heads: int = 4,
        num_head_channels: int = -1,
        num_heads_upsample: int = -1,
        timestep_scale: float = 1.0,
        dropout: float = 0.0,
        use_scale_shift_norm: bool = True,
        resblock_updown: bool = False,
        num_classes: int | None = None,
        use_checkpoint: bool = False,
        norm_groups: int = 32,
        channels_last: bool = False,
    ) -> None:
        super().__init__()
        # Kept so that helpers (FLOP estimate) can rebuild an identical network on the meta device.
        self.init_kwargs: dict[str, Any] = {k: v for k, v in locals().items() if k not in ("self", "__class__")}
        channel_mult = list(channel_mult)
        resolutions = _check_shapes(
            image_size,
            channels,
            channel_mult,
            attention_resolutions,
            num_heads,
            num_head_channels,
            norm_groups,
        )
        if num_heads_upsample > 0:
            up_levels = {resolutions.index(r) for r in attention_resolutions}
            for level in sorted(up_levels):
                if (channels * channel_mult[level]) % num_heads_upsample:
                    raise ValueError(
                        f"model.num_heads_upsample: {num_heads_upsample} heads do not divide the "
                        f"{channels * channel_mult[level]} channels at resolution {resolutions[level]}"
                    )
        if num_classes is not None and num_classes <= 0:
            raise ValueError(f"num_classes must be positive, got {num_classes}")

        self.image_size = image_size
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.num_classes = num_classes
        self.use_checkpoint = use_checkpoint
        self.channels_last = channels_last
        self.downsample_factor = 2 ** (len(channel_mult) - 1)
        # 1000/T for models trained with improved-diffusion's rescale_timesteps: the embedding sees t·1000/T,
        # computed in float32 as there ((float) t · (1000/T)).
        self.timestep_scale = float(timestep_scale)

        emb_dim = 4 * channels
        self.time_embed = TimestepEmbedding(channels, emb_dim)
        # One extra row: index num_classes is the "null" class used for unconditional samples.
        self.class_embed = nn.Embedding(num_classes + 1, emb_dim) if num_classes is not None else None

        def res(cin: int, cout: int, **kw: bool) -> ResBlock:
            return ResBlock(cin, emb_dim, cout, dropout, use_scale_shift_norm, norm_groups, **kw)

        def attn(ch: int, up: bool = False) -> AttentionBlock:
            if up and num_heads_upsample > 0:
                return AttentionBlock(ch, num_heads_upsample, norm_groups)
            heads = ch // num_head_channels if num_head_channels > 0 else num_heads
            return AttentionBlock(ch, heads, norm_groups)

        attn_at = set(attention_resolutions)
        self.input_blocks = nn.ModuleList([TimestepSequential(nn.Conv2d(in_channels, channels, 3, padding=1))])
        skip_channels = [channels]
        ch = channels
        for level, mult in enumerate(channel_mult):
            for _ in range(num_res_blocks):
                layers: list[nn.Module] = [res(ch, channels * mult)]
                ch = channels * mult
                if resolutions[level] in attn_at:
                    layers.append(attn(ch))
                self.input_blocks.append(TimestepSequential(*layers))
                skip_channels.append(ch)
            if level != len(channel_mult) - 1:
                down = res(ch, ch, down=True) if resblock_updown else Downsample(ch, use_conv=True)
                self.input_blocks.append(TimestepSequential(down))
                skip_channels.append(ch)

        self.middle_block = TimestepSequential(res(ch, ch), attn(ch), res(ch, ch))

        self.output_blocks = nn.ModuleList()
        for level, mult in reversed(list(enumerate(channel_mult))):
            for i in range(num_res_blocks + 1):
                layers = [res(ch + skip_channels.pop(), channels * mult)]
                ch = channels * mult
                if resolutions[level] in attn_at:
                    layers.append(attn(ch, up=True))
                if level != 0 and i == num_res_blocks:
                    layers.append(res(ch, ch, up=True) if resblock_updown else Upsample(ch, use_conv=True))
                self.output_blocks.append(TimestepSequential(*layers))

        self.out = nn.Sequential(_silu_norm(ch, norm_groups), zero_module(nn.Conv2d(ch, out_channels, 3, padding=1)))
        # channels_last converts the activations only (the input, in forward): a convolution of an NHWC input
        # gives an NHWC output, so every map travels NHWC. The weights stay contiguous: DeepSpeed views each
        # parameter as bytes to broadcast it and flattens them into its buffers, neither of which accepts an
        # NHWC weight (its first run on the CPU failed there: "stride(-1) must be 1 to view Float as Byte").

    def _run(self, block: TimestepSequential, h: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        if self.use_checkpoint and torch.is_grad_enabled():
            # Non-reentrant checkpointing works with DeepSpeed's ZeRO hooks and with inputs that do
            # not require grad, and restores the RNG state so dropout masks match on recomputation.
            return checkpoint(block, h, emb, use_reentrant=False)
        return block(h, emb)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        self._check_inputs(x, t, y)
        emb = self.time_embed(t.float() * self.timestep_scale if self.timestep_scale != 1.0 else t)
        if self.class_embed is not None:
            if y is None:
                y = torch.full((x.shape[0],), self.num_classes, dtype=torch.long, device=x.device)
            emb = emb + self.class_embed(y).to(emb.dtype)

        # Feed the parameters' dtype (bf16 under DeepSpeed bf16; the dtype is right even for a
        # ZeRO-3 partitioned parameter) and the chosen memory format.
        layout = torch.channels_last if self.channels_last else torch.contiguous_format
        h = x.to(dtype=self.input_blocks[0][0].weight.dtype, memory_format=layout)
        skips = []
        for block in self.input_blocks:
            h = self._run(block, h, emb)
            skips.append(h)
        h = self._run(self.middle_block, h, emb)
        for block in self.output_blocks:
            h = self._run(block, torch.cat([h, skips.pop()], dim=1), emb)
        return self.out(h)

    def _check_inputs(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None) -> None:
        if x.ndim != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"x must be [N, {self.in_channels}, H, W], got {tuple(x.shape)}")
        if x.shape[2] % self.downsample_factor or x.shape[3] % self.downsample_factor:
            raise ValueError(
                f"x spatial size {tuple(x.shape[2:])} is not divisible by the downsampling factor "
                f"{self.downsample_factor}"
            )
        if t.shape != (x.shape[0],):
            raise ValueError(f"t must have shape [{x.shape[0]}], got {tuple(t.shape)}")
        if y is not None:
            if self.class_embed is None:
                raise ValueError("class labels y were given but the model is not class-conditional")
            if y.shape != (x.shape[0],):
                raise ValueError(f"y must have shape [{x.shape[0]}], got {tuple(y.shape)}")


def _check_shapes(
    image_size: int,
    channels: int,
    channel_mult: list[int],
    attention_resolutions: Sequence[int],
    num_heads: int,
    num_head_channels: int,
    norm_groups: int,
) -> list[int]:
    """Validate the architecture against the image size; return the resolution of each level."""
    factor = 2 ** (len(channel_mult) - 1)
    if image_size <= 0 or image_size % factor:
        raise ValueError(
            f"model.channel_mult: {len(channel_mult)} levels downsample by {factor}, "
            f"but the image size {image_size} is not divisible by {factor}"
        )
    resolutions = [image_size // 2**level for level in range(len(channel_mult))]
    shown = ",".join(str(r) for r in resolutions)
    for res in attention_resolutions:
        if res not in resolutions:
            raise ValueError(f"model.attention_resolutions: {res} never occurs; resolutions are {shown}")
    for mult in channel_mult:
        ch = channels * mult
        if ch % norm_groups:
            raise ValueError(
                f"model.norm_groups: {norm_groups} groups do not divide {ch} channels "
                f"(model.channels={channels} × multiplier {mult})"
            )
    # Attention always runs at the lowest resolution (middle block) and at the listed ones.
    attn_levels = {len(channel_mult) - 1} | {resolutions.index(r) for r in attention_resolutions}
    for level in sorted(attn_levels):
        ch = channels * channel_mult[level]
        if num_head_channels > 0:
            if ch % num_head_channels:
                raise ValueError(
                    f"model.num_head_channels: {num_head_channels} does not divide the {ch} channels "
                    f"at resolution {resolutions[level]}"
                )
        elif ch % num_heads:
            raise ValueError(
                f"model.num_heads: {num_heads} heads do not divide the {ch} channels at resolution {resolutions[level]}"
            )
    return resolutions


def build_unet(
    cfg: ModelConfig,
    image_size: int,
    in_channels: int,
    learn_sigma: bool,
    num_classes: int | None = None,
    diffusion_steps: int | None = None,
) -> UNet:
    """Build the UNet described by ``cfg`` (``num_classes`` is used only when ``cfg.class_cond``;
    ``diffusion_steps`` T only with ``cfg.rescale_timesteps``, which feeds the network t·1000/T)."""
    if cfg.rescale_timesteps and diffusion_steps is None:
        raise ValueError("model.rescale_timesteps needs the number of diffusion steps T")
    scale = 1000.0 / diffusion_steps if cfg.rescale_timesteps and diffusion_steps else 1.0
    if cfg.class_cond and num_classes is None:
        raise ValueError("model.class_cond is true but the dataset gives no num_classes")
    return UNet(
        image_size=image_size,
        in_channels=in_channels,
        out_channels=in_channels * (2 if learn_sigma else 1),
        channels=cfg.channels,
        channel_mult=cfg.channel_mult,
        num_res_blocks=cfg.num_res_blocks,
        attention_resolutions=cfg.attention_resolutions,
        num_heads=cfg.num_heads,
        num_head_channels=cfg.num_head_channels,
        num_heads_upsample=cfg.num_heads_upsample,
        timestep_scale=scale,
        dropout=cfg.dropout,
        use_scale_shift_norm=cfg.use_scale_shift_norm,
        resblock_updown=cfg.resblock_updown,
        num_classes=num_classes if cfg.class_cond else None,
        use_checkpoint=cfg.use_checkpoint,
        norm_groups=cfg.norm_groups,
        channels_last=cfg.channels_last,
    )


def build_model(cfg: Config, image_size: int, channels: int, num_classes: int | None = None) -> UNet:
    """The UNet of a run's config: its ``model`` section, with the output channels its diffusion needs
    (``cfg.diffusion.learn_sigma``). Every part of the project builds a run's model through here."""
    return build_unet(
        cfg.model,
        image_size,
        channels,
        learn_sigma=cfg.diffusion.learn_sigma,
        num_classes=num_classes,
        diffusion_steps=cfg.diffusion.steps,
    )


def _unwrap(model: nn.Module) -> nn.Module:
    # DeepSpeed engines and DDP keep the network in ``.module``.
    while not isinstance(model, UNet) and isinstance(getattr(model, "module", None), nn.Module):
        model = model.module
    return model


def count_parameters(model: nn.Module) -> int:
    """Number of parameters (full sizes, also under ZeRO-3 where local tensors are empty shards)."""
    return sum(int(getattr(p, "ds_numel", p.numel())) for p in _unwrap(model).parameters())


def estimate_flops_per_image(
    model: nn.Module, image_size: int, in_channels: int, num_classes: int | None = None
) -> int:
    """Forward FLOPs for one image (a multiply-add counts 2), via ``torch.utils.flop_counter``.

    An identical network is built on the meta device, so no real compute or memory is spent and
    the trained model (possibly sharded or on a GPU) is untouched. Counts convolutions, matmuls and
    attention; normalisations and activations (a few % of the total) are not counted. A training
    step costs about 3× this (backward ≈ 2× forward), plus the recomputation under checkpointing.
    """
    from torch.utils.flop_counter import FlopCounterMode

    net = _unwrap(model)
    if not isinstance(net, UNet):
        raise TypeError(f"expected a UNet (or a wrapper with .module), got {type(model).__name__}")
    kwargs = dict(net.init_kwargs, image_size=image_size, in_channels=in_channels, use_checkpoint=False)
    with torch.device("meta"):
        twin = UNet(**kwargs)
        x = torch.zeros(1, in_channels, image_size, image_size)
        t = torch.zeros(1, dtype=torch.long)
        y = torch.zeros(1, dtype=torch.long) if twin.class_embed is not None and num_classes else None
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        twin(x, t, y)
    return int(counter.get_total_flops())


def describe(model: nn.Module, image_size: int, in_channels: int, num_classes: int | None = None) -> dict:
    """``{"model/params": ..., "model/gflops_per_image": ...}`` for logging at start-up."""
    flops = estimate_flops_per_image(model, image_size, in_channels, num_classes)
    return {"model/params": count_parameters(model), "model/gflops_per_image": flops / 1e9}


__all__ = [
    "AttentionBlock",
    "Downsample",
    "ResBlock",
    "TimestepEmbedding",
    "UNet",
    "Upsample",
    "build_model",
    "build_unet",
    "count_parameters",
    "describe",
    "estimate_flops_per_image",
]
