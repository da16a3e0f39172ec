"""``python -m trainer.phema reconstruct RUN_DIR ...`` (any launcher: torchrun, deepspeed, plain python)."""

from __future__ import annotations

import argparse
import sys

from trainer.phema import reconstruct


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m trainer.phema", description="Post-hoc EMA (EDM2) tools.")
    sub = p.add_subparsers(dest="command", required=True)
    reconstruct.add_arguments(sub.add_parser("reconstruct", help="EMA of any sigma_rel from the snapshots"))
    args = p.parse_args(argv)
    from trainer.evaluation.inference import run_cli

    def run(a: argparse.Namespace, env: object) -> int:
        reconstruct.reconstruct(
            env,  # type: ignore[arg-type]
            a.run_dir,
            a.sigma_rel,
            a.decay,
            a.half_life_images,
            step=a.step,
            out=a.out,
            max_error=a.max_error,
        )
        return 0

    return run_cli(args, run, reconstruct.ERRORS)


if __name__ == "__main__":
    sys.exit(main())
