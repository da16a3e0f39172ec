"""``submit.py --local``: the same callable through submitit's local executor (no SLURM needed)."""

from __future__ import annotations

import pickle
import socket
from pathlib import Path

import pytest

from tests.integration.slurm_helpers import TINY, Launch, job_id_from, logged_steps, mlflow_single_run

pytestmark = pytest.mark.slow


def test_local_executor_runs_the_same_path(digits_shards: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    folder = tmp_path / "local" / "%j"
    launch = Launch(
        [
            "--config", "configs/quickstart.yaml", "--local", "--tasks-per-node", "2", "--cpus-per-task", "1",
            "--folder", str(folder), *TINY, f"data.root={digits_shards}", "train.total_steps=3",
            f"train.output_dir={out}", f"tracking.uri={uri}", "tracking.experiment=local",
        ]
    )  # fmt: skip
    code = launch.wait(timeout=300)
    log = launch.text
    assert code == 0, log[-4000:]
    job_id = job_id_from(log)
    assert f"[submit] job {job_id} ended: COMPLETED (restarts: 0)" in log
    assert logged_steps(log) == [1, 2, 3]

    job_folder = Path(str(folder).replace("%j", job_id))
    reports = []
    for rank in (0, 1):
        with (job_folder / f"{job_id}_{rank}_result.pkl").open("rb") as f:
            outcome, report = pickle.load(f)  # submitit's result file for this task
        assert outcome == "success", report
        reports.append(report)
    assert [(r.rank, r.local_rank, r.world_size) for r in reports] == [(0, 0, 2), (1, 1, 2)]
    assert {r.master_addr for r in reports} == {socket.gethostname()}
    assert reports[0].master_port == reports[1].master_port
    _, run = mlflow_single_run(uri, "local")
    assert run.info.status == "FINISHED" and run.data.params["world_size"] == "2"


def test_local_executor_samples_on_two_tasks(digits_shards: Path, tmp_path: Path) -> None:
    """``--entry sample``: the distributed sampler as the job's tasks, merged by rank 0."""
    import json
    import sys

    import numpy as np

    from tests.conftest import run_cmd

    run = tmp_path / "run"
    train = [sys.executable, "trainer/main.py", "--config", "configs/quickstart.yaml", *TINY]
    proc = run_cmd([*train, f"data.root={digits_shards}", f"train.output_dir={run}", "train.total_steps=2",
                    "tracking.enabled=false"])  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    samples = tmp_path / "samples"
    entry_args = f"{run} --num-samples 6 --batch-size 2 --method ddim --steps 3 --out {samples} --no-mlflow"
    launch = Launch(
        [
            "--config", "configs/quickstart.yaml", "--local", "--tasks-per-node", "2", "--cpus-per-task", "1",
            "--folder", str(tmp_path / "local" / "%j"), "--entry", "sample", "--entry-args", entry_args,
        ]
    )  # fmt: skip
    code = launch.wait(timeout=300)
    assert code == 0, launch.text[-4000:]
    assert np.load(samples / "samples.npz")["arr_0"].shape == (6, 16, 16, 1)
    summary = json.loads((samples / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["made_now"] == 6
