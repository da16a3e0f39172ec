"""cluster/submit.py against a real SLURM 22.05 (four slurmd "nodes" on this machine, with accounting).

Timings measured here (submit → first step, requeue round trip) are printed; run with ``-s`` to see them.
"""

from __future__ import annotations

import json
import re
import sys
import time
from pathlib import Path

import pytest
import submitit

from cluster import monitor
from tests.conftest import run_cmd
from tests.integration.slurm_helpers import (
    SUBMIT,
    TINY,
    Launch,
    job_id_from,
    logged_steps,
    mlflow_single_run,
    read,
    wait_until,
)
from tests.slurm_harness import LocalCluster

pytestmark = [pytest.mark.slurm, pytest.mark.slow]


def _common(tmp_path: Path, shards: Path, experiment: str) -> tuple[list[str], Path, str]:
    out = tmp_path / "run"
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    args = [
        "--config", "configs/quickstart.yaml", "--cpus-per-task", "1", "--time", "10",
        "--folder", str(tmp_path / "slurm" / "%j"),
        *TINY, f"data.root={shards}", f"train.output_dir={out}", f"tracking.uri={uri}",
        f"tracking.experiment={experiment}",
    ]  # fmt: skip
    return args, out, uri


def test_four_nodes_train_to_completion(slurm_cluster: LocalCluster, digits_shards: Path, tmp_path: Path) -> None:
    args, out, uri = _common(tmp_path, digits_shards, "slurm4")
    args += ["--nodes", "4", "--tasks-per-node", "1", "--job-name", "four-nodes", "train.total_steps=6"]

    dry = run_cmd([*SUBMIT, *args, "--dry-run"], timeout=120)
    assert dry.returncode == 0, dry.stderr
    dry_script = dry.stdout.split("# ---- sbatch script (not submitted) ----\n", 1)[1].split("\n# ---- each of")[0]

    launch = Launch([*args, "--follow"])
    code = launch.wait(timeout=300)
    log = launch.text
    assert code == 0, log[-4000:]
    job_id = job_id_from(log)
    assert f"[submit] job {job_id} ended: COMPLETED (restarts: 0)" in log
    assert logged_steps(log) == [1, 2, 3, 4, 5, 6]

    job = submitit.SlurmJob(folder=tmp_path / "slurm" / "%j", job_id=job_id, tasks=range(4))
    assert job.paths.submission_file.read_text() == dry_script, "--dry-run must print the submitted script"
    assert monitor.slurm_states([job_id]) == {job_id: "COMPLETED"}

    reports = sorted(job.results(), key=lambda r: r.rank)
    assert [r.rank for r in reports] == [0, 1, 2, 3]
    assert {r.world_size for r in reports} == {4}
    assert sorted(r.node for r in reports) == [0, 1, 2, 3], "one task per node"
    assert {r.local_rank for r in reports} == {0}
    assert {r.master_addr for r in reports} == {"node1"}, "master = first node of the allocation"
    assert len({r.master_port for r in reports}) == 1
    assert {(r.exit_code, r.preempted, r.restarts) for r in reports} == {(0, False, 0)}

    info = json.loads((out / "run_info.json").read_text())
    client, run = mlflow_single_run(uri, "slurm4")
    assert run.info.run_id == info["mlflow_run_id"] and run.info.status == "FINISHED"
    assert run.data.params["world_size"] == "4"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "train/loss")] == [1, 2, 3, 4, 5, 6]

    t_submitted = launch.first_time(r"^submitted job ")
    t_first_step = launch.first_time(r"^step 1/6 ")
    print(
        f"\n[timing] 4 nodes: submit.py start → submitted {t_submitted:.1f} s, "
        f"submitted → first training step {t_first_step - t_submitted:.1f} s, "
        f"total {launch.lines[-1][0]:.1f} s"
    )


def test_requeue_resumes_from_checkpoint_with_exact_steps(
    slurm_cluster: LocalCluster, digits_shards: Path, tmp_path: Path
) -> None:
    total = 24
    args, out, uri = _common(tmp_path, digits_shards, "requeue")
    args += [
        "--nodes", "2", "--tasks-per-node", "1", "--job-name", "requeue",
        f"train.total_steps={total}", "train.ckpt_every=1000",  # only the stop and the final checkpoints
    ]  # fmt: skip
    proc = run_cmd([*SUBMIT, *args], timeout=120)
    assert proc.returncode == 0, proc.stderr
    job_id = job_id_from(proc.stdout)
    job = submitit.SlurmJob(folder=tmp_path / "slurm" / "%j", job_id=job_id, tasks=range(2))
    log = job.paths.stdout  # rank 0

    wait_until(lambda: any(s >= 3 for s in logged_steps(read(log))), 240, "step 3 in rank 0's log")
    t_signal = time.monotonic()
    job._interrupt(timeout=True)  # SIGUSR2 to every task, as SLURM does before the time limit

    stop = wait_until(lambda: "stop signal received" in read(log), 60, "the trainer to stop")
    resumed = wait_until(lambda: "resumed from" in read(log), 240, "the requeued job to resume")
    wait_until(lambda: any(s > 0 for s in _steps_after_resume(read(log))), 120, "a step after the resume")
    t_first_step_again = time.monotonic() - t_signal
    wait_until(lambda: monitor.slurm_states([job_id]).get(job_id) in monitor.FINAL_STATES, 240, "the job to end")
    assert monitor.slurm_states([job_id])[job_id] == "COMPLETED", read(job.paths.stderr)[-3000:]

    text = read(log)
    stopped_at = int(re.search(r"stop signal received at step (\d+)", text)[1])
    resumed_at = int(re.search(r"resumed from \S+ at step (\d+)", text)[1])
    assert 3 <= stopped_at < total
    assert resumed_at == stopped_at, "resumes from the checkpoint written at the stop"
    # The log is appended across attempts: every step trained exactly once, none lost or repeated.
    assert logged_steps(text) == list(range(1, total + 1))
    assert (out / "checkpoints" / f"step_{total:08d}").is_dir()

    reports = sorted(job.results(), key=lambda r: r.rank)
    assert [(r.rank, r.restarts, r.resume, r.exit_code) for r in reports] == [
        (0, 1, "auto", 0),
        (1, 1, "auto", 0),
    ]
    info = json.loads((out / "run_info.json").read_text())
    assert info["restarts"] == 1
    client, run = mlflow_single_run(uri, "requeue")  # one run, continued
    assert run.info.run_id == info["mlflow_run_id"] and run.info.status == "FINISHED"
    assert run.data.tags["restarts"] == "1"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "train/loss")] == list(range(1, total + 1))

    print(
        f"\n[timing] requeue: signal → trainer stopped {stop:.1f} s, → resumed (checkpoint loaded) "
        f"{stop + resumed:.1f} s, → first step after resume {t_first_step_again:.1f} s"
    )


def _steps_after_resume(text: str) -> list[int]:
    _, _, after = text.partition("resumed from")
    return logged_steps(after)


def test_status_lists_the_jobs(slurm_cluster: LocalCluster, tmp_path: Path) -> None:
    """A held job (``--slurm-arg hold``) is listed as PENDING, then CANCELLED."""
    folder = tmp_path / "slurm" / "%j"
    proc = run_cmd(
        [*SUBMIT, "--config", "configs/quickstart.yaml", "--skip-data-check", "--folder", str(folder),
         "--slurm-arg", "hold", "--time", "5", "--cpus-per-task", "1", "--job-name", "waits"],
        timeout=120,
    )  # fmt: skip
    if proc.returncode != 0:
        pytest.fail(proc.stderr)
    job_id = job_id_from(proc.stdout)
    listed = run_cmd([sys.executable, "-m", "cluster.status", "--folder", str(folder), "--json"], timeout=60)
    rows = [json.loads(line) for line in listed.stdout.splitlines()]
    assert [(r["job_id"], r["name"], r["executor"], r["state"]) for r in rows] == [
        (job_id, "waits", "slurm", "PENDING")
    ]
    submitit.SlurmJob(folder=folder, job_id=job_id).cancel()
    wait_until(lambda: monitor.slurm_states([job_id]).get(job_id) == "CANCELLED", 60, "the cancel")
    listed = run_cmd([sys.executable, "-m", "cluster.status", "--folder", str(folder)], timeout=60)
    assert listed.stdout.splitlines()[1].split()[:4] == [job_id, "waits", "slurm", "CANCELLED"]


def test_impossible_request_is_refused_at_submission(slurm_cluster: LocalCluster, tmp_path: Path) -> None:
    """EnforcePartLimits: 5 nodes on a 4-node partition fail at sbatch, in one line, with nothing queued."""
    proc = run_cmd(
        [*SUBMIT, "--config", "configs/quickstart.yaml", "--skip-data-check", "--nodes", "5",
         "--folder", str(tmp_path / "slurm" / "%j")],
        timeout=120,
    )  # fmt: skip
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and "sbatch refused the job" in proc.stderr, proc.stderr
    proc = run_cmd(
        [
            *SUBMIT,
            "--config",
            "configs/quickstart.yaml",
            "--skip-data-check",
            "--partition",
            "gpu",
            "--dry-run",
        ],
        timeout=120,
    )
    assert proc.returncode == 2 and "unknown partition 'gpu' (available: debug)" in proc.stderr
