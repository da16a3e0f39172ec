"""The tracker against a real ``mlflow server`` (REST store, artifacts proxied through the server).

One server (one port, one sqlite file) serves the whole module: it starts ~25-35 s after launch, so the
tests share it and run in file order: down at start first, then normal use, then a crash and restart.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from trainer.config import TrackingConfig
from trainer.distributed import free_port
from trainer.tracking import EXPERIMENT_KIND, EXPERIMENT_KIND_TAG, MlflowTracker

pytestmark = pytest.mark.slow

_READY_TIMEOUT_S = 150.0


class MlflowServer:
    """``mlflow server`` as a child process group on a fixed port and database, so it can be killed and
    restarted in place."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.port = free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.artifacts = root / "artifacts"
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    def launch(self) -> None:
        """Start the server without waiting for it."""
        self.starts += 1
        log = open(self.root / f"server-{self.starts}.log", "wb")  # noqa: SIM115 - the child keeps it open
        env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
        argv = [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(self.port)]
        argv += ["--workers", "1", "--backend-store-uri", f"sqlite:///{self.root / 'mlflow.db'}"]
        argv += ["--serve-artifacts", "--artifacts-destination", str(self.artifacts)]
        # Its own session, so the whole tree (uvicorn and its workers) is killed by group id.
        self.proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        log.close()

    def healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.uri}/health", timeout=1) as resp:
                return resp.status == 200
        except OSError:
            return False

    def wait_ready(self) -> float:
        t0 = time.monotonic()
        while not self.healthy():
            assert self.proc is not None
            if self.proc.poll() is not None:
                log = (self.root / f"server-{self.starts}.log").read_text(errors="replace")
                pytest.fail(f"mlflow server exited with {self.proc.returncode}:\n{log[-3000:]}")
            if time.monotonic() - t0 > _READY_TIMEOUT_S:
                pytest.fail(f"mlflow server not ready after {_READY_TIMEOUT_S:.0f} s")
            time.sleep(0.5)
        return time.monotonic() - t0

    def ensure_up(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            self.launch()
        self.wait_ready()

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):  # already gone
            os.killpg(self.proc.pid, sig)
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=20)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MlflowServer]:
    srv = MlflowServer(tmp_path_factory.mktemp("mlflow-server"))
    try:
        yield srv
    finally:
        srv.kill(signal.SIGTERM)


def _cfg(server: MlflowServer, experiment: str) -> TrackingConfig:
    # Short HTTP limits: an attempt against a dead server fails fast and the worker retries soon.
    return TrackingConfig(uri=server.uri, experiment=experiment, request_timeout_s=5, request_max_retries=0)


def _steps(client: MlflowClient, run_id: str, key: str = "train/loss") -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


def test_server_down_at_start_creates_the_run_late_and_a_resume_attaches_to_it(server: MlflowServer) -> None:
    assert server.proc is None and not server.healthy()
    cfg = _cfg(server, "late")
    announced: list[tuple[str, str]] = []
    got = threading.Event()

    def on_run_id(run_id: str) -> None:
        announced.append((run_id, threading.current_thread().name))
        got.set()

    tr = MlflowTracker(cfg, run_id=None, run_name="late", retry_s=1.0, on_run_id=on_run_id)
    assert tr.run_id is None
    tr.log_params({"train.lr": 1e-4})
    for step in range(1, 6):
        tr.log_metrics({"train/loss": float(step)}, step=step)
    server.launch()
    print(f"\nserver ready after {server.wait_ready():.1f} s")
    assert got.wait(60), "the run was not created after the server came up"
    run_id = tr.run_id
    assert run_id and announced == [(run_id, "mlflow-tracker")]
    for step in range(6, 11):
        tr.log_metrics({"train/loss": float(step)}, step=step)
    tr.close(status="KILLED", timeout_s=60)  # a preempted job

    # The restarted job passes the id it was told; steps 8..10 are re-run from its checkpoint at step 7.
    resumed: list[str] = []
    again = MlflowTracker(cfg, run_id=run_id, run_name=None, retry_s=1.0, on_run_id=resumed.append)
    assert resumed == [run_id]
    for step in range(8, 16):
        again.log_metrics({"train/loss": 100.0 + step}, step=step)
    again.close(timeout_s=60)

    client = MlflowClient(tracking_uri=server.uri)
    expected = [(s, float(s)) for s in range(1, 11)] + [(s, 100.0 + s) for s in range(11, 16)]
    assert _steps(client, run_id) == expected
    run = client.get_run(run_id)
    assert run.data.params == {"train.lr": "0.0001"} and run.info.status == "FINISHED"
    assert len(client.search_runs([run.info.experiment_id])) == 1  # no fork


def test_run_metrics_params_tags_and_artifacts_arrive(server: MlflowServer) -> None:
    server.ensure_up()
    cfg = _cfg(server, "plain")
    tr = MlflowTracker(cfg, run_id=None, run_name="plain", system_metrics_interval_s=1.0)
    tr.log_params({"model.channels": 64, "train.lr": 2e-4})
    tr.set_tags({"world_size": "1"})
    for step in (10, 20, 30):
        tr.log_metrics({"train/loss": 1.0 / step, "train/grad_norm": float(step)}, step=step)
    payload = b"\x89PNG not really"
    tr.log_artifact_bytes(payload, "samples/grid.png")
    time.sleep(2.5)  # two system-metric samples
    tr.close(timeout_s=60)

    client = MlflowClient(tracking_uri=server.uri)
    run = client.get_run(tr.run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == "plain"
    assert run.data.params == {"model.channels": "64", "train.lr": "0.0002"}
    assert run.data.tags["world_size"] == "1"
    assert _steps(client, tr.run_id, "train/grad_norm") == [(10, 10.0), (20, 20.0), (30, 30.0)]
    assert "system/cpu_utilization_percentage" in run.data.metrics
    assert client.get_experiment(run.info.experiment_id).tags[EXPERIMENT_KIND_TAG] == EXPERIMENT_KIND
    # Uploaded through the server into its artifact destination, not written by this process.
    assert run.info.artifact_uri.startswith("mlflow-artifacts:")
    assert [a.path for a in client.list_artifacts(tr.run_id, "samples")] == ["samples/grid.png"]
    stored = list(server.artifacts.rglob("grid.png"))
    assert len(stored) == 1 and stored[0].read_bytes() == payload


def test_server_crash_mid_run_neither_slows_logging_nor_loses_points(server: MlflowServer) -> None:
    server.ensure_up()
    cfg = _cfg(server, "outage")
    tr = MlflowTracker(cfg, run_id=None, run_name="outage", retry_s=1.0, system_metrics_interval_s=None)
    step_s = 0.02  # the "training step"
    step = 0

    def train(until: threading.Event | None = None, steps: int = 0) -> float:
        """Run steps (``steps`` of them, or until ``until`` is set); return steps per second."""
        nonlocal step
        t0, n = time.perf_counter(), 0
        while (until is not None and not until.is_set()) or (until is None and n < steps):
            time.sleep(step_s)
            tr.log_metrics({"train/loss": float(step)}, step=step)
            step, n = step + 1, n + 1
        return n / (time.perf_counter() - t0)

    before = train(steps=150)
    server.kill()  # a crash: SIGKILL to the whole server
    back = threading.Event()

    def restart() -> None:
        server.launch()  # same port, same database
        server.wait_ready()
        back.set()

    restarter = threading.Thread(target=restart, daemon=True)
    restarter.start()
    t_down = time.perf_counter()
    during = train(until=back)
    outage_s = time.perf_counter() - t_down
    restarter.join()
    train(steps=50)
    total = step
    ratio = during / before
    print(f"\nsteps/s before {before:.1f}, during a {outage_s:.0f} s outage {during:.1f} (ratio {ratio:.2f})")
    assert ratio >= 0.8, f"logging slowed the loop during the outage: {during:.1f} vs {before:.1f} steps/s"

    client = MlflowClient(tracking_uri=server.uri)
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        try:
            if len(client.get_metric_history(tr.run_id, "train/loss")) >= total:
                break
        except MlflowException:  # the fresh server can be slow to answer its first requests
            pass
        time.sleep(1)
    tr.close(timeout_s=30)
    assert _steps(client, tr.run_id) == [(s, float(s)) for s in range(total)]  # every point, once
    assert client.get_run(tr.run_id).info.status == "FINISHED"
