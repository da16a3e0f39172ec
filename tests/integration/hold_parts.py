"""Test harness (not part of the product): runs ``trainer/sample.py`` or ``trainer/evaluate.py`` and holds the
process once it has written HOLD_AFTER parts, until it is killed.

    HOLD_AFTER=1 python tests/integration/hold_parts.py sample|evaluate <the tool's arguments>

It prints ``held after N part(s)`` when the N-th part file is in place; a test kills it then, so the kill
lands after exactly N parts on any machine.
"""

from __future__ import annotations

import os
import sys
import threading
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from trainer.evaluation.parts import PartStore  # noqa: E402

HOLD_AFTER = int(os.environ["HOLD_AFTER"])
_written = [0]
_write = PartStore.write


def _held_write(self: PartStore, index: int, **arrays: object) -> Path:
    path = _write(self, index, **arrays)
    _written[0] += 1
    if _written[0] == HOLD_AFTER:
        print(f"held after {HOLD_AFTER} part(s)", flush=True)
        threading.Event().wait()  # until killed
    return path


PartStore.write = _held_write  # type: ignore[method-assign]

if __name__ == "__main__":
    tool, argv = sys.argv[1], sys.argv[2:]
    if tool == "sample":
        from trainer.evaluation.sampling import main
    else:
        from trainer.evaluate import main
    sys.exit(main(argv))
