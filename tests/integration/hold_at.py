"""Test harness (not part of the product): runs ``trainer/main.py`` and holds every rank at a known step.

    HOLD_AT=24 torchrun ... tests/integration/hold_at.py --config ... <trainer args>

After the work of step HOLD_AT (which must be due for something, a log step say, so the loop settles it at
once) every rank waits for its tracked points to be delivered and its background checkpoint to be complete,
meets the others at a barrier, and rank 0
prints ``held at step N``. Then each rank waits until the scheduler's stop signal reaches it (the run then
stops at the next step, as under SLURM) or it is killed. A test acts on that line: it never races the clock.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import trainer.main as trainer_main  # noqa: E402
from trainer import distributed, preemption  # noqa: E402

HOLD_AT = int(os.environ.get("HOLD_AT", "0"))


def hold(loop: trainer_main.Trainer, step: int) -> None:
    if step != HOLD_AT:
        return
    loop.identity.tracker.flush(timeout_s=120)
    loop.saver.settle()  # a checkpoint still being written in the background is complete before the test acts
    distributed.barrier()  # every rank is here: nothing more is trained before the test acts
    if loop.env.is_main:
        print(f"held at step {step}", flush=True)
    while not preemption.requested():  # waits for an event (the signal's flag), not for a time
        time.sleep(0.01)


if __name__ == "__main__":
    sys.argv[0] = "trainer/main.py"
    sys.exit(trainer_main.main(sys.argv[1:], after_step=hold))
