"""MLflow tracking against a real local store: resume, no duplicated steps, outages never fatal."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from trainer.config import TrackingConfig
from trainer.tracking import MlflowTracker, Tracker, create_tracker, resolve_uri


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
