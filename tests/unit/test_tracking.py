"""MLflow tracking against a real local store: resume, no duplicated steps, outages never fatal."""

from __future__ import annotations

import socket
import threading
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from trainer.config import ConfigError, TrackingConfig
from trainer.tracking import (
    EXPERIMENT_KIND,
    EXPERIMENT_KIND_TAG,
    MlflowTracker,
    Tracker,
    create_tracker,
    resolve_uri,
    validate_uri,
)


def _cfg(tmp_path: Path, **kw: object) -> TrackingConfig:
    return TrackingConfig(uri=f"sqlite:///{tmp_path / 'mlflow.db'}", experiment="t", **kw)


def test_logs_params_metrics_artifacts_and_resumes_without_duplicates(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path)
    tr = MlflowTracker(cfg, run_id=None, run_name="r")
    tr.log_params({"train.lr": 1e-4, "model.channel_mult": [1, 2]})
    for step in (10, 20, 30):
        tr.log_metrics({"train/loss": 1.0 / step}, step=step)
    tr.log_artifact_bytes(b"\x89PNG fake", "samples/grid.png")
    tr.close(status="KILLED")
    client = MlflowClient(tracking_uri=cfg.uri)
    run = client.get_run(tr.run_id)
    assert run.data.params == {"train.lr": "0.0001", "model.channel_mult": "[1, 2]"}
    assert run.info.status == "KILLED"
    assert [a.path for a in client.list_artifacts(tr.run_id, "samples")] == ["samples/grid.png"]

    # A restart from a checkpoint at step 20 re-runs steps 21..30: those must not be logged twice.
    again = MlflowTracker(cfg, run_id=tr.run_id, run_name=None)
    for step in (20, 30, 40):
        again.log_metrics({"train/loss": 2.0}, step=step)
    again.close()
    history = client.get_metric_history(tr.run_id, "train/loss")
    assert [m.step for m in history] == [10, 20, 30, 40]
    assert client.get_run(tr.run_id).info.status == "FINISHED"


def test_transient_failures_are_retried_and_nothing_is_lost(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    cfg = _cfg(tmp_path)
    tr = MlflowTracker(cfg, run_id=None, run_name=None, retry_s=0.2)
    real = tr.client.log_batch
    failures = {"left": 3}

    def flaky(*args: object, **kwargs: object) -> None:
        if failures["left"] > 0:
            failures["left"] -= 1
            raise ConnectionError("server down")
        real(*args, **kwargs)

    tr.client.log_batch = flaky  # the network fails under a real store
    t0 = time.perf_counter()
    for step in range(1, 6):
        tr.log_metrics({"train/loss": float(step)}, step=step)
    assert time.perf_counter() - t0 < 0.5  # logging never blocks the training loop
    tr.close(timeout_s=30)
    history = MlflowClient(tracking_uri=cfg.uri).get_metric_history(tr.run_id, "train/loss")
    assert sorted(m.step for m in history) == [1, 2, 3, 4, 5]
    err = capsys.readouterr().err
    assert err.count("will retry") == 1  # reported once, not per call
    assert "reachable again" in err


def test_dead_server_is_not_fatal_and_does_not_block(capsys: pytest.CaptureFixture) -> None:
    from trainer.distributed import free_port

    cfg = TrackingConfig(uri=f"http://127.0.0.1:{free_port()}", request_timeout_s=1, request_max_retries=0)
    t0 = time.perf_counter()
    tr = create_tracker(cfg, is_main=True, run_id=None, run_name=None)
    tr.log_metrics({"train/loss": 1.0}, step=1)
    tr.close(timeout_s=3)
    assert time.perf_counter() - t0 < 30
    assert tr.run_id is None
    err = capsys.readouterr().err
    assert "unavailable, will retry in the background" in err
    assert "not delivered before exit" in err


def test_outage_at_start_keeps_the_run_id_and_delivers_later(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path)
    first = MlflowTracker(cfg, run_id=None, run_name=None)
    first.log_metrics({"train/loss": 1.0}, step=1)
    first.close(status="KILLED")
    # The restarted job cannot reach the store at first: it keeps the id and attaches on a retry.
    import mlflow.tracking

    calls = {"n": 0}
    real_get_run = mlflow.tracking.MlflowClient.get_run

    def flaky_get_run(self: object, run_id: str) -> object:
        calls["n"] += 1
        if calls["n"] == 1:
            raise ConnectionError("store unreachable")
        return real_get_run(self, run_id)

    mlflow.tracking.MlflowClient.get_run = flaky_get_run
    try:
        again = MlflowTracker(cfg, run_id=first.run_id, run_name=None, retry_s=0.1)
        assert again.run_id == first.run_id
        again.log_metrics({"train/loss": 0.5}, step=1)  # already in the run: skipped
        again.log_metrics({"train/loss": 0.25}, step=2)
        again.close(timeout_s=20)
    finally:
        mlflow.tracking.MlflowClient.get_run = real_get_run
    client = MlflowClient(tracking_uri=cfg.uri)
    assert [(m.step, m.value) for m in client.get_metric_history(first.run_id, "train/loss")] == [(1, 1.0), (2, 0.25)]
    assert len(client.search_runs([client.get_run(first.run_id).info.experiment_id])) == 1


def test_non_main_ranks_and_disabled_tracking_do_nothing(tmp_path: Path) -> None:
    assert type(create_tracker(_cfg(tmp_path), is_main=False, run_id=None, run_name=None)) is Tracker
    assert type(create_tracker(_cfg(tmp_path, enabled=False), is_main=True, run_id=None, run_name=None)) is Tracker
    assert not (tmp_path / "mlflow.db").exists()


def test_relative_sqlite_uri_becomes_absolute(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert resolve_uri("sqlite:///mlflow.db") == f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert resolve_uri("sqlite:////abs/x.db") == "sqlite:////abs/x.db"
    assert resolve_uri("http://host:5000") == "http://host:5000"


# ---------------------------------------------------------------------- run identity, close, system metrics


def _blocked_store(tmp_path: Path) -> tuple[TrackingConfig, Path]:
    """A sqlite store that cannot open (a file sits where its directory must go) until the file is removed."""
    blocker = tmp_path / "store"
    blocker.write_text("")
    return TrackingConfig(uri=f"sqlite:///{blocker / 'mlflow.db'}", experiment="t"), blocker


def test_on_run_id_is_called_on_create_and_on_reattach(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    cfg = _cfg(tmp_path)
    seen: list[str] = []
    tr = MlflowTracker(cfg, run_id=None, run_name="r", on_run_id=seen.append, system_metrics_interval_s=None)
    assert tr.run_id and seen == [tr.run_id]  # known before the constructor returns
    tr.close(status="KILLED")
    again = MlflowTracker(cfg, run_id=tr.run_id, run_name=None, on_run_id=seen.append, system_metrics_interval_s=None)
    again.close()
    assert seen == [tr.run_id, tr.run_id]

    def broken(run_id: str) -> None:
        raise OSError("disk full")

    third = MlflowTracker(cfg, run_id=tr.run_id, run_name=None, on_run_id=broken, system_metrics_interval_s=None)
    third.log_metrics({"train/loss": 1.0}, step=100)
    third.close()
    assert [m.step for m in MlflowClient(tracking_uri=cfg.uri).get_metric_history(tr.run_id, "train/loss")] == [100]
    assert capsys.readouterr().err.count("on_run_id callback failed") == 1


def test_run_created_late_is_announced_from_the_worker(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    cfg, blocker = _blocked_store(tmp_path)
    announced: list[tuple[str, str]] = []
    got = threading.Event()

    def on_run_id(run_id: str) -> None:
        announced.append((run_id, threading.current_thread().name))
        got.set()

    tr = MlflowTracker(cfg, run_id=None, run_name=None, retry_s=0.2, on_run_id=on_run_id, system_metrics_interval_s=0.2)
    assert tr.run_id is None and not announced
    for step in (1, 2, 3):
        tr.log_metrics({"train/loss": float(step)}, step=step)
    time.sleep(0.7)  # system samples taken while the store is down must reach the run too
    back_ms = int(time.time() * 1000)
    blocker.unlink()  # the store comes back
    assert got.wait(30)
    tr.close()
    assert announced == [(tr.run_id, "mlflow-tracker")]
    client = MlflowClient(tracking_uri=cfg.uri)
    assert [m.step for m in client.get_metric_history(tr.run_id, "train/loss")] == [1, 2, 3]
    cpu = client.get_metric_history(tr.run_id, "system/cpu_utilization_percentage")
    assert min(m.timestamp for m in cpu) < back_ms
    assert sorted(m.step for m in cpu) == list(range(len(cpu)))
    assert "unavailable, will retry in the background" in capsys.readouterr().err


def test_close_is_bounded_when_the_server_hangs(capsys: pytest.CaptureFixture) -> None:
    from trainer.distributed import free_port

    port = free_port()
    # Down at start (refused at once), then a server that accepts connections and never answers: the
    # worker's next call blocks for the whole 30 s request timeout.
    cfg = TrackingConfig(uri=f"http://127.0.0.1:{port}", request_timeout_s=30, request_max_retries=0)
    tr = MlflowTracker(cfg, run_id=None, run_name=None, retry_s=0.2, close_timeout_s=2, system_metrics_interval_s=None)
    hang = socket.socket()
    hang.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    hang.bind(("127.0.0.1", port))
    hang.listen(16)
    try:
        tr.log_metrics({"train/loss": 1.0}, step=1)
        time.sleep(1.0)  # the worker is now inside a blocked HTTP call
        t0 = time.perf_counter()
        tr.close()
        elapsed = time.perf_counter() - t0
        tr.close()  # a second close is a no-op, never an error
    finally:
        hang.close()
    assert elapsed < 2.5
    assert tr._thread.daemon and tr._thread.is_alive()  # abandoned, not waited for
    err = capsys.readouterr().err
    assert "2 tracking calls not delivered before exit" in err  # the metrics call and the end of the run
    assert err.count("not delivered") == 1


def test_experiments_are_tagged_as_model_development(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path)
    client = MlflowClient(tracking_uri=cfg.uri)
    old = client.create_experiment("older")  # made before the tag existed
    tr = MlflowTracker(cfg, run_id=None, run_name=None, system_metrics_interval_s=None)
    tr.close()
    assert (
        client.get_experiment(tr.experiment_id).tags[EXPERIMENT_KIND_TAG]
        == EXPERIMENT_KIND
        == "custom_model_development"
    )
    older = MlflowTracker(cfg.model_copy(update={"experiment": "older"}), None, None, system_metrics_interval_s=None)
    older.close()
    assert client.get_experiment(old).tags[EXPERIMENT_KIND_TAG] == "custom_model_development"


@pytest.mark.parametrize("uri", ["bogus://x", "localhost:5000", "file:///tmp/mlruns"])
def test_uri_mlflow_cannot_use_is_a_one_line_config_error(uri: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)
    before = threading.active_count()
    for is_main in (True, False):  # every rank stops, so none waits in a collective for the others
        with pytest.raises(ConfigError) as err:
            create_tracker(TrackingConfig(uri=uri), is_main=is_main, run_id=None, run_name=None)
        msg = str(err.value)
        assert msg.startswith("tracking.uri: ") and repr(uri) in msg and "\n" not in msg
    assert threading.active_count() == before  # raised before any thread started


def test_usable_uris_pass_validation(monkeypatch: pytest.MonkeyPatch) -> None:
    for uri in ("http://unreachable.invalid:5000", "https://h", "sqlite:///x.db", "postgresql+psycopg2://u@h/db"):
        validate_uri(uri)
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    validate_uri("file:///tmp/mlruns")


def test_system_metrics_are_logged_and_continue_on_resume(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path)
    tr = MlflowTracker(cfg, run_id=None, run_name=None, system_metrics_interval_s=1.0)
    time.sleep(2.5)
    tr.close()
    client = MlflowClient(tracking_uri=cfg.uri)
    keys = set(client.get_run(tr.run_id).data.metrics)
    assert {"system/cpu_utilization_percentage", "system/system_memory_usage_megabytes"} <= keys
    assert "system/disk_usage_percentage" in keys and "system/network_receive_megabytes" in keys
    first = len(client.get_metric_history(tr.run_id, "system/cpu_utilization_percentage"))
    assert first >= 2

    again = MlflowTracker(cfg, run_id=tr.run_id, run_name=None, system_metrics_interval_s=1.0)
    time.sleep(1.5)
    again.close()
    steps = [m.step for m in client.get_metric_history(tr.run_id, "system/system_memory_usage_megabytes")]
    assert len(steps) > first and sorted(steps) == list(range(len(steps)))  # continued, no step reused
    assert not [t for t in threading.enumerate() if t.name == "mlflow-system-metrics" and t.is_alive()]


def test_a_rejected_point_in_a_merged_batch_costs_only_that_point(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    cfg, blocker = _blocked_store(tmp_path)
    tr = MlflowTracker(cfg, run_id=None, run_name=None, retry_s=0.2, system_metrics_interval_s=None)
    tr.log_metrics({"train/loss": 1.0}, step=1)
    tr.log_metrics({"bad*key": 2.0}, step=2)  # MLflow refuses '*' in a metric name
    tr.log_metrics({"train/loss": 3.0}, step=3)
    time.sleep(0.3)  # all three wait in the backlog and go out as one batch
    blocker.unlink()
    tr.close(timeout_s=30)
    history = MlflowClient(tracking_uri=cfg.uri).get_metric_history(tr.run_id, "train/loss")
    assert [(m.step, m.value) for m in history] == [(1, 1.0), (3, 3.0)]
    assert capsys.readouterr().err.count("MLflow rejected a metrics call") == 1
