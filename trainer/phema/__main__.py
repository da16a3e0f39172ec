"""``python -m trainer.phema reconstruct RUN_DIR ...`` (any launcher: torchrun, deepspeed, plain python)."""

from __future__ import annotations

import argparse
import sys

from trainer.phema import reconstruct, sweep


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m trainer.phema", description="Post-hoc EMA (EDM2) tools.")
    sub = p.add_subparsers(dest="command", required=True)
    reconstruct.add_arguments(sub.add_parser("reconstruct", help="EMA of any sigma_rel from the snapshots"))
    args = p.parse_args(argv)
    from trainer.evaluation.inference import run_cli

    def run(a: argparse.Namespace, env: object) -> int:
        cfg = None
        if a.eval:  # checked before reconstructing: a bad feature network or data root stops at once
            config = reconstruct.newest_export(a.run_dir)["config"]
            cfg = sweep.sweep_config(
                config,
                a.eval,
                a.data_root,
                a.eval_images,
                a.eval_timesteps,
                a.features,
                a.reference,
                a.fid_samples,
                a.fid_steps,
            )
        plan, paths = reconstruct.reconstruct(
            env,  # type: ignore[arg-type]
            a.run_dir,
            a.sigma_rel,
            a.decay,
            a.half_life_images,
            step=a.step,
            out=a.out,
            max_error=a.max_error,
        )
        if cfg is not None:
            rows = sweep.run_sweep(env, a.run_dir, plan, paths, cfg, a.eval)  # type: ignore[arg-type]
            if rows:
                meta = reconstruct.newest_export(a.run_dir)["meta"]
                base = a.out or a.run_dir / "phema" / "reconstructed"
                tracked = sorted({float(s) for e in plan.entries for s in e["sigma_rels"]})
                sweep.write_report(base / f"sweep_step{plan.step:08d}", rows, a.eval, tracked, plan.step, meta)
        return 0

    return run_cli(args, run, reconstruct.ERRORS)


if __name__ == "__main__":
    sys.exit(main())
