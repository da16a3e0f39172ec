"""The UNet: shapes per preset, zero-init, conditioning, checkpointing, precision, errors, costs.

Parameter and FLOP counts are checked against an independent walk of the architecture as the
papers describe it (Ho et al. 2020, App. B; Nichol & Dhariwal 2021, App. A), written here from
layer formulas rather than from the model's modules.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from trainer.config import ModelConfig, load_config
from trainer.models.nn import GroupNorm32, timestep_embedding
from trainer.models.unet import (
    AttentionBlock,
    ResBlock,
    build_unet,
    count_parameters,
    estimate_flops_per_image,
)

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
CIFAR10_PARAMS = 52_546_438  # measured; the released CIFAR-10 model is described as ~50M
IMAGENET64_PARAMS = 121_063_942

torch.set_num_threads(1)


def tiny_cfg(**overrides) -> ModelConfig:
    base = dict(
        channels=32,
        channel_mult=[1, 2],
        num_res_blocks=1,
        attention_resolutions=[8],
        num_heads=2,
        dropout=0.0,
        use_scale_shift_norm=True,
    )
    base.update(overrides)
    return ModelConfig(**base)


def randomize_zero_params(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Give the zero-initialised layers random values so outputs and gradients are non-trivial."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if not p.any():
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    return model


# --------------------------------------------------------------------------- independent cost model


def paper_unet_costs(
    image: int,
    cin: int,
    cout: int,
    ch: int,
    mult: list[int],
    nres: int,
    attn_res: list[int],
    heads: int,
    scale_shift: bool,
    classes: int | None,
    updown: bool = False,
) -> tuple[int, int]:
    """(parameters, forward FLOPs per image) of the Improved DDPM UNet, from layer formulas."""
    emb = 4 * ch
    params = flops = 0

    def conv(i: int, o: int, k: int, res_out: int) -> None:
        nonlocal params, flops
        params += i * o * k * k + o
        flops += 2 * i * o * k * k * res_out * res_out

    def linear(i: int, o: int) -> None:
        nonlocal params, flops
        params += i * o + o
        flops += 2 * i * o

    def norm(c: int) -> None:
        nonlocal params
        params += 2 * c

    def resblock(i: int, o: int, res_in: int, res_out: int) -> None:
        norm(i)
        conv(i, o, 3, res_out)
        linear(emb, 2 * o if scale_shift else o)
        norm(o)
        conv(o, o, 3, res_out)
        if i != o:
            conv(i, o, 1, res_out)

    def attention(c: int, res: int) -> None:
        nonlocal flops
        norm(c)
        conv(c, 3 * c, 1, res)
        conv(c, c, 1, res)
        n = res * res
        flops += 2 * 2 * n * n * c  # q·kᵀ and weights·v over all heads (head_dim · heads = c)

    linear(ch, emb)
    linear(emb, emb)
    if classes is not None:
        params += (classes + 1) * emb
    conv(cin, ch, 3, image)
    skips, c, res = [ch], ch, image
    for level, m in enumerate(mult):
        for _ in range(nres):
            resblock(c, ch * m, res, res)
            c = ch * m
            if res in attn_res:
                attention(c, res)
            skips.append(c)
        if level != len(mult) - 1:
            if updown:
                resblock(c, c, res, res // 2)
            else:
                conv(c, c, 3, res // 2)
            res //= 2
            skips.append(c)
    resblock(c, c, res, res)
    attention(c, res)
    resblock(c, c, res, res)
    for level in reversed(range(len(mult))):
        for i in range(nres + 1):
            resblock(c + skips.pop(), ch * mult[level], res, res)
            c = ch * mult[level]
            if res in attn_res:
                attention(c, res)
            if level and i == nres:
                if updown:
                    resblock(c, c, res, res * 2)
                else:
                    conv(c, c, 3, res * 2)
                res *= 2
    norm(c)
    conv(c, cout, 3, image)
    assert not skips and res == image
    return params, flops


# --------------------------------------------------------------------------- presets


def preset(name: str) -> ModelConfig:
    return load_config(CONFIGS / f"{name}.yaml").model


def test_cifar10_preset_is_the_paper_architecture() -> None:
    cfg = preset("cifar10_hybrid")
    assert cfg.channels == 128
    assert cfg.num_res_blocks == 3
    assert cfg.channel_mult == [1, 2, 2, 2]
    assert sorted(cfg.attention_resolutions) == [8, 16]
    assert (cfg.num_heads, cfg.num_head_channels) == (4, -1)
    assert cfg.use_scale_shift_norm and not cfg.resblock_updown and not cfg.class_cond
    assert cfg.dropout == 0.3
    model = build_unet(cfg, image_size=32, in_channels=3, learn_sigma=True)
    assert model.out_channels == 6
    n = count_parameters(model)
    assert n == CIFAR10_PARAMS
    assert n == paper_unet_costs(32, 3, 6, 128, [1, 2, 2, 2], 3, [16, 8], 4, True, None)[0]
    attn = [m for m in model.modules() if isinstance(m, AttentionBlock)]
    # 3 blocks at 16 and 3 at 8 going down, 4 + 4 going up, 1 in the middle.
    assert len(attn) == 15 and all(a.num_heads == 4 for a in attn)


def test_imagenet64_preset_parameter_count() -> None:
    cfg = preset("imagenet64_hybrid")
    assert cfg.channel_mult == [1, 2, 3, 4] and cfg.dropout == 0.0
    with torch.device("meta"):
        model = build_unet(cfg, image_size=64, in_channels=3, learn_sigma=True)
    assert count_parameters(model) == IMAGENET64_PARAMS
    assert paper_unet_costs(64, 3, 6, 128, [1, 2, 3, 4], 3, [16, 8], 4, True, None)[0] == IMAGENET64_PARAMS


@pytest.mark.parametrize("learn_sigma", [False, True])
@pytest.mark.parametrize("classes", [None, 10])
@pytest.mark.parametrize(
    "name,image,channels,device",
    [
        ("quickstart", 16, 1, "cpu"),
        ("cifar10_hybrid", 32, 3, "cpu"),
        # 121M parameters: the shape logic runs on the meta device (no compute, no memory).
        ("imagenet64_hybrid", 64, 3, "meta"),
    ],
)
def test_preset_output_shape(name, image, channels, device, learn_sigma, classes) -> None:
    cfg = preset(name).model_copy(update={"class_cond": classes is not None})
    with torch.device(device):
        model = build_unet(cfg, image, channels, learn_sigma, num_classes=classes).eval()
        x = torch.randn(2, channels, image, image)
        t = torch.tensor([0, 3999])
        y = torch.tensor([1, classes]) if classes else None
    with torch.no_grad():
        out = model(x, t, y)
    assert out.shape == (2, channels * (2 if learn_sigma else 1), image, image)
    if device != "meta":
        assert torch.equal(out, torch.zeros_like(out))  # fresh model: zero-initialised head


# --------------------------------------------------------------------------- initialisation


def test_fresh_model_outputs_exact_zeros_and_residual_branches_are_identity() -> None:
    torch.manual_seed(0)
    model = build_unet(tiny_cfg(dropout=0.1), 16, 1, learn_sigma=True, num_classes=None).train()
    x, t = torch.randn(3, 1, 16, 16), torch.tensor([0, 5, 999])
    assert torch.equal(model(x, t), torch.zeros(3, 2, 16, 16))

    emb = torch.randn(3, 128)
    block = ResBlock(32, 128, 64, 0.0, True, 32)
    h = torch.randn(3, 32, 8, 8)
    assert torch.equal(block(h, emb), block.skip(h))
    same = ResBlock(64, 128, 64, 0.0, False, 32)
    h = torch.randn(3, 64, 8, 8)
    assert torch.equal(same(h, emb), h)
    attn = AttentionBlock(64, 4, 32)
    assert torch.equal(attn(h), h)


@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
def test_attention_block_matches_float64_multihead_formula(layout) -> None:
    torch.manual_seed(0)
    heads, c, size = 4, 64, 6
    block = randomize_zero_params(AttentionBlock(c, heads, 32)).to(memory_format=layout)
    with torch.no_grad():
        block.norm.weight.normal_()
        block.norm.bias.normal_()
    x = torch.randn(2, c, size, size)

    # softmax(qᵀk / sqrt(d)) v per head; qkv channels are ordered (q|k|v, head, head_dim).
    h = _group_norm_float64(x, 32, block.norm.weight, block.norm.bias).reshape(2, c, -1)
    qkv = torch.einsum("oc,ncp->nop", block.qkv.weight.double()[:, :, 0, 0], h) + block.qkv.bias.double()[:, None]
    q, k, v = qkv.reshape(2, 3, heads, c // heads, -1).unbind(1)  # [N, heads, d, HW]
    weights = torch.softmax(torch.einsum("nhdp,nhdq->nhpq", q, k) / math.sqrt(c // heads), dim=-1)
    attended = torch.einsum("nhpq,nhdq->nhdp", weights, v).reshape(2, c, -1)
    out = torch.einsum("oc,ncp->nop", block.proj.weight.double()[:, :, 0, 0], attended)
    want = x.double() + (out + block.proj.bias.double()[:, None]).reshape(2, c, size, size)

    with torch.no_grad():
        got = block(x.contiguous(memory_format=layout))
    torch.testing.assert_close(got.double(), want, atol=1e-4, rtol=1e-4)


# --------------------------------------------------------------------------- conditioning


def test_timestep_embedding_matches_float64_formula() -> None:
    t = [0, 1, 2, 17, 999, 3999]
    for dim in (128, 7):
        got = timestep_embedding(torch.tensor(t), dim)
        half = dim // 2
        want = torch.zeros(len(t), dim, dtype=torch.float64)
        for r, tv in enumerate(t):
            for i in range(half):
                arg = tv * math.exp(-math.log(10_000.0) * i / half)
                want[r, i], want[r, half + i] = math.cos(arg), math.sin(arg)
        assert got.dtype == torch.float32 and got.shape == (len(t), dim)
        # float32 arguments near 4000 carry ~2.4e-4 rounding error.
        torch.testing.assert_close(got.double(), want, atol=1e-3, rtol=0)


def test_timestep_embedding_distinguishes_neighbouring_steps() -> None:
    emb = timestep_embedding(torch.arange(4001), 128)
    gaps = (emb[1:] - emb[:-1]).norm(dim=1)
    # The highest frequency turns 1 radian per step: |Δ| >= 2·sin(1/2) ≈ 0.96 from that pair alone.
    assert gaps.min() > 0.9
    # ...and still after the cast to bf16 that a bf16 module applies.
    emb16 = emb.to(torch.bfloat16).float()
    assert (emb16[1:] - emb16[:-1]).norm(dim=1).min() > 0.9

    torch.manual_seed(0)
    model = randomize_zero_params(build_unet(tiny_cfg(), 16, 1, learn_sigma=False)).eval()
    x = torch.randn(2, 1, 16, 16)
    with torch.no_grad():
        a = model(x, torch.tensor([100, 3000]))
        b = model(x, torch.tensor([101, 3001]))
    per_sample = (a - b).abs().flatten(1).amax(dim=1)
    assert (per_sample > 1e-4).all()


def test_class_embedding_changes_output_and_null_class_is_default() -> None:
    torch.manual_seed(0)
    model = randomize_zero_params(build_unet(tiny_cfg(class_cond=True), 16, 1, True, num_classes=10)).eval()
    assert model.class_embed.weight.shape == (11, 128)
    x, t = torch.randn(2, 1, 16, 16), torch.tensor([50, 50])
    with torch.no_grad():
        out3 = model(x, t, torch.tensor([3, 3]))
        out4 = model(x, t, torch.tensor([4, 4]))
        null = model(x, t, torch.tensor([10, 10]))
        none = model(x, t)
    assert (out3 - out4).abs().max() > 1e-3
    assert (out3 - null).abs().max() > 1e-3
    assert torch.equal(none, null)

    uncond = build_unet(tiny_cfg(class_cond=False), 16, 1, True, num_classes=10)
    assert uncond.class_embed is None
    with pytest.raises(ValueError, match="not class-conditional"):
        uncond(x, t, torch.tensor([1, 2]))


# --------------------------------------------------------------------------- checkpointing


@pytest.mark.parametrize("updown", [False, True])
def test_checkpointing_gives_same_outputs_and_gradients(updown: bool) -> None:
    cfg = tiny_cfg(dropout=0.2, class_cond=True, resblock_updown=updown)
    torch.manual_seed(0)
    plain = randomize_zero_params(build_unet(cfg, 16, 1, True, num_classes=4)).train()
    ckpt = build_unet(cfg.model_copy(update={"use_checkpoint": True}), 16, 1, True, num_classes=4).train()
    ckpt.load_state_dict(plain.state_dict())

    calls = {"plain": 0, "ckpt": 0}
    plain.middle_block[0].register_forward_hook(lambda *_: calls.__setitem__("plain", calls["plain"] + 1))
    ckpt.middle_block[0].register_forward_hook(lambda *_: calls.__setitem__("ckpt", calls["ckpt"] + 1))

    x = torch.randn(3, 1, 16, 16, requires_grad=True)
    t, y = torch.tensor([1, 400, 3999]), torch.tensor([0, 3, 4])
    results = []
    for model in (plain, ckpt):
        x.grad = None
        torch.manual_seed(123)  # same dropout masks in both runs
        out = model(x, t, y)
        (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
        results.append((out.detach(), x.grad.clone(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    (o1, gx1, g1), (o2, gx2, g2) = results
    assert calls == {"plain": 1, "ckpt": 2}  # the checkpointed block really was recomputed
    assert o1.abs().max() > 1e-3
    torch.testing.assert_close(o2, o1, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(gx2, gx1, atol=1e-5, rtol=1e-5)
    assert g1.keys() == g2.keys()
    for name in g1:
        torch.testing.assert_close(g2[name], g1[name], atol=1e-5, rtol=1e-4, msg=name)
    assert all(g.abs().sum() > 0 for g in g1.values())  # every parameter takes part


# --------------------------------------------------------------------------- precision and layout


def _group_norm_float64(x: torch.Tensor, groups: int, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    n, c, h, w = x.shape
    g = x.double().reshape(n, groups, -1)
    mean = g.mean(dim=2, keepdim=True)
    var = g.var(dim=2, unbiased=False, keepdim=True)
    out = ((g - mean) / torch.sqrt(var + 1e-5)).reshape(n, c, h, w)
    return out * weight.double()[:, None, None] + bias.double()[:, None, None]


def test_groupnorm_computes_in_float32_for_bf16_inputs_and_params() -> None:
    torch.manual_seed(0)
    norm = GroupNorm32(4, 16)
    with torch.no_grad():
        norm.weight.normal_()
        norm.bias.normal_()
    # A large common offset: a bf16 mean/variance would lose the small fluctuations around it.
    x = (100.0 + torch.randn(2, 16, 8, 8)).to(torch.bfloat16)
    for module in (norm, GroupNorm32(4, 16).to(torch.bfloat16)):  # autocast-style, then DeepSpeed bf16
        if module is not norm:
            module.load_state_dict(norm.state_dict())
        out = module(x)
        assert out.dtype == torch.bfloat16
        ref = _group_norm_float64(x, 4, module.weight, module.bias)
        # float32 statistics: the only error left is the final rounding to bf16 (half an ulp, 2^-9).
        torch.testing.assert_close(out.double(), ref, atol=1e-6, rtol=2**-8)


def _relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


def test_bf16_parameters_and_autocast_match_float32() -> None:
    torch.manual_seed(0)
    model = randomize_zero_params(build_unet(tiny_cfg(class_cond=True), 16, 1, True, num_classes=3)).eval()
    x, t, y = torch.randn(2, 1, 16, 16), torch.tensor([7, 3500]), torch.tensor([0, 2])
    with torch.no_grad():
        ref = model(x, t, y)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            auto = model(x, t, y)
        model16 = build_unet(tiny_cfg(class_cond=True), 16, 1, True, num_classes=3).eval()
        model16.load_state_dict(model.state_dict())
        model16.to(torch.bfloat16)
        bf = model16(x.to(torch.bfloat16), t, y)
    assert auto.dtype == torch.bfloat16 and bf.dtype == torch.bfloat16
    assert _relative_error(auto, ref) < 0.05
    assert _relative_error(bf, ref) < 0.05


def test_channels_last_matches_default_layout() -> None:
    torch.manual_seed(0)
    model = randomize_zero_params(build_unet(tiny_cfg(), 16, 1, True)).eval()
    nhwc = build_unet(tiny_cfg(channels_last=True), 16, 1, True).eval()
    nhwc.load_state_dict(model.state_dict())
    conv = nhwc.input_blocks[1][0].in_conv.weight
    assert conv.is_contiguous()  # weights stay contiguous: DeepSpeed flattens and byte-views them
    seen = []
    nhwc.middle_block[0].in_conv.register_forward_hook(
        lambda _m, inputs, _o: seen.append(inputs[0].is_contiguous(memory_format=torch.channels_last))
    )
    x, t = torch.randn(2, 1, 16, 16), torch.tensor([3, 30])
    with torch.no_grad():
        torch.testing.assert_close(nhwc(x, t), model(x, t), atol=1e-5, rtol=1e-5)
    # The activations travel NHWC too (an [N, C, 8, 8] map with C > 1 is not trivially both layouts).
    assert seen == [True]


# --------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    "image,overrides,message",
    [
        (
            30,
            {"channel_mult": [1, 2, 2]},
            r"^model\.channel_mult: 3 levels downsample by 4, but the image size 30",
        ),
        (
            32,
            {"channel_mult": [1, 2, 2, 2], "attention_resolutions": [12]},
            r"^model\.attention_resolutions: 12 never occurs; resolutions are 32,16,8,4$",
        ),
        (16, {"num_heads": 3}, r"^model\.num_heads: 3 heads do not divide the 64 channels at resolution 8$"),
        (16, {"num_head_channels": 24}, r"^model\.num_head_channels: 24 does not divide the 64 channels"),
        (16, {"channels": 48}, r"^model\.norm_groups: 32 groups do not divide 48 channels"),
    ],
)
def test_impossible_shapes_raise_one_line_errors(image, overrides, message) -> None:
    with pytest.raises(ValueError, match=message) as err:
        build_unet(tiny_cfg(**overrides), image, 1, learn_sigma=False)
    assert "\n" not in str(err.value)


def test_class_cond_needs_num_classes_and_inputs_are_checked() -> None:
    with pytest.raises(ValueError, match=r"^model\.class_cond"):
        build_unet(tiny_cfg(class_cond=True), 16, 1, learn_sigma=False, num_classes=None)
    model = build_unet(tiny_cfg(), 16, 1, learn_sigma=False)
    with pytest.raises(ValueError, match="not divisible by the downsampling factor 2"):
        model(torch.zeros(1, 1, 15, 16), torch.zeros(1, dtype=torch.long))
    with pytest.raises(ValueError, match=r"t must have shape \[2\]"):
        model(torch.zeros(2, 1, 16, 16), torch.zeros(1, dtype=torch.long))


# --------------------------------------------------------------------------- costs


@pytest.mark.parametrize("updown", [False, True])
def test_parameter_and_flop_counts_match_layer_formulas(updown: bool) -> None:
    cfg = tiny_cfg(channel_mult=[1, 2, 2], num_res_blocks=2, attention_resolutions=[16, 4], resblock_updown=updown)
    model = build_unet(cfg, 16, 3, learn_sigma=True)
    params, flops = paper_unet_costs(16, 3, 6, 32, [1, 2, 2], 2, [16, 4], 2, True, None, updown=updown)
    assert count_parameters(model) == params
    assert estimate_flops_per_image(model, 16, 3, None) == flops
    assert sum(p.numel() for p in model.parameters()) == params


def test_flop_estimate_leaves_the_model_alone_and_follows_the_image_size() -> None:
    model = build_unet(tiny_cfg(attention_resolutions=[]), 16, 1, learn_sigma=False)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    for image in (16, 32):
        want = paper_unet_costs(image, 1, 1, 32, [1, 2], 1, [], 2, True, None)[1]
        assert estimate_flops_per_image(model, image, 1, None) == want
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
