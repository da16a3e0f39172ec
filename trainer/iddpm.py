"""improved-diffusion checkpoints (openai/improved-diffusion, Nichol & Dhariwal 2021) in this project's terms.

Pure functions, no files: its flag string to one of our configs (and back), its state dict to our UNet's (and
back). :mod:`trainer.convert` is the command line around them. The differences handled, all measured against
its own code on seeded models (tests/ref/generate_iddpm_refs.py):

- parameter names (``time_embed.0`` ↔ ``time_embed.mlp.0``, ``in_layers.2`` ↔ ``in_conv``, ``out_layers.3`` ↔
  ``out_rest.2``, ``skip_connection`` ↔ ``skip``, ``proj_out`` ↔ ``proj``, ``label_emb`` ↔ ``class_embed``,
  ``out.2`` ↔ ``out.1``, ...); the tensors are otherwise the same, in the same order;
- attention ``qkv`` / ``proj_out`` are 1-D convolutions there (``[out, in, 1]``), 2-D here; and its ``qkv``
  output channels are grouped per head (``[h0: q k v][h1: q k v]...``), here per kind (``[q all heads][k][v]``);
- its class embedding has 1000 rows, ours one more (the null class): an import appends a freshly drawn row;
  an export drops it;
- ``channel_mult`` is implied by ``image_size`` there; ``learn_sigma`` / ``sigma_small`` name the variance,
  ``use_kl`` / ``rescale_learned_sigmas`` the loss; ``rescale_timesteps`` is :attr:`ModelConfig.rescale_timesteps`.
"""

from __future__ import annotations

import re
import shlex
from typing import Any

import torch

DEFAULTS: dict[str, Any] = {
    "image_size": 64,
    "num_channels": 128,
    "num_res_blocks": 2,
    "num_heads": 4,
    "num_heads_upsample": -1,
    "attention_resolutions": "16,8",
    "dropout": 0.0,
    "learn_sigma": False,
    "sigma_small": False,
    "class_cond": False,
    "diffusion_steps": 1000,
    "noise_schedule": "linear",
    "timestep_respacing": "",
    "use_kl": False,
    "predict_xstart": False,
    "rescale_timesteps": True,
    "rescale_learned_sigmas": True,
    "use_checkpoint": False,
    "use_scale_shift_norm": True,
}
"""improved-diffusion's ``model_and_diffusion_defaults()``: every flag it accepts, with its default."""

CHANNEL_MULT = {32: [1, 2, 2, 2], 64: [1, 2, 3, 4], 256: [1, 1, 2, 2, 4, 4]}
"""The channel multipliers its ``create_model`` implies from ``image_size`` (no other size is accepted there)."""

NUM_CLASSES = 1000
"""Its class-conditional models have exactly this many classes (and no null class)."""

_TRUE = ("yes", "true", "t", "y", "1")
_FALSE = ("no", "false", "f", "n", "0")


class IddpmError(ValueError):
    """A flag string or checkpoint that does not describe a model here (or the reverse); one line."""


# --------------------------------------------------------------------------- flags
def parse_flags(text: str) -> dict[str, Any]:
    """``"--image_size 32 --learn_sigma True ..."`` (as its README prints them) → every flag, defaults filled in.

    Values are parsed as improved-diffusion's argparse does: booleans by its ``str2bool`` spellings, the rest by
    the type of the default. ``--key=value`` is accepted too."""
    try:
        tokens = shlex.split(text)
    except ValueError as err:  # "No closing quotation"
        raise IddpmError(f"flags: {err} in {text!r}") from None
    given: dict[str, str] = {}
    i = 0
    while i < len(tokens):
        token = tokens[i]
        if not token.startswith("--"):
            raise IddpmError(f"flags: expected --name value, got {token!r}")
        name, eq, value = token[2:].partition("=")
        if not eq:
            if i + 1 >= len(tokens):
                raise IddpmError(f"flags: --{name} has no value")
            value = tokens[i + 1]
            i += 1
        i += 1
        if name not in DEFAULTS:
            raise IddpmError(f"flags: unknown flag --{name} (improved-diffusion's model and diffusion flags only)")
        given[name] = value
    flags = dict(DEFAULTS)
    for name, value in given.items():
        flags[name] = _typed(name, value)
    return flags


def _typed(name: str, value: str) -> Any:
    default = DEFAULTS[name]
    if isinstance(default, bool):
        if value.lower() in _TRUE:
            return True
        if value.lower() in _FALSE:
            return False
        raise IddpmError(f"flags: --{name} {value!r} is not a boolean (True/False)")
    try:
        return type(default)(value)
    except ValueError:
        raise IddpmError(f"flags: --{name} {value!r} is not a {type(default).__name__}") from None


def format_flags(flags: dict[str, Any]) -> str:
    """The flag string improved-diffusion's scripts take, every flag spelled out (but an empty
    ``timestep_respacing``, which a shell would drop)."""
    return " ".join(f"--{k} {flags[k]}" for k in DEFAULTS if flags[k] != "")


def config_from_flags(flags: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(config sections ``model``/``diffusion``/``sample``, meta ``image_size``/``channels``/``num_classes``)."""
    size = flags["image_size"]
    if size not in CHANNEL_MULT:
        raise IddpmError(f"flags: --image_size {size} is not one improved-diffusion builds (32, 64 or 256)")
    try:
        attention = [int(r) for r in str(flags["attention_resolutions"]).split(",") if r.strip()]
    except ValueError:
        raise IddpmError(f"flags: --attention_resolutions {flags['attention_resolutions']!r} is not a list") from None
    fixed = "fixed_small" if flags["sigma_small"] else "fixed_large"
    var_type = "learned_range" if flags["learn_sigma"] else fixed
    steps = flags["diffusion_steps"]
    if flags["use_kl"]:
        loss, vlb_weight = "kl", 0.001
    elif flags["learn_sigma"]:
        # Its RESCALED_MSE adds vb·T/1000, i.e. our λ·T·vb with λ = 0.001; plain MSE adds vb: λ = 1/T.
        loss, vlb_weight = "hybrid", 0.001 if flags["rescale_learned_sigmas"] else 1.0 / steps
    else:
        loss, vlb_weight = "mse", 0.001
    if flags["noise_schedule"] not in ("linear", "cosine"):
        raise IddpmError(f"flags: --noise_schedule {flags['noise_schedule']!r} is not linear or cosine")
    model = {
        "channels": flags["num_channels"],
        "channel_mult": CHANNEL_MULT[size],
        "num_res_blocks": flags["num_res_blocks"],
        "attention_resolutions": attention,
        "num_heads": flags["num_heads"],
        "num_head_channels": -1,
        "num_heads_upsample": flags["num_heads_upsample"],
        "rescale_timesteps": flags["rescale_timesteps"],
        "dropout": flags["dropout"],
        "use_scale_shift_norm": flags["use_scale_shift_norm"],
        "resblock_updown": False,
        "class_cond": flags["class_cond"],
        "use_checkpoint": flags["use_checkpoint"],
        "norm_groups": 32,
    }
    diffusion = {
        "steps": steps,
        "schedule": flags["noise_schedule"],
        "mean_type": "x0" if flags["predict_xstart"] else "epsilon",
        "var_type": var_type,
        "loss": loss,
        "vlb_weight": vlb_weight,
    }
    sections: dict[str, Any] = {"model": model, "diffusion": diffusion}
    if flags["timestep_respacing"]:
        sections["sample"] = {"steps": flags["timestep_respacing"]}
    meta = {"image_size": size, "channels": 3, "num_classes": NUM_CLASSES if flags["class_cond"] else None}
    return sections, meta


def flags_from_config(cfg: Any, image_size: int, channels: int, num_classes: int | None) -> dict[str, Any]:
    """The flags that build our ``cfg`` (a :class:`trainer.config.Config`) in improved-diffusion, or IddpmError
    naming the first setting it cannot express."""
    m, d = cfg.model, cfg.diffusion
    why = []
    if image_size not in CHANNEL_MULT:
        why.append(f"image size {image_size} (it builds 32, 64 or 256)")
    elif list(m.channel_mult) != CHANNEL_MULT[image_size]:
        why.append(f"model.channel_mult {m.channel_mult} (it implies {CHANNEL_MULT[image_size]} at {image_size} px)")
    if channels != 3:
        why.append(f"{channels} image channels (it builds RGB models)")
    if m.class_cond and num_classes != NUM_CLASSES:
        why.append(f"{num_classes} classes (its class-conditional models have {NUM_CLASSES})")
    if m.num_head_channels > 0:
        why.append("model.num_head_channels (it has a fixed head count)")
    if m.resblock_updown:
        why.append("model.resblock_updown")
    if m.norm_groups != 32:
        why.append(f"model.norm_groups {m.norm_groups} (it uses 32)")
    rescale_learned_sigmas = True
    if d.loss == "hybrid":
        if abs(d.vlb_weight - 0.001) < 1e-12:
            rescale_learned_sigmas = True
        elif abs(d.vlb_weight * d.steps - 1.0) < 1e-9:
            rescale_learned_sigmas = False
        else:
            why.append(f"diffusion.vlb_weight {d.vlb_weight} (it has 0.001 or 1/T)")
    if why:
        raise IddpmError(f"not expressible in improved-diffusion: {why[0]}")
    return {
        "image_size": image_size,
        "num_channels": m.channels,
        "num_res_blocks": m.num_res_blocks,
        "num_heads": m.num_heads,
        "num_heads_upsample": m.num_heads_upsample,
        "attention_resolutions": ",".join(str(r) for r in m.attention_resolutions),
        "dropout": m.dropout,
        "learn_sigma": d.var_type == "learned_range",
        "sigma_small": d.var_type == "fixed_small",
        "class_cond": m.class_cond,
        "diffusion_steps": d.steps,
        "noise_schedule": d.schedule,
        "timestep_respacing": "",
        "use_kl": d.loss == "kl",
        "predict_xstart": d.mean_type == "x0",
        "rescale_timesteps": m.rescale_timesteps,
        "rescale_learned_sigmas": rescale_learned_sigmas,
        "use_checkpoint": m.use_checkpoint,
        "use_scale_shift_norm": m.use_scale_shift_norm,
    }


# --------------------------------------------------------------------------- names
# (their suffix, our suffix), matched at the end of a block's name; first match wins.
_RENAMES: list[tuple[str, str]] = [
    (r"^time_embed\.(0|2)\.", r"time_embed.mlp.\1."),
    (r"^label_emb\.", "class_embed."),
    (r"^out\.0\.", "out.0.0."),
    (r"^out\.2\.", "out.1."),
    (r"\.in_layers\.0\.", ".in_act.0."),
    (r"\.in_layers\.2\.", ".in_conv."),
    (r"\.emb_layers\.1\.", ".emb_proj.1."),
    (r"\.out_layers\.0\.", ".out_norm."),
    (r"\.out_layers\.3\.", ".out_rest.2."),
    (r"\.skip_connection\.", ".skip."),
    (r"\.proj_out\.", ".proj."),
]


def _rename(name: str, table: list[tuple[str, str]]) -> str:
    for pattern, repl in table:
        new, n = re.subn(pattern, repl, name)
        if n:
            return new
    return name


# The reverse table: our names back to theirs (patterns are plain prefixes/infixes, so escape and swap).
_BACK: list[tuple[str, str]] = [
    (r"^time_embed\.mlp\.(0|2)\.", r"time_embed.\1."),
    (r"^class_embed\.", "label_emb."),
    (r"^out\.0\.0\.", "out.0."),
    (r"^out\.1\.", "out.2."),
    (r"\.in_act\.0\.", ".in_layers.0."),
    (r"\.in_conv\.", ".in_layers.2."),
    (r"\.emb_proj\.1\.", ".emb_layers.1."),
    (r"\.out_norm\.", ".out_layers.0."),
    (r"\.out_rest\.2\.", ".out_layers.3."),
    (r"\.skip\.", ".skip_connection."),
    (r"\.proj\.", ".proj_out."),
]


def attention_heads(model: torch.nn.Module) -> dict[str, int]:
    """``{"<block name>": heads}`` for every attention block of our UNet (qkv regrouping needs it)."""
    from trainer.models.unet import AttentionBlock

    return {name: mod.num_heads for name, mod in model.named_modules() if isinstance(mod, AttentionBlock)}


def _qkv_channels(w: torch.Tensor, heads: int) -> tuple[int, int]:
    c3 = w.shape[0]
    if heads < 1 or c3 % (3 * heads):
        raise IddpmError(f"attention qkv: {c3} output channels do not split into q, k, v of {heads} heads")
    return c3, c3 // (3 * heads)


def _qkv_per_head_to_per_kind(w: torch.Tensor, heads: int) -> torch.Tensor:
    # Output channel (head, kind, j) there → (kind, head, j) here; the input dimensions follow untouched.
    c3, d = _qkv_channels(w, heads)
    return w.reshape(heads, 3, d, *w.shape[1:]).transpose(0, 1).reshape(c3, *w.shape[1:])


def _qkv_per_kind_to_per_head(w: torch.Tensor, heads: int) -> torch.Tensor:
    c3, d = _qkv_channels(w, heads)
    return w.reshape(3, heads, d, *w.shape[1:]).transpose(0, 1).reshape(c3, *w.shape[1:])


def import_state_dict(
    theirs: dict[str, torch.Tensor],
    expected: dict[str, torch.Tensor],
    heads: dict[str, int],
    null_row_seed: int = 0,
) -> dict[str, torch.Tensor]:
    """Their state dict → ours, checked key by key against ``expected`` (our model's state dict); IddpmError on
    the first missing, unexpected or misshapen tensor. ``heads`` is :func:`attention_heads` of our model.

    A class-conditional import gets one more embedding row, the null class, drawn like a fresh
    ``nn.Embedding`` row (N(0, 1), from ``null_row_seed``): the released models never saw it, so it only means
    something after fine-tuning with label dropout (``model.label_dropout``)."""
    if not isinstance(theirs, dict) or not all(isinstance(v, torch.Tensor) for v in theirs.values()):
        raise IddpmError("checkpoint: not a state dict of tensors (an improved-diffusion model*.pt or ema_*.pt)")
    out: dict[str, torch.Tensor] = {}
    for name, tensor in theirs.items():
        ours = _rename(name, _RENAMES)
        if ours not in expected:
            raise IddpmError(f"checkpoint: {name!r} has no counterpart in the model its flags build")
        block = ours.rsplit(".", 2)[0]
        value = tensor.detach().clone().float()
        if ours.endswith((".qkv.weight", ".qkv.bias")) and block in heads:
            value = _qkv_per_head_to_per_kind(value, heads[block])
        if ours.endswith((".qkv.weight", ".proj.weight")) and block in heads and value.ndim == 3:
            value = value[..., None]  # 1-D [out, in, 1] → 2-D [out, in, 1, 1]
        if ours == "class_embed.weight" and value.shape[0] == expected[ours].shape[0] - 1:
            gen = torch.Generator().manual_seed(null_row_seed)
            null = torch.randn(1, value.shape[1], generator=gen)
            value = torch.cat([value, null])
        want = tuple(expected[ours].shape)
        if tuple(value.shape) != want:
            raise IddpmError(
                f"checkpoint: {name!r} has shape {tuple(tensor.shape)}, the model its flags build needs {want} "
                f"(as {ours!r}): wrong --flags?"
            )
        out[ours] = value
    missing = [k for k in expected if k not in out]
    if missing:
        raise IddpmError(f"checkpoint: lacks {len(missing)} tensors the flags' model has, e.g. {missing[0]!r}")
    return out


def export_state_dict(ours: dict[str, torch.Tensor], heads: dict[str, int]) -> dict[str, torch.Tensor]:
    """Our state dict → theirs (the null-class row dropped; 1-D attention convolutions; per-head qkv)."""
    out: dict[str, torch.Tensor] = {}
    for name, tensor in ours.items():
        value = tensor.detach().clone().float()
        block = name.rsplit(".", 2)[0]
        if name.endswith((".qkv.weight", ".qkv.bias")) and block in heads:
            value = _qkv_per_kind_to_per_head(value, heads[block])
        if name.endswith((".qkv.weight", ".proj.weight")) and block in heads and value.ndim == 4:
            value = value[..., 0]
        if name == "class_embed.weight":
            value = value[:-1]
        out[_rename(name, _BACK)] = value
    return out


__all__ = [
    "CHANNEL_MULT",
    "DEFAULTS",
    "NUM_CLASSES",
    "IddpmError",
    "attention_heads",
    "config_from_flags",
    "export_state_dict",
    "flags_from_config",
    "format_flags",
    "import_state_dict",
    "parse_flags",
]
