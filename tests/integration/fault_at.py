"""Test harness (not part of the product): runs ``trainer/main.py`` and injects faults at known steps.

    FAULTS=hang:7:1,kill9:12:0 python tests/integration/fault_at.py --config ... <trainer args>

``FAULTS`` lists ``kind:step:rank`` items (the hang test and the chaos run, ``tests/chaos.py``). Each fires
the first time this process reaches its step, and says so on stdout first (``chaos: fault <kind> at step
<step> rank <rank>``), so the supervisor knows which faults struck. Every fault acts at a step boundary or
inside a known call, never after a sleep:

- ``hang``: the rank stops inside step ``step`` (before its forward pass) until it is killed; the other
  ranks wait for it in the step's collective. Only the hang watchdog ends the run.
- ``kill9``: the rank sends itself SIGKILL after step ``step`` (between checkpoints).
- ``kill9-save``: the rank sends itself SIGKILL while the checkpoint of step ``step`` is being written
  (in the checkpoint writer, background or not: DeepSpeed's files are written, this rank's own state
  file is not).
- ``stop``: every rank gets SIGTERM after step ``step``, the scheduler's stop signal (trainer/preemption.py).
- ``enospc``: after step ``step - 1`` rank 0 fills the output directory's file system (a file named
  :data:`FILLER` in it), so the checkpoint of step ``step`` finds no space; it removes the filler after step
  ``step`` once that checkpoint's files have been tried (a background save writes after the step), if the run
  is still alive (the supervisor removes it otherwise).
- ``mlflow``: after step ``step`` rank 0 prints ``chaos: mlflow down? <step>`` and waits for the supervisor's
  file ``<FAULT_ACK>.<step>.down`` (it killed the tracking server); after step ``step + 3`` it prints ``chaos:
  mlflow up? <step>``, waits for ``<FAULT_ACK>.<step>.up`` (server restarted), then waits until the points of
  the outage are delivered.

Every step of rank 0 is announced (``chaos: step N``) so the supervisor can count re-trained steps.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch.distributed as dist  # noqa: E402

import trainer.ckpt_writer as ckpt_writer  # noqa: E402
import trainer.main as trainer_main  # noqa: E402
from trainer.step import TrainStep  # noqa: E402

FILLER = ".chaos_filler"
KINDS = ("hang", "kill9", "kill9-save", "stop", "enospc", "mlflow")


@dataclass
class Fault:
    kind: str
    step: int
    rank: int
    fired: bool = False


def parse_faults(text: str) -> list[Fault]:
    out = []
    for item in filter(None, text.split(",")):
        kind, step, rank = item.split(":")
        if kind not in KINDS:
            raise SystemExit(f"error: FAULTS: unknown kind {kind!r} (known: {', '.join(KINDS)})")
        out.append(Fault(kind, int(step), int(rank)))
    return out


FAULTS = parse_faults(os.environ.get("FAULTS", ""))
ACK = os.environ.get("FAULT_ACK", "")
_state: dict[str, Any] = {"filler": None}


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _due(kind: str, step: int, rank: int | None = None) -> Fault | None:
    for f in FAULTS:
        if f.kind == kind and f.step == step and not f.fired and (rank is None or f.rank == rank):
            f.fired = True
            return f
    return None


def _announce(f: Fault) -> None:
    print(f"chaos: fault {f.kind} at step {f.step} rank {f.rank}", flush=True)


def _wait_for(path: Path) -> None:
    while not path.exists():  # the supervisor's answer: an event, not a time
        time.sleep(0.05)


# ---------------------------------------------------------------- inside a step
_run = TrainStep.run


def _hang_in_step(self: TrainStep, batch: Any) -> Any:
    step = batch[0].batch + 1  # the global batch number is the step's, counted from 0 (no skipped steps here)
    f = _due("hang", step, _rank())
    if f is not None:
        _announce(f)
        while True:  # stuck until killed (the watchdog ends the process)
            time.sleep(1.0)
    return _run(self, batch)


TrainStep.run = _hang_in_step  # type: ignore[method-assign]

# ---------------------------------------------------------------- inside a checkpoint write
_job_run = ckpt_writer.SaveJob._run


def _write_or_die(job: ckpt_writer.SaveJob, item: tuple[str, Path | None, Any]) -> None:
    # The checkpoint writer (the background thread with train.async_checkpoint) writes DeepSpeed's files
    # first and this rank's own state file last: dying before the latter leaves a partial checkpoint.
    kind, path, _ = item
    if kind == "save" and path is not None and path.name.startswith("rank_"):
        f = _due("kill9-save", job.step, _rank())
        if f is not None:
            _announce(f)
            os.kill(os.getpid(), signal.SIGKILL)
    _job_run(job, item)


ckpt_writer.SaveJob._run = _write_or_die  # type: ignore[method-assign]


# ---------------------------------------------------------------- at step boundaries
def _fill(out: Path) -> Path:
    filler = out / FILLER
    with filler.open("wb") as fh:
        block = b"\0" * (1 << 16)
        try:
            while True:
                fh.write(block)
                fh.flush()
        except OSError:
            pass
    return filler


def _writing(loop: trainer_main.Trainer, step: int) -> bool:
    """Whether the checkpoint of ``step`` is still being written in the background (the disk must stay full
    until its files have been tried, or the fault would miss a background save)."""
    job = loop.parts.ckpt.writer.job
    return job is not None and job.step == step and not job.written.is_set()


def after_step(loop: trainer_main.Trainer, step: int) -> None:
    rank, out = _rank(), Path(loop.cfg.train.output_dir)
    if rank == 0:
        print(f"chaos: step {step}", flush=True)
    if _state["filler"] is not None and step >= _state["filler"][1] and not _writing(loop, _state["filler"][1]):
        _state["filler"][0].unlink(missing_ok=True)
        _state["filler"] = None
    if rank == 0 and (f := _due("enospc", step + 1)) is not None:
        _announce(f)
        _state["filler"] = (_fill(out), step + 1)
    if (f := _due("kill9", step, rank)) is not None:
        _announce(f)
        os.kill(os.getpid(), signal.SIGKILL)
    if (f := _due("stop", step)) is not None:
        if rank == 0:
            _announce(f)
        os.kill(os.getpid(), signal.SIGTERM)  # every rank, as SLURM signals every task
    if rank == 0 and (f := _due("mlflow", step)) is not None:
        _announce(f)
        print(f"chaos: mlflow down? {step}", flush=True)
        with loop.watchdog.paused():  # waiting for the supervisor is no hang
            _wait_for(Path(f"{ACK}.{step}.down"))
        FAULTS.append(Fault("mlflow-up", step + 3, 0))
    if rank == 0 and (f := _due("mlflow-up", step)) is not None:
        print(f"chaos: mlflow up? {step}", flush=True)
        with loop.watchdog.paused():
            _wait_for(Path(f"{ACK}.{step}.up"))
            delivered = loop.identity.tracker.flush(timeout_s=300)
        print(f"chaos: mlflow outage points delivered: {delivered}", flush=True)


if __name__ == "__main__":
    sys.argv[0] = "trainer/main.py"
    sys.exit(trainer_main.main(sys.argv[1:], after_step=after_step))
