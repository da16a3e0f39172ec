"""The one factory of a training run: every part the :class:`trainer.main.Trainer` composes, built in order.

:class:`Builders` says how the replaceable parts are made (the model, the engine, the data stream, the
tracker, the stop signal). Tests and benchmarks pass their own, e.g.
``dataclasses.replace(Builders(), engine=my_engine)``, and get the real loop: no module global is
patched and no one copies this prologue.

Order matters where the global RNG is involved: the weights are drawn right after
``torch.manual_seed(train.seed)`` (identical on every rank), then each rank's own stream is seeded for
its model-dropout masks; nothing else draws from the global RNG here (a sample's timestep, noise, flip and
label dropout come from its own generator, :mod:`trainer.per_sample`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from trainer import preemption
from trainer.cadence import Cadence
from trainer.checkpoint import CheckpointManager
from trainer.config import Config, ConfigError
from trainer.console import say
from trainer.data import DatasetInfo, TrainStream, build_train_stream, load_manifest
from trainer.diffusion import diffusion_from_config
from trainer.elastic import EngineCheckpoint
from trainer.ema import EMA
from trainer.engine import StepGate, build_engine
from trainer.evaluation.periodic import PeriodicEval
from trainer.identity import RunIdentity, prepare_output_dir
from trainer.metrics import LossWindow, TrainingLog
from trainer.models.unet import build_model, count_parameters, estimate_flops_per_image
from trainer.per_sample import SampleRandomness
from trainer.phema import PowerEMA, SnapshotWriter, disk_cost_line, snapshot_interval
from trainer.phema.snapshots import SNAPSHOT_DIR
from trainer.pictures import Pictures
from trainer.runtime import Runtime
from trainer.saving import Saver
from trainer.state import RNGState, TrainState
from trainer.step import TrainStep
from trainer.timesteps import sampler_from_config
from trainer.tracking import create_tracker


def default_model(cfg: Config, info: DatasetInfo, num_classes: int | None) -> torch.nn.Module:
    return build_model(cfg, info.image_size, info.channels, num_classes)


def load_initial_weights(cfg: Config, model: torch.nn.Module, info: DatasetInfo) -> None:
    """``train.init_from``: the export's EMA weights (at its ``sample.ema_rate``) into ``model``, before the engine
    wraps it (so every ZeRO stage partitions them, and the EMA, built from the engine's module, starts from them).
    A file or network that does not fit is a ConfigError naming the key, on one line."""
    from trainer.checkpoint import CheckpointError
    from trainer.config import config_from_dict
    from trainer.evaluation.inference import weights_mismatch
    from trainer.export import load_export

    try:
        state = load_export(str(cfg.train.init_from))
        saved_cfg = config_from_dict(state["config"], source=state["path"])
    except (CheckpointError, ConfigError) as err:
        raise ConfigError(f"train.init_from: {err}") from None
    meta = state["meta"]
    if (meta.get("image_size"), meta.get("channels")) != (info.image_size, info.channels):
        raise ConfigError(
            f"train.init_from: {state['path']} holds a model of {meta.get('image_size')}px x {meta.get('channels')} "
            f"channels, the data are {info.image_size}px x {info.channels}"
        )
    rate = str(saved_cfg.sample_ema_rate)
    if state["ema"] and rate not in state["ema"]:
        raise ConfigError(
            f"train.init_from: {state['path']} has no EMA at its sample.ema_rate {rate} (it has "
            f"{', '.join(sorted(state['ema']))})"
        )
    weights = state["ema"].get(rate, state["model"])  # an export without any EMA: its weights
    problem = weights_mismatch(cfg, model.state_dict(), weights)
    if problem:
        raise ConfigError(f"train.init_from: {state['path']}: {problem}")
    model.load_state_dict(weights)


def default_stream(cfg: Config, rt: Runtime, info: DatasetInfo) -> TrainStream:
    return build_train_stream(
        rt.loader.apply(cfg.data),
        info,
        rank=rt.env.rank,
        world_size=rt.env.world_size,
        global_batch=rt.batch.global_batch,
        accum=rt.batch.grad_accum,
    )


@dataclass(frozen=True)
class Builders:
    model: Callable[[Config, DatasetInfo, int | None], torch.nn.Module] = default_model
    engine: Callable[[Config, Runtime, torch.nn.Module, StepGate], Any] = build_engine
    stream: Callable[[Config, Runtime, DatasetInfo], TrainStream] = default_stream
    tracker: Callable[..., Any] = create_tracker
    stop_requested: Callable[[], bool] = preemption.requested


def seed_rank_stream(seed: int, rank: int, step: int) -> None:
    # The global RNG now serves only the model's dropout masks (every per-sample draw has its own generator,
    # trainer/per_sample.py); each rank gets its own stream. ``step`` > 0 only for ranks new after an elastic
    # resume.
    torch.manual_seed((seed * 1_000_003 + rank + 1) * 7919 + step)


@dataclass
class Run:
    """The parts of one training run, built by :func:`build_run`."""

    manifest: DatasetInfo
    num_classes: int | None
    n_params: int
    flops: float
    engine: Any
    ema: EMA
    sampler: Any
    stream: TrainStream
    window: LossWindow
    step: TrainStep
    state: TrainState
    ckpt: CheckpointManager
    identity: RunIdentity
    saver: Saver
    pictures: Pictures
    log: TrainingLog
    evaluator: PeriodicEval | None
    cadence: Cadence
    phema: PowerEMA | None = None
    snapshots: SnapshotWriter | None = None


def build_run(cfg: Config, rt: Runtime, builders: Builders) -> Run:
    env = rt.env
    manifest = load_manifest(cfg.data.root)  # before anything is written: a bad root leaves nothing
    # train.eval_every (None when off): its validation images, feature network and reference are read now,
    # so a missing file stops the run here too. It never draws from the global RNG.
    evaluator = PeriodicEval.create(cfg, env, manifest)
    out = Path(cfg.train.output_dir)
    prepare_output_dir(out, env)
    num_classes = manifest.num_classes if cfg.model.class_cond else None
    torch.manual_seed(cfg.train.seed)  # identical initial weights on every rank
    try:
        model = builders.model(cfg, manifest, num_classes)
    except ValueError as err:  # an architecture impossible for these images: a config problem
        raise ConfigError(f"{err} (images are {manifest.image_size}px)") from None
    if cfg.train.init_from:
        load_initial_weights(cfg, model, manifest)
        say(env.is_main, f"train.init_from: model and EMA start from {cfg.train.init_from}")
    n_params = count_parameters(model)
    flops = estimate_flops_per_image(model, manifest.image_size, manifest.channels, num_classes)
    seed_rank_stream(cfg.train.seed, env.rank, step=0)
    diffusion = diffusion_from_config(cfg.diffusion)
    gate = StepGate()
    engine = builders.engine(cfg, rt, model, gate)
    if getattr(engine, "is_compiled", False):
        say(env.is_main, "train.compile: the UNet is compiled (torch.compile through DeepSpeed's engine.compile)")
    ema = EMA(engine.module, cfg.train.ema_rates)
    ph = cfg.train.phema
    phema = PowerEMA(engine.module, ph.sigma_rels, env.device) if ph.enabled else None
    snap_every = snapshot_interval(ph.every_steps, ph.every_images, rt.batch.global_batch) if ph.enabled else 0
    sampler = sampler_from_config(cfg.diffusion, env.device)
    stream = builders.stream(cfg, rt, manifest)
    window = LossWindow(diffusion.num_timesteps, env.device)
    step = TrainStep(
        engine,
        gate,
        diffusion,
        sampler,
        ema,
        window,
        env.device,
        history_term=cfg.diffusion.history_term,
        randomness=SampleRandomness(cfg.train.seed, env.device),
        random_flip=cfg.data.random_flip,
        label_dropout=cfg.model.label_dropout,
        num_classes=num_classes,
        stop_requested=builders.stop_requested,
        phema=phema,
    )
    state = TrainState()
    ckpt = CheckpointManager(
        out / "checkpoints",
        cfg.train.keep_last,
        env,
        engine=EngineCheckpoint(engine, env.world_size, env.is_main),
        shared={"trainer": state, "timestep_sampler": sampler},
        # The RNG goes last: nothing may draw from it between its restore and the next step.
        per_rank={
            "ema": ema,
            **({"phema": phema} if phema is not None else {}),
            "data": stream,
            "metrics_window": window,
            "rng": RNGState(lambda: seed_rank_stream(cfg.train.seed, env.rank, state.step)),
        },
    )
    identity = RunIdentity(out, cfg.tracking, state, env, builders.tracker)
    snapshots = None
    if phema is not None:
        snapshots = SnapshotWriter(out / SNAPSHOT_DIR, phema, env, ph.keep)
        total, batch = cfg.train.total_steps, rt.batch.global_batch
        say(env.is_main, disk_cost_line(n_params, ph.sigma_rels, snap_every, total, ph.keep, out / SNAPSHOT_DIR, batch))
    meta = {"image_size": manifest.image_size, "channels": manifest.channels, "num_classes": num_classes}
    return Run(
        manifest=manifest,
        num_classes=num_classes,
        n_params=n_params,
        flops=flops,
        engine=engine,
        ema=ema,
        sampler=sampler,
        stream=stream,
        window=window,
        step=step,
        state=state,
        ckpt=ckpt,
        identity=identity,
        saver=Saver(cfg, ckpt, engine, ema, step, state, identity, meta),
        pictures=Pictures(cfg, env, out, engine, ema, sampler, manifest.image_size, manifest.channels, num_classes),
        log=TrainingLog(
            window, stream, sampler, engine, state, rt.batch.global_batch, cfg.train.total_steps, env.is_main
        ),
        evaluator=evaluator,
        cadence=Cadence(cfg, evaluates=evaluator is not None, snapshot_every=snap_every),
        phema=phema,
        snapshots=snapshots,
    )
