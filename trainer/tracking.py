"""MLflow tracking for rank 0: never fatal, never blocking, resumable.

All MLflow calls run on one background thread fed by a queue, so a slow or dead tracking server
cannot stall training (a dead server blocks each call for minutes with MLflow's default retries).
A failed call is reported once, kept, and retried with backoff; points survive an outage up to
``max_pending`` items. On resume the run is re-attached by id and metric steps that the run already
holds are skipped, so the history has no duplicated steps.
"""

from __future__ import annotations

import os
import queue
import shutil
import sys
import tempfile
import threading
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

from trainer.config import TrackingConfig

_PARAM_BATCH = 100  # MLflow's limit of params per log_batch call
_PARAM_MAX_LEN = 6000


_PERMANENT_CODES = {"INVALID_PARAMETER_VALUE", "BAD_REQUEST", "RESOURCE_DOES_NOT_EXIST", "INVALID_STATE"}


def _is_permanent(err: Exception) -> bool:
    """MLflow's own rejections are permanent; connection problems and server errors are not."""
    return getattr(err, "error_code", None) in _PERMANENT_CODES


def _warn(msg: str) -> None:
    print(f"[tracking] {msg}", file=sys.stderr, flush=True)


class Tracker:
    """The interface the trainer uses. This base class does nothing (ranks other than 0, or disabled)."""

    run_id: str | None = None

    def log_params(self, params: dict[str, Any]) -> None: ...

    def log_metrics(self, metrics: dict[str, float], step: int) -> None: ...

    def log_artifact_bytes(self, data: bytes, artifact_path: str) -> None: ...

    def log_artifact_file(self, path: str | Path, artifact_dir: str | None = None) -> None: ...

    def set_tags(self, tags: dict[str, str]) -> None: ...

    def close(self, status: str = "FINISHED", timeout_s: float = 60.0) -> None: ...

    @property
    def ui_hint(self) -> str:
        return ""


class MlflowTracker(Tracker):
    def __init__(
        self,
        cfg: TrackingConfig,
        run_id: str | None,
        run_name: str | None,
        retry_s: float = 30.0,
        max_pending: int = 100_000,
        on_run_id: Callable[[str], None] | None = None,
    ) -> None:
        self._on_run_id = on_run_id
        # MLflow reads its HTTP limits from the environment; bound them so one call cannot block for
        # ~4 minutes (the default retry policy) when the server is down.
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", str(int(cfg.request_timeout_s)))
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", str(cfg.request_max_retries))
        from mlflow.tracking import MlflowClient

        self.cfg = cfg
        self.client = MlflowClient(tracking_uri=cfg.uri)
        self._retry_s = retry_s
        self._pending: deque[tuple[str, tuple[Any, ...]]] = deque(maxlen=max_pending)
        self._queue: queue.Queue[tuple[str, tuple[Any, ...]] | None] = queue.Queue()
        self._skip_until_step = -1
        self._failed_once = False
        self._dropped_warned = False
        self._tmp = Path(tempfile.mkdtemp(prefix="iddpm-artifacts-"))
        self.experiment_id: str | None = None
        self._close_timeout_s = 60.0
        # A known run id is kept even while the server is unreachable, so a restart never forks the run.
        self.run_id = run_id
        self._run_name = run_name
        self._attached = False
        try:
            self._attach()
        except Exception as err:  # noqa: BLE001 - tracking must never stop training
            _warn(f"MLflow at {cfg.uri} unavailable, will retry in the background: {type(err).__name__}: {err}")
            self._failed_once = True
        self._thread = threading.Thread(target=self._worker, name="mlflow-tracker", daemon=True)
        self._thread.start()

    # -------------------------------------------------------------- run attach / create
    def _attach(self) -> None:
        """Re-attach to ``run_id`` (or create the run). Raises on connection problems."""
        from mlflow.exceptions import MlflowException

        if self.run_id:
            try:
                run = self.client.get_run(self.run_id)
            except MlflowException as err:
                if getattr(err, "error_code", None) != "RESOURCE_DOES_NOT_EXIST":
                    raise
                _warn(f"MLflow run {self.run_id} no longer exists in {self.cfg.uri}: starting a new run")
                self.run_id = None
            else:
                self.experiment_id = run.info.experiment_id
                self.client.update_run(self.run_id, status="RUNNING")
                self._skip_until_step = self._last_logged_step(self.run_id)
                self._attached = True
                return
        exp = self.client.get_experiment_by_name(self.cfg.experiment)
        exp_id = exp.experiment_id if exp is not None else self.client.create_experiment(self.cfg.experiment)
        run = self.client.create_run(exp_id, run_name=self._run_name)
        self.experiment_id = exp_id
        self.run_id = run.info.run_id
        self._attached = True

    def _last_logged_step(self, run_id: str) -> int:
        history = self.client.get_metric_history(run_id, "train/loss")
        return max((m.step for m in history), default=-1)

    # -------------------------------------------------------------- public API (non-blocking)
    def _submit(self, kind: str, *args: Any) -> None:
        self._queue.put((kind, args))

    def log_params(self, params: dict[str, Any]) -> None:
        items = [(k, str(v)[:_PARAM_MAX_LEN]) for k, v in params.items()]
        for i in range(0, len(items), _PARAM_BATCH):
            self._submit("params", items[i : i + _PARAM_BATCH])

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        ts = int(time.time() * 1000)
        self._submit("metrics", [(k, float(v), ts, step) for k, v in metrics.items()])

    def log_artifact_bytes(self, data: bytes, artifact_path: str) -> None:
        local = self._tmp / artifact_path
        local.parent.mkdir(parents=True, exist_ok=True)
        local.write_bytes(data)
        self._submit("artifact", str(local), str(Path(artifact_path).parent) if "/" in artifact_path else None)

    def log_artifact_file(self, path: str | Path, artifact_dir: str | None = None) -> None:
        self._submit("artifact", str(path), artifact_dir)

    def set_tags(self, tags: dict[str, str]) -> None:
        self._submit("tags", list(tags.items()))

    def close(self, status: str = "FINISHED", timeout_s: float = 60.0) -> None:
        self._submit("end", status)
        self._close_timeout_s = timeout_s
        self._queue.put(None)
        self._thread.join(timeout_s)
        if self._thread.is_alive() or self._pending:
            _warn(f"{len(self._pending) + self._queue.qsize()} tracking calls not delivered before exit")
        shutil.rmtree(self._tmp, ignore_errors=True)

    @property
    def ui_hint(self) -> str:
        if not self._attached:
            return f"MLflow at {self.cfg.uri} not reachable yet: points are kept and sent when it is"
        if self.cfg.uri.startswith(("http://", "https://")):
            base = self.cfg.uri.rstrip("/")
            return f"MLflow run: {base}/#/experiments/{self.experiment_id}/runs/{self.run_id}"
        return f"MLflow run {self.run_id}: view with  mlflow ui --backend-store-uri {self.cfg.uri}"

    # -------------------------------------------------------------- worker thread
    def _send(self, kind: str, args: tuple[Any, ...]) -> None:
        from mlflow.entities import Metric, Param, RunTag

        if not self._attached:
            self._attach()
        rid = self.run_id
        if kind == "params":
            self.client.log_batch(rid, params=[Param(k, v) for k, v in args[0]])
        elif kind == "metrics":
            # Steps the run already holds (logged before a restart from an earlier checkpoint) are skipped.
            points = [Metric(k, v, ts, s) for k, v, ts, s in args[0] if s > self._skip_until_step]
            if points:
                self.client.log_batch(rid, metrics=points)
        elif kind == "tags":
            self.client.log_batch(rid, tags=[RunTag(k, v) for k, v in args[0]])
        elif kind == "artifact":
            self.client.log_artifact(rid, args[0], artifact_path=args[1])
            if Path(args[0]).is_relative_to(self._tmp):
                Path(args[0]).unlink(missing_ok=True)
        elif kind == "end":
            self.client.set_terminated(rid, status=args[0])

    def _drain_pending(self) -> bool:
        while self._pending:
            kind, args = self._pending[0]
            try:
                self._send(kind, args)
            except Exception as err:  # noqa: BLE001
                if _is_permanent(err):
                    # Retrying cannot help (e.g. a param logged earlier with another value): drop this call only.
                    _warn(f"MLflow rejected a {kind} call, skipped: {str(err).splitlines()[0][:300]}")
                    self._pending.popleft()
                    continue
                if not self._failed_once:
                    _warn(f"MLflow call failed, will retry every {self._retry_s:.0f}s: {type(err).__name__}: {err}")
                    self._failed_once = True
                return False
            self._pending.popleft()
        if self._failed_once:
            _warn("MLflow reachable again; delayed points delivered")
            self._failed_once = False
        return True

    def _accept(self, item: tuple[str, tuple[Any, ...]]) -> None:
        if len(self._pending) == self._pending.maxlen and not self._dropped_warned:
            _warn("tracking backlog full: oldest points are being dropped")
            self._dropped_warned = True
        self._pending.append(item)

    def _worker(self) -> None:
        next_try = 0.0
        deadline: float | None = None  # set once close() was called
        while True:
            if deadline is None:
                wait = None if not self._pending else max(0.0, next_try - time.monotonic())
                try:
                    item = self._queue.get(timeout=wait)
                except queue.Empty:
                    item = ("_tick", ())
                if item is None:
                    deadline = time.monotonic() + self._close_timeout_s
                elif item[0] != "_tick":
                    self._accept(item)
                if deadline is None and time.monotonic() < next_try:
                    continue  # backing off after a failure; keep collecting points
            if self._drain_pending():
                if deadline is not None:
                    return
                continue
            next_try = time.monotonic() + self._retry_s
            if deadline is not None:
                if next_try > deadline:
                    return
                time.sleep(self._retry_s)


def resolve_uri(uri: str) -> str:
    """Make a relative ``sqlite:///file.db`` absolute, so sampling or evaluating from another directory
    (or a SLURM task with another working directory) finds the same store."""
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not uri.startswith(prefix + "/"):
        return prefix + str(Path(uri[len(prefix) :]).resolve())
    return uri


def create_tracker(
    cfg: TrackingConfig,
    is_main: bool,
    run_id: str | None,
    run_name: str | None,
    on_run_id: Callable[[str], None] | None = None,
) -> Tracker:
    """``on_run_id(run_id)`` is called (from whichever thread learns it) as soon as the run is created
    or attached, so the caller can persist the id before anything else can fail."""
    if not (cfg.enabled and is_main):
        return Tracker()
    return MlflowTracker(
        cfg.model_copy(update={"uri": resolve_uri(cfg.uri)}), run_id=run_id, run_name=run_name, on_run_id=on_run_id
    )


def log_to_run(
    uri: str | None,
    run_id: str | None,
    files: list[Path],
    metrics: dict[str, float] | None = None,
    artifact_dir: str | None = None,
    step: int = 0,
) -> bool:
    """Attach results made after training (samples, evaluations) to the training run. Never raises."""
    if not uri or not run_id:
        return False
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
    try:
        from mlflow.entities import Metric
        from mlflow.tracking import MlflowClient

        client = MlflowClient(tracking_uri=uri)
        for f in files:
            client.log_artifact(run_id, str(f), artifact_path=artifact_dir)
        if metrics:
            ts = int(time.time() * 1000)
            client.log_batch(run_id, metrics=[Metric(k, float(v), ts, step) for k, v in metrics.items()])
        return True
    except Exception as err:  # noqa: BLE001 - the results are on disk already
        _warn(f"could not log to MLflow run {run_id} at {uri}: {type(err).__name__}: {err}")
        return False
