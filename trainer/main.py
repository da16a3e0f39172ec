"""Training entry point, the same for every launcher.

    deepspeed --num_gpus 2 trainer/main.py --config configs/quickstart.yaml [key=value ...]
    torchrun --nproc_per_node 2 trainer/main.py --config configs/quickstart.yaml
    python trainer/main.py --config configs/quickstart.yaml          # one process
    python cluster/submit.py --config ... --nodes 4                  # SLURM, calls main() per task

:meth:`Trainer.fit` reads top to bottom: take this step's micro-batches, run the step
(:mod:`trainer.step`), account for the step that settled, and do what is due at that step
(:mod:`trainer.cadence`): log, checkpoint, plots, grids, evaluation; stop cleanly on preemption. The parts
are built by :mod:`trainer.builders`.
"""

from __future__ import annotations

import trainer  # noqa: F401  (first: a script run drops trainer/ from sys.path, see trainer/__init__.py)

# isort: split
import argparse
import sys
import time
from collections.abc import Callable

from data_prep.manifest import ManifestError
from trainer import distributed, preemption, runtime
from trainer.builders import Builders, build_run
from trainer.cadence import Due
from trainer.checkpoint import CheckpointError
from trainer.config import Config, ConfigError, dump_config, load_config
from trainer.console import say
from trainer.data import DataError
from trainer.saving import EXIT_STORAGE, StorageError
from trainer.step import Outcome
from trainer.tracking import resolve_uri, validate_uri
from trainer.watchdog import Watchdog

USER_ERRORS = (ConfigError, CheckpointError, ManifestError, DataError, distributed.LauncherError)
"""Problems with what the user gave us: reported as one line, exit status 2."""
EXIT_NONFINITE = 3


class NonFiniteError(RuntimeError):
    """Too many consecutive non-finite steps: the run stops (exit status EXIT_NONFINITE)."""


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


class Trainer:
    """Composes the parts of one run (:func:`trainer.builders.build_run`); :meth:`fit` is the loop.

    ``after_step(trainer, step)`` (tests) is called after the work of every step that was due for any."""

    def __init__(
        self,
        cfg: Config,
        env: distributed.DistEnv,
        builders: Builders | None = None,
        after_step: Callable[[Trainer, int], None] | None = None,
    ) -> None:
        self.cfg, self.env, self.after_step = cfg, env, after_step
        self.rt = runtime.resolve(cfg, env)  # precision, batch split, loader: decided once, here
        for line in self.rt.lines():
            say(env.is_main, line)
        self.parts = parts = build_run(cfg, self.rt, builders or Builders())
        self.state, self.stream, self.step, self.cadence = parts.state, parts.stream, parts.step, parts.cadence
        self.saver, self.identity, self.pictures, self.log = parts.saver, parts.identity, parts.pictures, parts.log
        self.stopping = False
        self.watchdog = Watchdog(
            cfg.train.hang_timeout_min * 60, env.rank, env.world_size, parts.identity.out / "hangs"
        )

    def resume(self, resume: str | None) -> None:
        """Continue the checkpoint ``--resume`` names (if any) and its MLflow run, or start both afresh."""
        run_id = self.identity.known_run_id() if resume != "none" else None
        if self.saver.resume(resume) is not None and self.stream.restart_reason:
            say(self.env.is_main, self.stream.restart_reason)
        # The id learned most recently wins: run_info.json is written the moment MLflow gives it, which can
        # be after the checkpoint was saved (tracking server down at start).
        params = {
            **self.cfg.to_flat_dict(),
            **self.rt.facts(),
            "model.parameters": self.parts.n_params,
            "model.gflops_per_image": round(self.parts.flops / 1e9, 4),
            "data.train_samples": self.parts.manifest.num_train,
        }
        self.identity.start(run_id or self.state.mlflow_run_id, params, dump_config(self.cfg))
        say(
            self.env.is_main,
            f"training {self.parts.n_params / 1e6:.2f}M params ({self.parts.flops / 1e9:.3f} GFLOP/img) on "
            f"{self.env.world_size} x {self.env.device.type}, steps {self.state.step}->{self.cfg.train.total_steps}, "
            f"global batch {self.rt.batch.global_batch}",
        )
        self.saver.check_space(self.parts.n_params)
        self.log.start()  # throughput and ETA count from here

    def fit(self, until: int | None = None) -> int:
        """Train to ``train.total_steps``. Returns 0, or EXIT_PREEMPTED after a stop signal (checkpoint written).
        ``until`` (benchmarks, tests) returns once step ``until`` is launched, to be continued by another call."""
        st, total, accum = self.state, self.cfg.train.total_steps, self.rt.batch.grad_accum
        until = total if until is None else min(until, total)
        while st.step + int(self.step.in_flight) < until:
            batch = [next(self.stream) for _ in range(accum)]  # this rank's micro-batches of the step
            earlier = self.step.run(batch)  # launches it; the step before it settles inside
            if earlier is not None:
                self._account(earlier)
            # The step just launched is number st.step + 1 if kept: settle it now if that step is due for
            # anything (or the run stops); otherwise its verdict is read during the next step.
            if self.stopping or self.cadence.at(st.step + 1):
                outcome = self.step.settle()
                self._account(outcome)
                if outcome.kept:
                    self._do_due(self.cadence.at(st.step))
            if self.stopping:
                say(self.env.is_main, f"stop signal received at step {st.step}: saving and exiting for requeue")
                with self.watchdog.paused():
                    if self.saver.last_saved != st.step:
                        self.saver.save(final=True)
                    self.saver.settle(final=True)  # the checkpoint is complete before the process exits
                return preemption.EXIT_PREEMPTED
            self.watchdog.beat(st.step + int(self.step.in_flight))  # this rank finished the step it launched
        if st.step == total:
            with self.watchdog.paused():
                self._end_of_run()
        return 0

    def _account(self, outcome: Outcome) -> None:
        """Count a settled step. Raises NonFiniteError after train.max_bad_steps bad steps in a row."""
        st, limit = self.state, self.cfg.train.max_bad_steps
        st.samples_seen += self.rt.batch.global_batch
        self.stopping = self.stopping or outcome.stop
        if outcome.kept:
            st.bad_streak = 0
            st.step += 1
            return
        st.skipped_steps += 1
        st.bad_streak += 1
        say(
            self.env.is_main,
            f"warning: non-finite loss or gradient at step {st.step + 1}: step skipped on every rank "
            f"({st.bad_streak} in a row, {st.skipped_steps} in total; limit train.max_bad_steps={limit})",
        )
        if st.bad_streak >= limit:
            self.saver.settle()  # every rank is here (the verdict is agreed): the save in flight completes first
            latest = self.parts.ckpt.latest()
            raise NonFiniteError(
                f"{st.bad_streak} consecutive optimizer steps had a non-finite loss or gradient (from step "
                f"{st.step + 1}); stopped. Newest finite checkpoint: {latest or 'none'}. Lower train.lr or check "
                "the data."
            )

    def _do_due(self, due: Due) -> None:
        """What the cadence asks for after the kept step ``state.step``, in this order."""
        step, tracker = self.state.step, self.identity.tracker
        if due.log:
            self.log.write(tracker)
        # Saves (a synchronous one, or waiting for the previous background write), snapshots, sampling and
        # evaluation can take far longer than a step: the hang watchdog does not judge them.
        with self.watchdog.paused():
            if due.save:
                self.saver.save(final=due.end)
            if due.snapshot and self.parts.snapshots is not None:
                self.parts.snapshots.write(step, self.state.samples_seen)
            if due.plot:
                self.pictures.importance(step, tracker)
            if due.grid:
                self.pictures.grid(step, tracker)
            if due.eval and self.parts.evaluator is not None:
                t0 = time.perf_counter()
                self.parts.evaluator.run(step, self.parts.ema, tracker)  # collective; after the save (it can be slow)
                self.log.exclude(time.perf_counter() - t0)  # train/steps_per_s measures training alone
        if self.after_step is not None:
            self.after_step(self, step)

    def _end_of_run(self) -> None:
        tracker = self.identity.tracker
        if self.saver.last_saved != self.state.step:
            self.saver.save(final=True)
        if self.cadence.importance:
            self.pictures.importance(self.state.step, tracker)
        self.pictures.curves(self.state.curves, tracker)
        self.pictures.grid(self.state.step, tracker)
        self.saver.settle(final=True)  # the last checkpoint was written while the pictures were drawn


def run(
    cfg: Config,
    resume: str | None,
    builders: Builders | None = None,
    after_step: Callable[[Trainer, int], None] | None = None,
) -> int:
    """Train with the launcher's distributed environment. Returns the process exit status."""
    if cfg.tracking.enabled:
        validate_uri(resolve_uri(cfg.tracking.uri))  # a bad URI stops here, before anything is written
    env = distributed.init_distributed(cfg.train.collective_timeout_min)
    preemption.install()
    loop: Trainer | None = None
    status = "FAILED"
    try:
        loop = Trainer(cfg, env, builders, after_step)
        loop.resume(resume)
        loop.watchdog.start(distributed.store(), on_hang=loop.identity.report_hang)
        code = loop.fit()
        status = "FINISHED" if code == 0 else "KILLED"
        return code
    except NonFiniteError as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        return EXIT_NONFINITE
    except StorageError as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        return EXIT_STORAGE
    finally:
        if loop is not None:
            loop.watchdog.stop()  # before waiting on a save: a long background write is not a hang
            loop.saver.close()  # a save still in flight finishes (or is left incomplete, never half-complete)
            loop.identity.tracker.close(status=status)
        distributed.shutdown()


def main(argv: list[str] | None = None, **hooks: object) -> int:
    """``hooks``: :func:`run`'s ``builders`` / ``after_step``, for test harnesses."""
    args = parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        return run(cfg, args.resume, **hooks)  # type: ignore[arg-type]
    except USER_ERRORS as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        return 2


def cli() -> None:
    sys.exit(main())


if __name__ == "__main__":
    cli()
