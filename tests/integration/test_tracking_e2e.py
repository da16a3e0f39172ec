"""Tracking identity through the trainer: a store that is down when training starts must not fork the run.

The first run starts while the MLflow store cannot be opened (a regular file sits where the sqlite
file's directory must be). The store comes back mid-run; the tracker attaches late, from its own
thread, and the run id reaches ``run_info.json`` at that moment, although the checkpoint saved
earlier holds none. ``--resume auto`` then continues that same MLflow run: one run, one point per step.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import REPO, TINY_MODEL, child_env, run_cmd

pytestmark = pytest.mark.slow


def test_store_down_at_start_then_resume_continues_the_same_run(digits_shards: Path, tmp_path: Path) -> None:
    from mlflow.tracking import MlflowClient

    store = tmp_path / "store"
    store.write_text("not a directory yet")
    uri = f"sqlite:///{store / 'mlflow.db'}"
    out = tmp_path / "run"
    args = [
        *TINY_MODEL,
        "data.batch_size=8",
        f"data.root={digits_shards}",
        f"train.output_dir={out}",
        f"tracking.uri={uri}",
        "tracking.experiment=outage",
        "train.zero_stage=0",
        "train.precision=fp32",
        "train.log_every=1",
        "train.ckpt_every=5",
    ]
    cmd = [sys.executable, "trainer/main.py", "--config", "configs/quickstart.yaml", *args]
    proc = subprocess.Popen(
        [*cmd, "train.total_steps=30"],
        cwd=REPO,
        env=child_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    seen: list[str] = []
    assert proc.stdout is not None
    for line in proc.stdout:
        seen.append(line)
        if line.startswith("checkpoint saved:"):
            break
    # The first checkpoint was written while no run id was known; now the store comes back.
    store.unlink()
    store.mkdir()
    rest, _ = proc.communicate(timeout=300)
    log = "".join(seen) + rest
    assert proc.returncode == 0, log[-4000:]
    assert "unavailable" in log or "not reachable" in log, log[-4000:]  # the outage was reported

    info = json.loads((out / "run_info.json").read_text())
    run_id = info["mlflow_run_id"]
    assert run_id
    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name("outage")
    assert exp.tags.get("mlflow.experimentKind") == "custom_model_development"
    assert [r.info.run_id for r in client.search_runs([exp.experiment_id])] == [run_id]
    assert [m.step for m in client.get_metric_history(run_id, "train/loss")] == list(range(1, 31))

    t0 = time.monotonic()
    proc2 = run_cmd([*cmd, "train.total_steps=34", "--resume", "auto"], timeout=300)
    assert proc2.returncode == 0, (proc2.stdout + proc2.stderr)[-4000:]
    assert time.monotonic() - t0 < 240
    assert [r.info.run_id for r in client.search_runs([exp.experiment_id])] == [run_id]  # no fork
    steps = [m.step for m in client.get_metric_history(run_id, "train/loss")]
    assert steps == list(range(1, 35))
    assert client.get_run(run_id).info.status == "FINISHED"
