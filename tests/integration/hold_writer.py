"""Test harness (not part of the product): runs ``trainer/main.py`` and holds the background checkpoint writer.

    HOLD_SAVE=16 torchrun ... tests/integration/hold_writer.py --config ... <trainer args>

The writer of the checkpoint at step HOLD_SAVE stops on every rank right before it writes the rank's own
``trainer/rank_<r>.pt`` (DeepSpeed's files of that rank are on disk by then), prints ``writer held at step N
on rank R`` and waits forever; training goes on until it needs that save settled. A test kills the job on
those lines: a kill -9 in the middle of a background save, at a known point, without racing the clock.
"""

from __future__ import annotations

import os
import sys
import threading
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import trainer.main as trainer_main  # noqa: E402
from trainer.ckpt_writer import SaveJob  # noqa: E402

HOLD_SAVE = int(os.environ.get("HOLD_SAVE", "0"))


def _hold(job: SaveJob, kind: str, path: Path | None) -> None:
    if job.step == HOLD_SAVE and path is not None and path.name == f"rank_{job.rank}.pt":
        print(f"writer held at step {job.step} on rank {job.rank}", flush=True)
        threading.Event().wait()


def install(loop: trainer_main.Trainer, step: int) -> None:
    """Called after every step that was due for something; the hook is in place before the held save."""
    writer = loop.parts.ckpt.writer
    if writer.hook is not None:
        return
    if step >= HOLD_SAVE:
        raise RuntimeError(f"HOLD_SAVE={HOLD_SAVE}: the first due step ({step}) comes too late to hold it")
    writer.hook = _hold


if __name__ == "__main__":
    sys.argv[0] = "trainer/main.py"
    sys.exit(trainer_main.main(sys.argv[1:], after_step=install))
