"""Training entry point, the same for every launcher.

    deepspeed --num_gpus 2 trainer/main.py --config configs/quickstart.yaml [key=value ...]
    torchrun --nproc_per_node 2 trainer/main.py --config configs/quickstart.yaml
    python trainer/main.py --config configs/quickstart.yaml          # one process
    python cluster/submit.py --config ... --nodes 4                  # SLURM, calls main() per task

The loop reads top to bottom: build the pieces, resume, then for every optimizer step draw
micro-batches and timesteps, compute the Improved-DDPM losses, step, update the timestep history
and the EMA, log, checkpoint, and stop cleanly on preemption.
"""

from __future__ import annotations

import os
import sys

if __package__ in (None, ""):
    # Run as a script: drop trainer/ itself from sys.path so its modules cannot shadow top-level ones.
    _here = os.path.dirname(os.path.abspath(__file__))
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _here]

import argparse
import json
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch

from data_prep.manifest import ManifestError
from trainer import distributed, preemption
from trainer.checkpoint import (
    EXPORT_NAME,
    CheckpointError,
    CheckpointManager,
    export_weights,
    rng_state,
    set_rng_state,
)
from trainer.config import Config, ConfigError, dump_config, load_config
from trainer.data import DataError, build_train_stream, load_manifest
from trainer.diffusion import create_diffusion
from trainer.ema import EMA
from trainer.engine import build_engine, model_fn
from trainer.metrics import LossWindow
from trainer.models.unet import build_unet, count_parameters, estimate_flops_per_image
from trainer.sampling import generate_grid
from trainer.timesteps import (
    create_timestep_sampler,
    plot_timestep_importance,
    sampler_summary_metrics,
)
from trainer.tracking import Tracker, create_tracker, resolve_uri

RUN_INFO = "run_info.json"
USER_ERRORS = (ConfigError, CheckpointError, ManifestError, DataError, distributed.LauncherError)
"""Problems with what the user gave us: reported as one line, exit status 2."""


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="trainer/main.py", description="Train an Improved-DDPM model.")
    p.add_argument("--config", default="configs/quickstart.yaml", help="YAML config (default: %(default)s)")
    p.add_argument(
        "--resume",
        default="auto",
        help="'auto' (newest complete checkpoint in train.output_dir, if any), 'none', or a checkpoint path",
    )
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.lr=2e-4 model.channels=64")
    return p.parse_intermixed_args(argv)


# ------------------------------------------------------------------------------------------ helpers


def _log(env: distributed.DistEnv, msg: str) -> None:
    if env.is_main:
        print(msg, flush=True)


def _fmt_time(seconds: float) -> str:
    seconds = int(max(0, seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"


def _read_run_info(out: Path) -> dict[str, Any]:
    try:
        return json.loads((out / RUN_INFO).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return {}


def _write_run_info(out: Path, info: dict[str, Any]) -> None:
    tmp = out / f".{RUN_INFO}.tmp"
    tmp.write_text(json.dumps(info, indent=2))
    os.replace(tmp, out / RUN_INFO)


def _param_digest(module: torch.nn.Module) -> str | None:
    """SHA-256 of this rank's parameter bytes: equal on every rank when replicas agree (None under ZeRO-3,
    where each rank holds a different shard)."""
    import hashlib

    params = list(module.parameters())
    if any(hasattr(p, "ds_tensor") for p in params):
        return None
    h = hashlib.sha256()
    for p in params:
        h.update(p.detach().float().cpu().numpy().tobytes())
    return h.hexdigest()


def _full_model_state(engine: Any) -> dict[str, torch.Tensor]:
    """Full float32 weights of the (possibly ZeRO-3 partitioned) module. Collective."""
    import deepspeed

    params = list(engine.module.parameters())
    with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
        return {k: v.detach().float().cpu().clone() for k, v in engine.module.state_dict().items()}


# ------------------------------------------------------------------------------------------ the run


class Trainer:
    """Holds the pieces of one run; :meth:`fit` is the loop."""

    def __init__(self, cfg: Config, env: distributed.DistEnv) -> None:
        self.cfg, self.env = cfg, env
        self.out = Path(cfg.train.output_dir)
        if env.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
        distributed.barrier()

        self.manifest = load_manifest(cfg.data.root)
        self.num_classes = self.manifest.num_classes if cfg.model.class_cond else None
        torch.manual_seed(cfg.train.seed)  # identical initial weights on every rank
        try:
            model = build_unet(
                cfg.model,
                image_size=self.manifest.image_size,
                in_channels=self.manifest.channels,
                learn_sigma=cfg.diffusion.var_type == "learned_range",
                num_classes=self.num_classes,
            )
        except ValueError as err:  # an architecture impossible for these images: a config problem
            raise ConfigError(f"{err} (images are {self.manifest.image_size}px)") from None
        self.n_params = count_parameters(model)
        self.flops = estimate_flops_per_image(model, self.manifest.image_size, self.manifest.channels, self.num_classes)
        # From here on each rank needs its own stream (noise, timesteps, dropout): identical streams
        # would make the ranks' batches share their noise.
        torch.manual_seed(cfg.train.seed * 1_000_003 + env.rank + 1)
        self.diffusion = create_diffusion(
            steps=cfg.diffusion.steps,
            schedule=cfg.diffusion.schedule,
            mean_type=cfg.diffusion.mean_type,
            var_type=cfg.diffusion.var_type,
            loss=cfg.diffusion.loss,
            vlb_weight=cfg.diffusion.vlb_weight,
            respacing="",
        )
        self.engine = build_engine(cfg, model)
        self.call = model_fn(self.engine)
        self.ema = EMA(self.engine.module, cfg.train.ema_rates)
        self.sampler = create_timestep_sampler(
            name=cfg.diffusion.timestep_sampler,
            num_timesteps=cfg.diffusion.steps,
            history_per_term=cfg.diffusion.history_per_term,
            uniform_prob=cfg.diffusion.uniform_prob,
            device=env.device,
        )
        self.ckpt = CheckpointManager(self.out / "checkpoints", cfg.train.keep_last, env)
        self.step = 0
        self.samples_seen = 0
        self.curves: dict[str, list[tuple[int, float]]] = defaultdict(list)
        self.tracker: Tracker = Tracker()

    # -------------------------------------------------------------- resume and tracking
    def resume(self, resume: str | None) -> str | None:
        """Load the checkpoint named by ``--resume``; returns the MLflow run id to continue, if any."""
        env = self.env
        run_id = _read_run_info(self.out).get("mlflow_run_id") if resume != "none" else None
        # Rank 0 picks the checkpoint and tells the others: on a network filesystem ranks can see
        # different directory listings, and every rank must load the same one.
        choice: tuple[str | None, str | None] = (None, None)
        if env.is_main:
            try:
                found = self.ckpt.resolve(resume)
                newest = self.ckpt.latest()
                if found is None and resume == "none" and newest is not None:
                    raise CheckpointError(
                        f"{self.ckpt.root} already holds checkpoints (newest {newest.name}): use --resume auto to "
                        "continue that run, or set another train.output_dir"
                    )
                choice = (str(found) if found else None, None)
            except CheckpointError as err:
                choice = (None, str(err))
        path, error = distributed.broadcast_object(choice, env.device)
        if error:
            raise CheckpointError(error)
        if path is None:
            if resume == "auto":
                _log(env, f"no checkpoint in {self.ckpt.root}: starting from scratch")
            return run_id
        tag_dir = Path(path)
        failure: str | None = None
        try:
            common, per_rank = self.ckpt.load(self.engine, tag_dir)
            self._restore(common, per_rank, tag_dir)
        except CheckpointError as err:
            failure = str(err)
        except (KeyError, ValueError, RuntimeError) as err:
            failure = f"{tag_dir}: cannot restore this run from it ({type(err).__name__}: {err})"
        # A file missing on one rank must stop every rank, not leave the others waiting in a collective.
        if distributed.any_rank(failure is not None, env.device):
            raise CheckpointError(failure or f"{tag_dir}: another rank could not load this checkpoint")
        _log(env, f"resumed from {tag_dir} at step {self.step}")
        return common.get("mlflow_run_id") or run_id

    def _restore(self, common: dict[str, Any], per_rank: dict[str, Any], tag_dir: Path) -> None:
        self.step = int(common["step"])
        self.samples_seen = int(common["samples_seen"])
        self.sampler.load_state_dict(common["timestep_sampler"])
        self.curves.update({k: [tuple(p) for p in v] for k, v in common.get("curves", {}).items()})
        saved_world = int(common.get("world_size", self.env.world_size))
        if saved_world != self.env.world_size and self.ema.zero3:
            raise CheckpointError(
                f"{tag_dir}: saved by {saved_world} ranks under ZeRO-3; resume it with the same number of ranks"
            )
        self.ema.load_state_dict(per_rank["ema"])  # replicated below ZeRO-3: any rank's copy will do
        if saved_world == self.env.world_size:
            set_rng_state(per_rank["rng"])
        else:
            # New ranks have no saved stream; give every rank a fresh one that differs per rank and step.
            torch.manual_seed((self.cfg.train.seed * 1_000_003 + self.env.rank + 1) * 7919 + self.step)

    def start_tracking(self, run_id: str | None) -> None:
        cfg, env = self.cfg, self.env
        fresh = run_id is None
        self.tracker = create_tracker(cfg.tracking, env.is_main, run_id, cfg.tracking.run_name)
        restarts = distributed.restart_count()
        self._record_run_info(restarts=restarts)
        if restarts:
            _log(env, f"this job was restarted {restarts} time(s) by the scheduler")
        if fresh:
            self.tracker.log_params(cfg.to_flat_dict())
            self.tracker.log_params(
                {
                    "model.parameters": self.n_params,
                    "model.gflops_per_image": round(self.flops / 1e9, 4),
                    "world_size": env.world_size,
                    "device": str(env.device),
                    "data.train_samples": self.manifest.num_train,
                }
            )
            self.tracker.log_artifact_bytes(dump_config(cfg).encode(), "config/resolved.yaml")
        self.tracker.set_tags({"restarts": str(restarts), "world_size": str(env.world_size)})
        if self.tracker.ui_hint:
            _log(env, self.tracker.ui_hint)

    def _record_run_info(self, **extra: Any) -> None:
        """Keep ``run_info.json`` (read by ``--resume auto`` and cluster/) in step with the tracker. A known
        run id is never replaced by None, so a tracking outage cannot fork the MLflow run on restart."""
        if not self.env.is_main:
            return
        info = _read_run_info(self.out)
        new = dict(info, tracking_uri=resolve_uri(self.cfg.tracking.uri), **extra)
        if self.tracker.run_id:
            new["mlflow_run_id"] = self.tracker.run_id
        if new != info:
            _write_run_info(self.out, new)

    # -------------------------------------------------------------- persistence
    def save(self) -> Path:
        common = {
            "step": self.step,
            "samples_seen": self.samples_seen,
            "timestep_sampler": self.sampler.state_dict(),
            "mlflow_run_id": self.tracker.run_id or _read_run_info(self.out).get("mlflow_run_id"),
            "world_size": self.env.world_size,
            "curves": {k: [list(p) for p in v] for k, v in self.curves.items()},
        }
        digest = _param_digest(self.engine.module)
        per_rank = {"ema": self.ema.state_dict(), "rng": rng_state(), "param_digest": digest}
        digests = [None] * self.env.world_size
        if torch.distributed.is_initialized() and self.env.world_size > 1:
            torch.distributed.all_gather_object(digests, digest)
            if len(set(digests)) > 1:
                print(
                    f"warning: rank {self.env.rank}: model replicas differ across ranks at step {self.step}",
                    file=sys.stderr,
                    flush=True,
                )
        tag_dir = self.ckpt.save(
            self.engine, self.step, common, per_rank, before_complete=lambda d: self.export(d / EXPORT_NAME)
        )
        self._record_run_info()
        _log(self.env, f"checkpoint saved: {tag_dir}")
        return tag_dir

    def export(self, path: Path) -> None:
        """Inference weights (raw and EMA, full float32) next to the checkpoint. Collective."""
        model_state = _full_model_state(self.engine)
        ema = {str(r): self.ema.full_state_dict(r) for r in self.ema.rates}
        if self.env.is_main:
            meta = {
                "image_size": self.manifest.image_size,
                "channels": self.manifest.channels,
                "num_classes": self.num_classes,
                "mlflow_run_id": self.tracker.run_id,
                "tracking_uri": resolve_uri(self.cfg.tracking.uri),
            }
            export_weights(path, self.cfg.model_dump(mode="json"), self.step, model_state, ema, meta)
        distributed.barrier()

    # -------------------------------------------------------------- pictures
    def sample_grid(self) -> None:
        """A grid from the EMA weights (rank 0 samples; gathering the EMA is collective)."""
        cfg = self.cfg
        weights = (
            self.ema.full_state_dict(cfg.sample_ema_rate) if cfg.sample.use_ema else _full_model_state(self.engine)
        )
        if self.env.is_main:
            t0 = time.perf_counter()
            # Building the sampling model draws initial weights from the global RNG: keep the training
            # stream untouched so a resumed run continues exactly like an uninterrupted one.
            cuda = [self.env.device] if self.env.device.type == "cuda" else []
            with torch.random.fork_rng(devices=cuda):
                png, arr = generate_grid(
                    cfg,
                    weights,
                    self.manifest.image_size,
                    self.manifest.channels,
                    self.num_classes,
                    self.env.device,
                )
            dt = time.perf_counter() - t0
            samples_dir = self.out / "samples"
            samples_dir.mkdir(exist_ok=True)
            path = samples_dir / f"step_{self.step:08d}.png"
            path.write_bytes(png)
            self.tracker.log_artifact_file(path, "samples")
            self.tracker.log_metrics({"sample/seconds_per_image": dt / len(arr)}, step=self.step)
            print(f"sample grid ({cfg.sample.method}, steps={cfg.sample.steps or 'all'}): {path}", flush=True)
        distributed.barrier()

    def log_importance(self) -> None:
        if self.env.is_main:
            self.tracker.log_artifact_bytes(
                plot_timestep_importance(self.sampler, self.step),
                f"timesteps/importance_step_{self.step:08d}.png",
            )

    # -------------------------------------------------------------- the loop
    def fit(self) -> int:
        cfg, env = self.cfg, self.env
        total, accum = cfg.train.total_steps, cfg.train.grad_accum
        stream = build_train_stream(
            cfg.data,
            self.manifest,
            rank=env.rank,
            world_size=env.world_size,
            seed=cfg.data.seed,
            start_step=self.step,
        )
        batches = iter(stream)
        plot_every = cfg.train.importance_plot_every or cfg.train.ckpt_every
        _log(
            env,
            f"training {self.n_params / 1e6:.2f}M params ({self.flops / 1e9:.3f} GFLOP/img) on {env.world_size} "
            f"x {env.device.type}, steps {self.step}->{total}, global batch "
            f"{cfg.data.batch_size * accum * env.world_size}",
        )
        window = LossWindow(self.diffusion.num_timesteps, env.device)
        t_window = time.perf_counter()
        t_start, step_start = t_window, self.step
        saved_at = self.step if self.step else -1

        while self.step < total:
            if distributed.any_rank(preemption.requested(), env.device):
                _log(env, f"stop signal received at step {self.step}: saving and exiting for requeue")
                if saved_at != self.step:
                    self.save()
                return preemption.EXIT_PREEMPTED

            for _ in range(accum):
                x, y = next(batches)
                x = x.to(env.device, non_blocking=True)
                kwargs = {"y": y.to(env.device)} if self.num_classes else {}
                t, weights = self.sampler.sample(x.shape[0])
                terms = self.diffusion.training_losses(self.call, x, t, model_kwargs=kwargs)
                loss = (terms["loss"] * weights).mean()
                self.engine.backward(loss)
                self.engine.step()
                # The history tracks the unweighted per-sample L_vlb term: the paper's importance sampling
                # targets L_vlb (and the config allows it only with the hybrid or kl objective).
                self.sampler.record(t, terms["vb"].detach())
                window.add(loss, terms, t, weights)
                self.samples_seen += x.shape[0] * env.world_size
            self.sampler.sync()
            self.ema.update()
            self.step += 1

            if self.step % cfg.train.log_every == 0 or self.step == total:
                now = time.perf_counter()
                steps_done = window.micro_batches / accum
                metrics = window.reduce()
                rate = steps_done / (now - t_window)
                data_stats = stream.stats()
                metrics.update(
                    {
                        "lr": self.engine.get_lr()[0],
                        "steps_per_s": rate,
                        "samples_per_s": rate * cfg.data.batch_size * accum * env.world_size,
                        "data/wait_s": float(data_stats.get("wait_s", 0.0)),
                        "data/skipped": float(data_stats.get("skipped", 0)),
                        "data/shard_errors": float(data_stats.get("shard_errors", 0)),
                        "data/samples_per_s": float(data_stats.get("samples_per_s", 0.0)),
                        **sampler_summary_metrics(self.sampler),
                    }
                )
                grad_norm = self.engine.get_global_grad_norm()
                if grad_norm is not None:  # not every ZeRO stage / precision reports it
                    metrics["grad_norm"] = float(grad_norm)
                eta = (total - self.step) * (now - t_start) / max(1, self.step - step_start)
                _log(
                    env,
                    f"step {self.step}/{total} | loss {metrics['loss']:.4f} mse {metrics['mse']:.4f}"
                    + f" vb {metrics['vb']:.4f}"
                    + f" | {rate:.2f} steps/s {metrics['samples_per_s']:.0f} samples/s | ETA {_fmt_time(eta)}",
                )
                self.tracker.log_metrics({f"train/{k}": v for k, v in metrics.items()}, step=self.step)
                for k in ("loss", "mse", "vb"):
                    if k in metrics:
                        self.curves[k].append((self.step, metrics[k]))
                t_window = time.perf_counter()

            if self.step % cfg.train.ckpt_every == 0 or self.step == total:
                self.save()
                saved_at = self.step
            if self.step % plot_every == 0 and cfg.diffusion.timestep_sampler != "uniform":
                self.log_importance()
            if cfg.train.sample_every and self.step % cfg.train.sample_every == 0 and self.step != total:
                self.sample_grid()

        if saved_at != self.step:
            self.save()
        if cfg.diffusion.timestep_sampler != "uniform":
            self.log_importance()
        if self.env.is_main and self.curves:
            from trainer.images import curves_png

            self.tracker.log_artifact_bytes(curves_png(dict(self.curves)), "plots/loss_curves.png")
        self.sample_grid()
        return 0


def run(cfg: Config, resume: str | None) -> int:
    """Train with an initialised distributed environment. Returns the process exit status."""
    env = distributed.init_distributed()
    preemption.install()
    trainer: Trainer | None = None
    status = "FAILED"
    try:
        trainer = Trainer(cfg, env)
        run_id = trainer.resume(resume)
        trainer.start_tracking(run_id)
        code = trainer.fit()
        status = "FINISHED" if code == 0 else "KILLED"
        return code
    finally:
        if trainer is not None:
            trainer.tracker.close(status=status)
        distributed.shutdown()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        return run(cfg, args.resume)
    except USER_ERRORS as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        return 2


def cli() -> None:
    sys.exit(main())


if __name__ == "__main__":
    cli()
