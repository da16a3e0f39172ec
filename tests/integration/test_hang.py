"""A hung rank is named, its stacks are dumped, and the run fails fast (trainer/watchdog.py).

2 gloo ranks, real shards, a real sqlite MLflow store; rank 1 is made to stop inside step 6 by the
``hang`` fault of tests/integration/fault_at.py (in a function named ``_hang_in_step``), and rank 0 then waits
for it in the step's collective, as it would for a stuck loader or a dead mount.
"""

from __future__ import annotations

import re
import time
from pathlib import Path

import pytest

from tests.chaos import launch_ranks
from tests.conftest import TINY_MODEL
from trainer.watchdog import EXIT_HUNG

pytestmark = pytest.mark.slow

HANG_TIMEOUT_MIN = 0.1
STEP = 6


def _main_stack(dump: str) -> list[str]:
    """The main thread's frames in a faulthandler dump, innermost first (its block ends in ``<module>``)."""
    (block,) = [b for b in dump.split("\n\n") if "in <module>" in b]
    return [ln.strip() for ln in block.splitlines() if ln.strip().startswith("File ")]


def test_hung_rank_is_named_dumped_and_fails_the_run(digits_shards: Path, tmp_path: Path) -> None:
    out, uri = tmp_path / "run", f"sqlite:///{tmp_path / 'mlflow.db'}"
    args = [
        *TINY_MODEL,
        f"data.root={digits_shards}",
        "data.batch_size=8",
        "train.zero_stage=0",
        "train.precision=fp32",
        "train.total_steps=40",
        "train.log_every=1",
        "train.ckpt_every=100",
        f"train.hang_timeout_min={HANG_TIMEOUT_MIN}",
        "train.collective_timeout_min=5",  # without the watchdog the run would end only here, undiagnosed
        f"train.output_dir={out}",
        f"tracking.uri={uri}",
        "tracking.experiment=hang",
    ]
    t0 = time.monotonic()
    launch = launch_ranks(2, args, tmp_path / "logs", 1, {"FAULTS": f"hang:{STEP}:1"})
    wall = time.monotonic() - t0
    logs = [(tmp_path / "logs" / f"launch_01_rank_{r}.log").read_text() for r in range(2)]
    assert launch.faults == [f"hang:{STEP}:1"], logs[1][-3000:]
    assert launch.codes == [EXIT_HUNG, EXIT_HUNG], "\n".join(log[-3000:] for log in logs)

    # One line, naming rank 1 (not rank 0, which waited in the collective) and the step it did not finish.
    lines = [ln for ln in logs[0].splitlines() if ln.startswith("error: rank(s)")]
    assert len(lines) == 1 and "Traceback" not in logs[0], logs[0][-3000:]
    m = re.fullmatch(r"error: rank\(s\) 1 made no progress for (\d+) s at step (\d+); stacks in (\S+)/", lines[0])
    assert m is not None, lines[0]
    stalled_s, step, where = int(m.group(1)), int(m.group(2)), Path(m.group(3))
    assert step == STEP
    assert stalled_s >= HANG_TIMEOUT_MIN * 60
    # Start-up (~20-60 s here) plus the timeout plus a margin: far below the 5 min collective timeout.
    assert wall < 150, wall

    # Both ranks' stacks; rank 1's show where it is stuck, rank 0's the collective it waits in.
    assert where.parent == out / "hangs"
    assert sorted(p.name for p in where.iterdir()) == ["rank_0.txt", "rank_1.txt"]
    dump1, dump0 = (where / "rank_1.txt").read_text(), (where / "rank_0.txt").read_text()
    assert "main thread waiting in torch.distributed: no" in dump1, dump1
    assert _main_stack(dump1)[0].endswith(" in _hang_in_step"), dump1  # the sleeping frame, innermost
    assert "main thread waiting in torch.distributed: yes" in dump0, dump0
    assert "/torch/distributed/" in _main_stack(dump0)[0], dump0

    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    (run,) = client.search_runs([client.get_experiment_by_name("hang").experiment_id])
    assert run.info.status == "FAILED"
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id, f"hangs/{where.name}")}
    assert artifacts == {f"hangs/{where.name}/rank_0.txt", f"hangs/{where.name}/rank_1.txt"}
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "train/loss")]
    assert max(steps) == STEP - 1  # every finished step was delivered before the exit
