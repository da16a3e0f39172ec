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
import threading
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from data_prep.manifest import ManifestError
from trainer import distributed, preemption, runtime
from trainer.checkpoint import EXPORT_NAME, CheckpointError, CheckpointManager, RNGState, export_weights
from trainer.config import Config, ConfigError, dump_config, load_config
from trainer.data import DataError, build_train_stream, load_manifest
from trainer.ema import EMA
from trainer.engine import StepGate, build_engine, model_fn
from trainer.guidance import drop_labels
from trainer.inference import base_diffusion, generate_grid
from trainer.metrics import LossWindow
from trainer.models.unet import build_unet, count_parameters, estimate_flops_per_image
from trainer.nonfinite import NonFiniteGuard
from trainer.periodic_eval import PeriodicEval
from trainer.timesteps import (
    create_timestep_sampler,
    plot_timestep_importance,
    sampler_summary_metrics,
)
from trainer.tracking import Tracker, create_tracker, resolve_uri, validate_uri

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


class NonFiniteError(RuntimeError):
    """Too many consecutive non-finite steps: the run stops (exit status EXIT_NONFINITE)."""


EXIT_NONFINITE = 3


@dataclass(frozen=True)
class StepOutcome:
    """The settled verdict on one optimizer step, the same on every rank."""

    kept: bool  # False: a non-finite loss or gradient somewhere; the step was skipped whole
    stop: bool  # a stop signal reached some rank: every rank saves and exits after this step


@dataclass
class _InFlight:
    verdict: distributed.HostCopy  # the agreed [non-finite count, stop] of a launched, unsettled step
    ds_skipped: bool  # DeepSpeed skipped it itself (known on the host at once)


class TrainState:
    """The run's counters and curves: identical on every rank, saved once (shared scope)."""

    def __init__(self) -> None:
        self.step = 0
        self.samples_seen = 0
        self.skipped_steps = 0
        self.bad_streak = 0
        self.mlflow_run_id: str | None = None
        self.curves: dict[str, list[tuple[int, float]]] = defaultdict(list)

    def state_dict(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "samples_seen": self.samples_seen,
            "skipped_steps": self.skipped_steps,
            "bad_streak": self.bad_streak,
            "mlflow_run_id": self.mlflow_run_id,
            "curves": {k: [list(p) for p in v] for k, v in self.curves.items()},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step = int(state["step"])
        self.samples_seen = int(state["samples_seen"])
        self.skipped_steps = int(state.get("skipped_steps", 0))
        self.bad_streak = int(state.get("bad_streak", 0))
        self.mlflow_run_id = state.get("mlflow_run_id")
        self.curves = defaultdict(list, {k: [(int(a), float(b)) for a, b in v] for k, v in state["curves"].items()})


def _prepare_output_dir(out: Path, env: distributed.DistEnv) -> None:
    """Rank 0 creates ``train.output_dir``; every rank learns whether that worked (no one waits forever)."""
    error = None
    if env.is_main:
        try:
            out.mkdir(parents=True, exist_ok=True)
            probe = out / ".write_test"
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as err:
            error = f"train.output_dir={out}: cannot write there ({err.strerror or type(err).__name__})"
    error = distributed.broadcast_object(error, env.device)
    if error:
        raise ConfigError(error)


class Trainer:
    """Composes the parts of one run; :meth:`fit` is the loop, :meth:`train_step` one optimizer step."""

    def __init__(self, cfg: Config, env: distributed.DistEnv) -> None:
        # Precision, per-rank batch and loader settings depend on the hardware and the world size.
        cfg, info, warnings = runtime.resolve(cfg, env.device, env.world_size)
        for line in [*info, *warnings]:
            _log(env, line)
        self.cfg, self.env = cfg, env
        self.out = Path(cfg.train.output_dir)
        self.manifest = load_manifest(cfg.data.root)  # before anything is written: a bad root leaves nothing
        # train.eval_every (None when off): its validation images, feature network and reference are read now,
        # so a missing file stops the run here too. It never draws from the global RNG.
        self.evaluator = PeriodicEval.create(cfg, env, self.manifest)
        _prepare_output_dir(self.out, env)

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
        self._seed_rank_stream(step=0)
        self.diffusion = base_diffusion(cfg)
        self.gate = StepGate()
        self.engine = build_engine(cfg, model, self.gate)
        self.call = model_fn(self.engine)
        # ZeRO-0 without bf16 leaves the gradients in .grad: one fused check after backward; otherwise
        # DeepSpeed moves them into its own buffers during backward, so each is checked as it is produced.
        in_grad = self.engine.zero_optimization_stage() == 0 and not self.engine.bfloat16_enabled()
        self.guard = NonFiniteGuard(self.engine.module, env.device, hooks=not in_grad)
        self.ema = EMA(self.engine.module, cfg.train.ema_rates)
        self.sampler = create_timestep_sampler(
            name=cfg.diffusion.timestep_sampler,
            num_timesteps=cfg.diffusion.steps,
            history_per_term=cfg.diffusion.history_per_term,
            uniform_prob=cfg.diffusion.uniform_prob,
            device=env.device,
        )
        self.stream = build_train_stream(cfg.data, self.manifest, rank=env.rank, world_size=env.world_size)
        self.window = LossWindow(self.diffusion.num_timesteps, env.device)
        self.state = TrainState()
        self.ckpt = CheckpointManager(
            self.out / "checkpoints",
            cfg.train.keep_last,
            env,
            engine=self.engine,
            shared={"trainer": self.state, "timestep_sampler": self.sampler},
            # The RNG goes last: nothing may draw from it between its restore and the next step.
            per_rank={
                "ema": self.ema,
                "data": self.stream,
                "metrics_window": self.window,
                "rng": RNGState(lambda: self._seed_rank_stream(self.state.step)),
            },
        )
        self.inflight: _InFlight | None = None  # the launched step whose verdict is not read yet
        self._stop_flag = torch.zeros((), dtype=torch.float32, device=env.device)
        self.tracker: Tracker = Tracker()
        self._info_lock = threading.Lock()

    def _seed_rank_stream(self, step: int) -> None:
        # Each rank needs its own stream (noise, timesteps, dropout): identical streams would make the
        # ranks' batches share their noise. ``step`` > 0 only when ranks are new after an elastic resume.
        torch.manual_seed((self.cfg.train.seed * 1_000_003 + self.env.rank + 1) * 7919 + step)

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
            self.ckpt.load(tag_dir)
        except CheckpointError as err:
            failure = str(err)
        except (KeyError, ValueError, RuntimeError, AssertionError) as err:
            failure = f"{tag_dir}: cannot restore this run from it ({type(err).__name__}: {err})"
        # A file missing on one rank must stop every rank, not leave the others waiting in a collective.
        if distributed.any_rank(failure is not None, env.device):
            raise CheckpointError(failure or f"{tag_dir}: another rank could not load this checkpoint")
        saved_world = self.ckpt.saved_world_size(tag_dir)
        where = f" (saved by {saved_world} ranks, now {env.world_size})" if saved_world != env.world_size else ""
        _log(env, f"resumed from {tag_dir} at step {self.state.step}{where}")
        if self.stream.restart_reason:
            _log(env, self.stream.restart_reason)
        # The run id learned most recently wins: run_info.json is written the moment the id is known,
        # which can be after the checkpoint was saved (tracking server down at start).
        return run_id or self.state.mlflow_run_id

    def _on_run_id(self, run_id: str) -> None:
        """Called by the tracker, from whichever thread learns the id: persist it at once."""
        self.state.mlflow_run_id = run_id
        self._record_run_info(mlflow_run_id=run_id)

    def start_tracking(self, run_id: str | None) -> None:
        cfg, env = self.cfg, self.env
        fresh = run_id is None
        self.tracker = create_tracker(cfg.tracking, env.is_main, run_id, cfg.tracking.run_name, self._on_run_id)
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
        """Keep ``run_info.json`` (read by ``--resume auto`` and cluster/) up to date. A known run id is
        never replaced by None, so a tracking outage cannot fork the MLflow run on restart."""
        if not self.env.is_main:
            return
        with self._info_lock:
            info = _read_run_info(self.out)
            new = dict(info, tracking_uri=resolve_uri(self.cfg.tracking.uri), **extra)
            if self.state.mlflow_run_id:
                new["mlflow_run_id"] = self.state.mlflow_run_id
            if new != info:
                _write_run_info(self.out, new)

    # -------------------------------------------------------------- persistence
    def _weights_finite_everywhere(self) -> bool:
        tensors = [getattr(p, "ds_tensor", p) for p in self.engine.module.parameters()]
        tensors += [s for shadows in self.ema.shadows.values() for s in shadows]
        local = all(bool(torch.isfinite(t.detach()).all()) for t in tensors)
        return not distributed.any_rank(not local, self.env.device)

    def save(self) -> Path | None:
        """A checkpoint of the current step (collective). Never one with non-finite weights."""
        self.sampler.collect()  # the exchange in flight becomes part of the state (collective)
        if not self._weights_finite_everywhere():
            _log(self.env, f"warning: step {self.state.step}: weights not finite, checkpoint NOT written")
            return None
        digest = _param_digest(self.engine.module)
        digests = [None] * self.env.world_size
        if torch.distributed.is_initialized() and self.env.world_size > 1:
            torch.distributed.all_gather_object(digests, digest)
            if len(set(digests)) > 1:
                print(
                    f"warning: rank {self.env.rank}: model replicas differ across ranks at step {self.state.step}",
                    file=sys.stderr,
                    flush=True,
                )
        tag_dir = self.ckpt.save(self.state.step, before_complete=lambda d: self.export(d / EXPORT_NAME))
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
                "mlflow_run_id": self.tracker.run_id or self.state.mlflow_run_id,
                "tracking_uri": resolve_uri(self.cfg.tracking.uri),
            }
            export_weights(path, self.cfg.model_dump(mode="json"), self.state.step, model_state, ema, meta)
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
            # Building the sampling model and sampling draw from the global RNG: fork it so the training
            # stream is untouched and a run with grids continues exactly like one without.
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
            path = samples_dir / f"step_{self.state.step:08d}.png"
            path.write_bytes(png)
            self.tracker.log_artifact_file(path, "samples")
            self.tracker.log_metrics({"sample/seconds_per_image": dt / len(arr)}, step=self.state.step)
            print(f"sample grid ({cfg.sample.method}, steps={cfg.sample.steps or 'all'}): {path}", flush=True)
        distributed.barrier()

    def log_importance(self) -> None:
        if self.env.is_main:
            self.tracker.log_artifact_bytes(
                plot_timestep_importance(self.sampler, self.state.step),
                f"timesteps/importance_step_{self.state.step:08d}.png",
            )

    # -------------------------------------------------------------- one optimizer step
    def train_step(self) -> StepOutcome | None:
        """Micro-batches → losses → backward → agreed (device-side) optimizer step → EMA → history exchange.

        Nothing here makes the host wait for the device. The verdict on a step (a non-finite loss or
        gradient on any rank: skip it whole on every rank; a stop signal on any rank: stop every rank at
        the same step) is one MAX all-reduce left on the device: the fused AdamW skips on it, the EMA is
        scaled by it, and its copy to the host is read during the *next* step, once that step's work is
        queued (:meth:`settle`), or at once when the loop needs it (a log, checkpoint or stop step).
        Returns the outcome of the previous step if this call settled it, else None."""
        accum, env = self.cfg.train.grad_accum, self.env
        self.guard.reset()
        self.window.begin_step()
        for _ in range(accum):
            x, y = next(self.stream)
            x = x.to(env.device, non_blocking=True)
            kwargs: dict[str, torch.Tensor] = {}
            if self.num_classes:
                # Label dropout trains the null class (unconditional and guided sampling); the mask is
                # drawn on the device from the global RNG, which the checkpoint saves (exact resume).
                y = y.to(env.device, non_blocking=True)
                kwargs["y"] = drop_labels(y, self.cfg.model.label_dropout, self.num_classes)
            t, weights = self.sampler.sample(x.shape[0])
            terms = self.diffusion.training_losses(self.call, x, t, model_kwargs=kwargs)
            loss = (terms["loss"] * weights).mean()
            self.guard.check_loss(loss)
            self.engine.backward(loss)
            # The history tracks an unweighted per-sample term (diffusion.history_term): "vb", the L_vlb
            # term the paper's importance sampling targets, or "loss", the per-sample loss being optimised.
            self.sampler.record(t, terms[self.cfg.diffusion.history_term].detach())
            self.window.add(loss, terms, t, weights)
        self.guard.check_grads()  # (a no-op where hooks checked each gradient during backward)
        # fill_ passes the flag as a kernel argument: torch.tensor(flag, device=cuda) would be a blocking copy.
        self._stop_flag.fill_(float(preemption.requested()))
        verdict = distributed.all_max(torch.stack([self.guard.flag, self._stop_flag]))
        # The previous step's verdict, read now that this step's work is queued: the host waits for the
        # previous step only. It must be read before this optimizer step (an LR rewind goes first).
        earlier = self.settle() if self.inflight is not None else None
        # Fold the history exchanged after the previous step (t of the next step is drawn from it).
        self.sampler.finish_sync()
        found_inf = (verdict[0] > 0).float()
        self.gate.found_inf = found_inf
        skipped_before = getattr(self.engine, "skipped_steps", 0)
        self.engine.step()
        self.gate.found_inf = None
        # DeepSpeed's own overflow check (bf16, ZeRO) may skip a step too, decided on the host.
        ds_skipped = getattr(self.engine, "skipped_steps", 0) != skipped_before
        if not ds_skipped:
            self.ema.update(keep=1.0 - found_inf)
        self.state.samples_seen += x.shape[0] * accum * env.world_size
        self.sampler.start_sync()  # this step's pairs travel during the next step
        self.inflight = _InFlight(distributed.HostCopy(verdict), ds_skipped)
        return earlier

    def settle(self) -> StepOutcome:
        """Read the verdict on the step in flight and finish it: its metrics are counted or dropped, its
        timestep pairs kept or dropped, and the LR step that followed a device-skipped step undone."""
        pending, self.inflight = self.inflight, None
        assert pending is not None, "settle() without a step in flight"
        nonfinite, stop = (v > 0 for v in pending.verdict.get().tolist())
        bad = nonfinite or pending.ds_skipped
        self.window.settle(keep=not bad)
        if bad:
            self.sampler.reject_inflight()
            if not pending.ds_skipped:  # DeepSpeed did not step the scheduler when it skipped itself
                self.engine.lr_scheduler.rewind()
        return StepOutcome(kept=not bad, stop=stop)

    # -------------------------------------------------------------- the loop
    def fit(self) -> int:
        cfg, env, st = self.cfg, self.env, self.state
        total, accum = cfg.train.total_steps, cfg.train.grad_accum
        _log(
            env,
            f"training {self.n_params / 1e6:.2f}M params ({self.flops / 1e9:.3f} GFLOP/img) on {env.world_size} "
            f"x {env.device.type}, steps {st.step}->{total}, global batch "
            f"{cfg.data.batch_size * accum * env.world_size}",
        )
        self.t_window = time.perf_counter()
        self.t_start, self.step_start = self.t_window, st.step
        saved_at = st.step if st.step else -1

        while st.step + (self.inflight is not None) < total:
            saved_at, stop = self.advance(saved_at)
            if stop:
                _log(env, f"stop signal received at step {st.step}: saving and exiting for requeue")
                if saved_at != st.step:
                    self.save()
                return preemption.EXIT_PREEMPTED

        if saved_at != st.step:
            self.save()
        if cfg.diffusion.timestep_sampler != "uniform":
            self.log_importance()
        if self.env.is_main and st.curves:
            from trainer.images import curves_png

            self.tracker.log_artifact_bytes(curves_png(dict(st.curves)), "plots/loss_curves.png")
        self.sample_grid()
        return 0

    def advance(self, saved_at: int) -> tuple[int, bool]:
        """One pass of the loop: launch a step; settle it at once only when its number is a log,
        checkpoint, plot, grid or eval step, or the run must stop (then run those). Returns the step last
        saved and whether every rank must stop now (no step is then in flight)."""
        stop = False
        earlier = self.train_step()
        if earlier is not None:
            stop = self._account(earlier)
        # Every earlier step is settled: if kept, the step just launched is number st.step + 1.
        if stop or self._due(self.state.step + 1):
            outcome = self.settle()
            stop = self._account(outcome) or stop
            if outcome.kept:
                saved_at = self._after_step(saved_at)
        return saved_at, stop

    def _account(self, outcome: StepOutcome) -> bool:
        """Count a settled step; raises :class:`NonFiniteError` after train.max_bad_steps bad steps in a row.
        Returns the stop verdict."""
        cfg, env, st = self.cfg, self.env, self.state
        if outcome.kept:
            st.bad_streak = 0
            st.step += 1
            return outcome.stop
        st.skipped_steps += 1
        st.bad_streak += 1
        _log(
            env,
            f"warning: non-finite loss or gradient at step {st.step + 1}: step skipped on every rank "
            f"({st.bad_streak} in a row, {st.skipped_steps} in total; limit train.max_bad_steps="
            f"{cfg.train.max_bad_steps})",
        )
        if st.bad_streak >= cfg.train.max_bad_steps:
            latest = self.ckpt.latest()
            raise NonFiniteError(
                f"{st.bad_streak} consecutive optimizer steps had a non-finite loss or gradient "
                f"(from step {st.step + 1}); stopped. Newest finite checkpoint: "
                f"{latest if latest else 'none'}. Lower train.lr or check the data."
            )
        return outcome.stop

    def _cadences(self, step: int) -> dict[str, bool]:
        """What :meth:`_after_step` does at ``step``: the one place the cadences are decided."""
        tr, last = self.cfg.train, step == self.cfg.train.total_steps
        plot_every = tr.importance_plot_every or tr.ckpt_every
        return {
            "log": step % tr.log_every == 0 or last,
            "save": step % tr.ckpt_every == 0 or last,
            "plot": step % plot_every == 0 and self.cfg.diffusion.timestep_sampler != "uniform",
            "grid": bool(tr.sample_every) and step % tr.sample_every == 0 and not last,  # the end samples anyway
            "eval": self.evaluator is not None and (step % tr.eval_every == 0 or last),
        }

    def _due(self, step: int) -> bool:
        """Whether :meth:`_after_step` does anything at ``step`` (so the step must be settled first)."""
        return any(self._cadences(step).values())

    def _after_step(self, saved_at: int) -> int:
        """Logging, checkpoint, plots and grids at their cadences. Returns the step last saved."""
        st = self.state
        due = self._cadences(st.step)
        if due["log"]:
            self._log_metrics()
        if due["save"] and self.save() is not None:
            saved_at = st.step
        if due["plot"]:
            self.log_importance()
        if due["grid"]:
            self.sample_grid()
        if due["eval"]:
            assert self.evaluator is not None
            t_eval = time.perf_counter()
            self.evaluator.run(st.step, self.ema, self.tracker)  # collective; after the save (it can be slow)
            self.t_window += time.perf_counter() - t_eval  # train/steps_per_s measures training alone
        return saved_at

    def _log_metrics(self) -> None:
        cfg, env, st = self.cfg, self.env, self.state
        total, accum = cfg.train.total_steps, cfg.train.grad_accum
        now = time.perf_counter()
        steps_done = self.window.micro_batches / accum
        data = self.stream.stats()
        # Data counters are summed over ranks (each rank reads its own shards).
        metrics = self.window.reduce(
            extra={
                "data/skipped": float(data.get("skipped", 0)),
                "data/shard_errors": float(data.get("shard_errors", 0)),
                "data/wait_s": float(data.get("wait_s", 0.0)) / env.world_size,
                "data/samples_per_s": float(data.get("samples_per_s", 0.0)),
            }
        )
        rate = steps_done / max(now - self.t_window, 1e-9)
        metrics.update(
            {
                "lr": self.engine.get_lr()[0],
                "steps_per_s": rate,
                "samples_per_s": rate * cfg.data.batch_size * accum * env.world_size,
                "skipped_steps": float(st.skipped_steps),
                **sampler_summary_metrics(self.sampler),
            }
        )
        grad_norm = self.engine.get_global_grad_norm()
        if grad_norm is not None:  # not every ZeRO stage / precision reports it
            metrics["grad_norm"] = float(grad_norm)
        eta = (total - st.step) * (now - self.t_start) / max(1, st.step - self.step_start)
        _log(
            env,
            f"step {st.step}/{total} | loss {metrics['loss']:.4f} mse {metrics['mse']:.4f} vb {metrics['vb']:.4f}"
            f" | {rate:.2f} steps/s {metrics['samples_per_s']:.0f} samples/s | ETA {_fmt_time(eta)}",
        )
        self.tracker.log_metrics({f"train/{k}": v for k, v in metrics.items()}, step=st.step)
        for k in ("loss", "mse", "vb"):
            st.curves[k].append((st.step, metrics[k]))
        self.t_window = time.perf_counter()


def run(cfg: Config, resume: str | None) -> int:
    """Train with an initialised distributed environment. Returns the process exit status."""
    if cfg.tracking.enabled:
        validate_uri(resolve_uri(cfg.tracking.uri))  # a bad URI stops here, before anything is written
    env = distributed.init_distributed(cfg.train.collective_timeout_min)
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
    except NonFiniteError as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        return EXIT_NONFINITE
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
