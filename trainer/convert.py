"""Convert improved-diffusion checkpoints to runs of this project and back.

    python -m trainer.convert from-iddpm cifar10_uncond_50M_500K.pt --out runs/iddpm_cifar10 --flags \\
        "--image_size 32 --num_channels 128 --num_res_blocks 3 --learn_sigma True --dropout 0.3 \\
         --diffusion_steps 4000 --noise_schedule cosine"
    python -m trainer.convert to-iddpm runs/cifar10 --out cifar10_ema.pt

``from-iddpm`` writes ``RUN_DIR/export.pt`` (the same weights as raw and as the EMA of ``train.ema_rates[0]``)
and ``RUN_DIR/config.yaml``: ``trainer/sample.py`` and ``trainer/evaluate.py`` take the directory as they take
any run, and ``train.init_from: RUN_DIR/export.pt`` fine-tunes it. ``to-iddpm`` writes improved-diffusion's
state dict and the flag string that builds it (printed, and saved as ``FILE.flags.txt``). The mapping is
:mod:`trainer.iddpm`. Every problem is one ``error:`` line, exit status 2.
"""

from __future__ import annotations

import trainer  # noqa: F401  (first: a script run drops trainer/ from sys.path, see trainer/__init__.py)

# isort: split
import argparse
import sys
from pathlib import Path

import torch

from trainer.checkpoint import CheckpointError, atomic_torch_save, load_plain
from trainer.config import ConfigError, config_from_dict, dump_config
from trainer.export import EXPORT_NAME, export_weights, load_export
from trainer.iddpm import (
    IddpmError,
    attention_heads,
    config_from_flags,
    export_state_dict,
    flags_from_config,
    format_flags,
    import_state_dict,
    parse_flags,
)
from trainer.models.unet import build_model


def from_iddpm(checkpoint: str, flags_text: str, out_dir: str, null_row_seed: int = 0) -> Path:
    """Write ``out_dir/export.pt`` and ``out_dir/config.yaml`` from an improved-diffusion state dict file."""
    flags = parse_flags(flags_text)
    sections, meta = config_from_flags(flags)
    cfg = config_from_dict(sections, source="--flags")
    theirs = load_plain(Path(checkpoint))
    try:
        model = build_model(cfg, meta["image_size"], meta["channels"], meta["num_classes"])
    except ValueError as err:
        raise IddpmError(f"flags: they do not build a model here ({err})") from None
    weights = import_state_dict(theirs, model.state_dict(), attention_heads(model), null_row_seed)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    meta = {**meta, "source": f"improved-diffusion {Path(checkpoint).name}", "iddpm_flags": format_flags(flags)}
    rate = str(cfg.train.ema_rates[0])
    export_weights(out / EXPORT_NAME, cfg.model_dump(mode="json"), 0, weights, {rate: weights}, meta)
    (out / "config.yaml").write_text(dump_config(cfg))
    return out / EXPORT_NAME


def to_iddpm(run: str, out_file: str, raw: bool = False, ema_rate: float | None = None) -> tuple[Path, str]:
    """Write improved-diffusion's state dict of a run's export to ``out_file``; return it and the flag string."""
    state = load_export(run)
    cfg = config_from_dict(state["config"], source=state["path"])
    meta = state["meta"]
    if raw:
        weights = state["model"]
    else:
        rate = str(ema_rate if ema_rate is not None else cfg.sample_ema_rate)
        if rate not in state["ema"]:
            raise CheckpointError(f"{state['path']}: no EMA at rate {rate} (has {', '.join(state['ema'])})")
        weights = state["ema"][rate]
    flags = flags_from_config(cfg, meta["image_size"], meta["channels"], meta["num_classes"])
    with torch.device("meta"):
        model = build_model(cfg, meta["image_size"], meta["channels"], meta["num_classes"])
    theirs = export_state_dict(weights, attention_heads(model))
    path = Path(out_file)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_torch_save(theirs, path)
    text = format_flags(flags)
    path.with_suffix(".flags.txt").write_text(text + "\n")
    return path, text


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m trainer.convert", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    f = sub.add_parser("from-iddpm", help="an improved-diffusion checkpoint -> a run directory")
    f.add_argument("checkpoint", help="improved-diffusion model*.pt or ema_*.pt (a state dict)")
    f.add_argument("--flags", required=True, help="its MODEL_FLAGS and DIFFUSION_FLAGS, as one string")
    f.add_argument("--out", required=True, help="run directory to write (export.pt, config.yaml)")
    f.add_argument("--null-row-seed", type=int, default=0, help="seed of the fresh null-class embedding row")
    t = sub.add_parser("to-iddpm", help="a run (its export.pt) -> an improved-diffusion state dict + flags")
    t.add_argument("run", help="export.pt, a checkpoint directory, or a run's output directory")
    t.add_argument("--out", required=True, help="the .pt file to write (flags go to FILE.flags.txt)")
    t.add_argument("--raw", action="store_true", help="the raw weights instead of the EMA")
    t.add_argument("--ema-rate", type=float, default=None, help="which EMA (default: sample.ema_rate)")
    args = p.parse_args(argv)
    try:
        if args.command == "from-iddpm":
            path = from_iddpm(args.checkpoint, args.flags, args.out, args.null_row_seed)
            print(f"wrote {path}")
        else:
            path, text = to_iddpm(args.run, args.out, args.raw, args.ema_rate)
            print(f"wrote {path} ({path.with_suffix('.flags.txt')})")
            print(text)
    except (IddpmError, CheckpointError, ConfigError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


def cli() -> None:
    sys.exit(main())


if __name__ == "__main__":
    cli()
