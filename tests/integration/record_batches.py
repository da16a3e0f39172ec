"""Test harness (not part of the product): runs ``trainer/main.py`` and records every micro-batch each rank
trains on: its global batch number, the samples' places in the batch, keys and epochs.

    RECORD_DIR=/tmp/x [HOLD_AT=N] torchrun ... tests/integration/record_batches.py --config ... <trainer args>

Each rank appends one JSON line per micro-batch to ``RECORD_DIR/rank<R>.jsonl`` as the loop takes it from the
stream (batches a loader prefetched but the run never trained are not recorded). With HOLD_AT the run is
also held there as tests/integration/hold_at.py does.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import trainer.main as trainer_main  # noqa: E402
from tests.integration.hold_at import hold  # noqa: E402
from trainer.builders import Builders, default_stream  # noqa: E402


class Recording:
    """The stream, with every micro-batch written down as it is taken."""

    def __init__(self, stream: object, path: Path) -> None:
        self.stream, self.path = stream, path

    def __getattr__(self, name: str) -> object:
        return getattr(self.stream, name)

    def __iter__(self) -> Recording:
        return self

    def __next__(self) -> object:
        micro = next(self.stream)
        line = {"batch": micro.batch, "index": micro.index.tolist(), "keys": micro.keys, "epoch": micro.epoch}
        with self.path.open("a") as f:
            f.write(json.dumps(line) + "\n")
        return micro


def recording_stream(cfg, rt, info):  # noqa: ANN001, ANN201
    out = Path(os.environ["RECORD_DIR"])
    out.mkdir(parents=True, exist_ok=True)
    return Recording(default_stream(cfg, rt, info), out / f"rank{rt.env.rank}.jsonl")


if __name__ == "__main__":
    sys.argv[0] = "trainer/main.py"
    hooks: dict[str, object] = {"builders": dataclasses.replace(Builders(), stream=recording_stream)}
    if "HOLD_AT" in os.environ:
        hooks["after_step"] = hold
    sys.exit(trainer_main.main(sys.argv[1:], **hooks))
