"""MLflow tracking for rank 0: never fatal, never blocking, resumable.

All MLflow calls run on one background (daemon) thread fed by a queue, so a slow or dead tracking
server cannot stall training (a dead server blocks each call for minutes with MLflow's default retries).
A failed call is reported once, kept, and retried with backoff; points survive an outage up to
``max_pending`` calls, and consecutive metric calls are sent as one ``log_batch`` so a backlog drains
fast. On resume the run is re-attached by id and metric steps that the run already holds are skipped,
so the history has no duplicated steps.

Run identity: ``on_run_id(run_id)`` is called as soon as the run is created or re-attached, from the
thread that learns it (the constructor's, or the worker's when the store was unreachable at start), so
the caller can persist the id and a restart never forks the run.

Closing: ``close()`` never raises and returns within ``close_timeout_s`` (default 10 s) whatever the
server does: measured 10.0 s with the defaults both for a server that refuses connections and for one
that accepts them and never answers (the worker then sits in a 10 s x 3-try HTTP call). Calls not
delivered by then are reported in one warning line with their count; the worker is a daemon thread,
so the process can exit.

System metrics (:mod:`trainer.system_metrics`) are sampled every ``system_metrics_interval_s`` and logged as
``system/<name>`` through the same queue, so they obey the same outage rules and follow a run that is only
created later. Only rank 0 logs, so they describe rank 0's node.
"""

from __future__ import annotations

import os
import queue
import shutil
import tempfile
import threading
import time
import urllib.parse
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

from trainer.config import ConfigError, TrackingConfig
from trainer.console import one_line as _one_line
from trainer.console import warn
from trainer.system_metrics import SystemMetricsSampler, system_metrics_disabled

_PARAM_BATCH = 100  # MLflow's limit of params per log_batch call
_METRIC_BATCH = 1000  # MLflow's limit of metrics per log_batch call
_PARAM_MAX_LEN = 6000
_SYSTEM_PREFIX = "system/"  # MLflow's own prefix for system metrics

# The tag MLflow 3's UI reads to choose an experiment's view; without it the UI may open the GenAI one.
# Values from MLflow's UI (ExperimentKind enum in mlflow/server/js); no Python constant exists.
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"

# MLflow reads its HTTP limits from the environment on every request. Values the user exported win;
# otherwise each tracker applies its own config.
_HTTP_ENV = ("MLFLOW_HTTP_REQUEST_TIMEOUT", "MLFLOW_HTTP_REQUEST_MAX_RETRIES")
_USER_HTTP_ENV = frozenset(k for k in _HTTP_ENV if k in os.environ)

_PERMANENT_CODES = {"INVALID_PARAMETER_VALUE", "BAD_REQUEST", "RESOURCE_DOES_NOT_EXIST", "INVALID_STATE"}

# Schemes every full MLflow install serves (its REST and SQLAlchemy stores). Checking these from the string
# spares the other ranks importing MLflow (~3 s, ~160 MB each); anything else asks MLflow's registry.
_BUILTIN_SCHEMES = ("http", "https", "sqlite", "postgresql", "mysql", "mssql")

Item = tuple[str, tuple[Any, ...]]


def _is_permanent(err: Exception) -> bool:
    """MLflow's own rejections are permanent; connection problems and server errors are not."""
    return getattr(err, "error_code", None) in _PERMANENT_CODES


def _warn(msg: str) -> None:
    warn(f"[tracking] {msg}")


def validate_uri(uri: str) -> None:
    """Raise :class:`ConfigError` when MLflow has no tracking store for the URI's scheme.

    Looks only at the string and MLflow's store registry, never at the network: a valid but
    unreachable server is not an error (tracking must never stop training)."""
    if urllib.parse.urlparse(uri).scheme.lower().split("+")[0] in _BUILTIN_SCHEMES:
        return
    try:
        from mlflow.environment_variables import MLFLOW_ALLOW_FILE_STORE
        from mlflow.exceptions import MlflowException
        from mlflow.tracking._tracking_service.utils import _tracking_store_registry
        from mlflow.utils.uri import get_uri_scheme
    except ImportError:  # a future MLflow moved its registry: construction reports a bad URI instead
        return
    scheme = get_uri_scheme(uri)
    try:
        _tracking_store_registry.get_store_builder(uri)
    except MlflowException:
        known = ", ".join(sorted(s for s in _tracking_store_registry._registry if s))
        raise ConfigError(f"tracking.uri: MLflow cannot use {uri!r} (scheme {scheme!r}; known: {known})") from None
    if scheme in ("", "file") and not MLFLOW_ALLOW_FILE_STORE.get():
        raise ConfigError(
            f"tracking.uri: {uri!r} is MLflow's file store, which MLflow 3 refuses unless "
            "MLFLOW_ALLOW_FILE_STORE=true; use sqlite:///mlflow.db or an http(s) server"
        )


class Tracker:
    """The interface the trainer uses. This base class does nothing (ranks other than 0, or disabled)."""

    run_id: str | None = None

    def log_params(self, params: dict[str, Any]) -> None: ...

    def log_metrics(self, metrics: dict[str, float], step: int) -> None: ...

    def log_artifact_bytes(self, data: bytes, artifact_path: str) -> None: ...

    def log_artifact_file(self, path: str | Path, artifact_dir: str | None = None) -> None: ...

    def set_tags(self, tags: dict[str, str]) -> None: ...

    def close(self, status: str = "FINISHED", timeout_s: float | None = None) -> None: ...

    def flush(self, timeout_s: float = 10.0) -> bool:
        """Wait until every call made so far is delivered (at most ``timeout_s``); True if it was."""
        return True

    @property
    def ui_hint(self) -> str:
        return ""


class MlflowTracker(Tracker):
    """Rank 0's tracker. ``retry_s``: pause between attempts while MLflow is unreachable; ``max_pending``:
    calls kept during an outage (oldest dropped beyond); ``on_run_id``: told the run id once known;
    ``close_timeout_s``: the most ``close()`` waits; ``system_metrics_interval_s``: sampling period of
    system metrics (None or 0: off)."""

    def __init__(
        self,
        cfg: TrackingConfig,
        run_id: str | None,
        run_name: str | None,
        retry_s: float = 30.0,
        max_pending: int = 100_000,
        on_run_id: Callable[[str], None] | None = None,
        close_timeout_s: float = 10.0,
        system_metrics_interval_s: float | None = 10.0,
    ) -> None:
        validate_uri(cfg.uri)
        self._on_run_id = on_run_id
        self._on_run_id_warned = False
        # Bound MLflow's HTTP calls so one call cannot block for ~4 minutes (the default retry policy).
        limits = (str(max(1, int(cfg.request_timeout_s))), str(cfg.request_max_retries))  # MLflow parses ints
        for name, value in zip(_HTTP_ENV, limits, strict=True):
            if name not in _USER_HTTP_ENV:
                os.environ[name] = value

        self.cfg = cfg
        self.client: Any = None  # made in _attach: building a store can fail too (a sqlite path it cannot open)
        self._retry_s = retry_s
        self._close_timeout_s = close_timeout_s
        self._pending: deque[Item] = deque(maxlen=max_pending)
        self._queue: queue.Queue[Item | None] = queue.Queue()
        self._skip_until_step = -1
        self._next_system_step = 0
        self._solo_left = 0  # after a rejected batch: send this many calls one by one to find the bad one
        self._failed_once = False
        self._dropped_warned = False
        self._closed = False
        self._deadline: float | None = None  # set by close(); the worker stops trying after it
        self._tmp = Path(tempfile.mkdtemp(prefix="iddpm-artifacts-"))
        self.experiment_id: str | None = None
        # A known run id is kept even while the server is unreachable, so a restart never forks the run.
        self.run_id = run_id
        self._run_name = run_name
        self._attached = False
        try:
            self._attach()
        except Exception as err:  # noqa: BLE001 - tracking must never stop training
            _warn(f"MLflow at {cfg.uri} unavailable, will retry in the background: {_one_line(err)}")
            self._failed_once = True
        self._thread = threading.Thread(target=self._worker, name="mlflow-tracker", daemon=True)
        self._thread.start()
        self._system: SystemMetricsSampler | None = None
        if system_metrics_interval_s and not system_metrics_disabled():
            self._system = SystemMetricsSampler(system_metrics_interval_s, self._log_system_metrics)

    # -------------------------------------------------------------- run attach / create
    def _attach(self) -> None:
        """Re-attach to ``run_id`` (or create the run), then announce its id. Raises on connection problems."""
        from mlflow.exceptions import MlflowException
        from mlflow.tracking import MlflowClient

        if self.client is None:
            self.client = MlflowClient(tracking_uri=self.cfg.uri)
        if self.run_id:
            try:
                run = self.client.get_run(self.run_id)
            except MlflowException as err:
                if getattr(err, "error_code", None) != "RESOURCE_DOES_NOT_EXIST":
                    raise
                _warn(f"MLflow run {self.run_id} no longer exists in {self.cfg.uri}: starting a new run")
                self.run_id = None
            else:
                self._tag_experiment(self.client.get_experiment(run.info.experiment_id))
                self.client.update_run(self.run_id, status="RUNNING")
                self.experiment_id = run.info.experiment_id
                self._skip_until_step, self._next_system_step = self._resume_points(run)
                self._attached = True
                self._announce_run_id()
                return
        exp = self.client.get_experiment_by_name(self.cfg.experiment)
        if exp is None:
            try:
                exp_id = self.client.create_experiment(self.cfg.experiment, tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND})
            except MlflowException as err:  # another job created it first
                if getattr(err, "error_code", None) != "RESOURCE_ALREADY_EXISTS":
                    raise
                exp = self.client.get_experiment_by_name(self.cfg.experiment)
                exp_id = exp.experiment_id
        else:
            exp_id = exp.experiment_id
        if exp is not None:
            self._tag_experiment(exp)
        run = self.client.create_run(exp_id, run_name=self._run_name)
        self.experiment_id = exp_id
        self.run_id = run.info.run_id
        self._skip_until_step, self._next_system_step = -1, 0
        self._attached = True
        self._announce_run_id()

    def _tag_experiment(self, exp: Any) -> None:
        """Mark experiments made before this tag existed, so MLflow 3's UI opens them as model training."""
        from mlflow.exceptions import MlflowException

        if exp is None or exp.tags.get(EXPERIMENT_KIND_TAG) is not None:
            return
        try:
            self.client.set_experiment_tag(exp.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
        except MlflowException as err:
            # A refusal (e.g. no permission on a shared experiment) only costs the UI default; a
            # connection error propagates so the attach is retried.
            if not (_is_permanent(err) or getattr(err, "error_code", None) == "PERMISSION_DENIED"):
                raise
            _warn(f"could not tag experiment {exp.experiment_id} with {EXPERIMENT_KIND_TAG}: {_one_line(err)}")

    def _resume_points(self, run: Any) -> tuple[int, int]:
        """(last ``train/loss`` step, next system-metrics step) of a run being resumed. The run's latest
        metrics carry each key's largest step, so no metric history is downloaded."""
        latest = getattr(run.data, "_metric_objs", None)
        if latest is None:
            history = self.client.get_metric_history(run.info.run_id, "train/loss")
            return max((m.step for m in history), default=-1), 0
        last_loss = max((m.step for m in latest if m.key == "train/loss"), default=-1)
        next_system = max((m.step + 1 for m in latest if m.key.startswith(_SYSTEM_PREFIX)), default=0)
        return last_loss, next_system

    def _announce_run_id(self) -> None:
        if self._on_run_id is None or not self.run_id:
            return
        try:
            self._on_run_id(self.run_id)
        except Exception as err:  # noqa: BLE001 - the caller's bookkeeping must not break tracking
            if not self._on_run_id_warned:
                _warn(f"on_run_id callback failed for run {self.run_id}: {_one_line(err)}")
                self._on_run_id_warned = True

    # -------------------------------------------------------------- public API (non-blocking)
    def _submit(self, kind: str, *args: Any) -> None:
        if not self._closed:
            self._queue.put((kind, args))

    def _log_system_metrics(self, timestamp_ms: int, values: dict[str, float]) -> None:
        # The step is given on the worker (it must continue the run's own sequence, unknown until
        # attached); the one-element list keeps it stable across retries so a retry is not a duplicate.
        self._submit("system", timestamp_ms, values, [None])

    def log_params(self, params: dict[str, Any]) -> None:
        items = [(k, str(v)[:_PARAM_MAX_LEN]) for k, v in params.items()]
        for i in range(0, len(items), _PARAM_BATCH):
            self._submit("params", items[i : i + _PARAM_BATCH])

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        ts = int(time.time() * 1000)
        self._submit("metrics", [(k, float(v), ts, step) for k, v in metrics.items()])

    def log_artifact_bytes(self, data: bytes, artifact_path: str) -> None:
        if self._closed:  # its temporary folder is gone
            return
        local = self._tmp / artifact_path
        local.parent.mkdir(parents=True, exist_ok=True)
        local.write_bytes(data)
        self._submit("artifact", str(local), str(Path(artifact_path).parent) if "/" in artifact_path else None)

    def log_artifact_file(self, path: str | Path, artifact_dir: str | None = None) -> None:
        self._submit("artifact", str(path), artifact_dir)

    def set_tags(self, tags: dict[str, str]) -> None:
        self._submit("tags", list(tags.items()))

    def flush(self, timeout_s: float = 10.0) -> bool:
        if self._closed:
            return False
        delivered = threading.Event()
        self._submit("flush", delivered)
        return delivered.wait(timeout_s)

    def close(self, status: str = "FINISHED", timeout_s: float | None = None) -> None:
        """End the run. Never raises; returns within ``timeout_s`` (default: the constructor's
        ``close_timeout_s``) whatever the server does; the daemon worker is then abandoned."""
        if self._closed:
            return
        try:
            t_end = time.monotonic() + (self._close_timeout_s if timeout_s is None else timeout_s)
            if self._system is not None:
                self._system.stop(timeout_s=1.0)  # collectors are local and fast; never wait longer
            self._submit("end", status)
            self._closed = True
            self._deadline = t_end
            self._queue.put(None)
            self._thread.join(max(0.0, t_end - time.monotonic()))
            left = len(self._pending) + sum(1 for item in list(self._queue.queue) if item is not None)
            if self._thread.is_alive() or left:
                _warn(f"{left} tracking calls not delivered before exit (MLflow at {self.cfg.uri} unreachable)")
        except Exception as err:  # noqa: BLE001 - closing must never fail the job
            _warn(f"closing the tracker failed: {_one_line(err)}")
        finally:
            self._closed = True
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
    def _metric_points(self, items: list[Item]) -> list[Any]:
        from mlflow.entities import Metric

        points = []
        for kind, args in items:
            if kind == "metrics":
                # Steps the run already holds (logged before a restart from an earlier checkpoint) are skipped.
                points += [Metric(k, v, ts, s) for k, v, ts, s in args[0] if s > self._skip_until_step]
            else:
                ts, values, step = args
                if step[0] is None:
                    step[0] = self._next_system_step
                    self._next_system_step += 1
                points += [Metric(_SYSTEM_PREFIX + k, float(v), ts, step[0]) for k, v in values.items()]
        return points

    def _send(self, items: list[Item]) -> None:
        """Deliver ``items``: one call, or a run of metric calls merged into one ``log_batch``."""
        from mlflow.entities import Param, RunTag

        if not self._attached:
            self._attach()
        rid = self.run_id
        kind, args = items[0]
        if kind in ("metrics", "system"):
            points = self._metric_points(items)
            if points:
                self.client.log_batch(rid, metrics=points)
        elif kind == "params":
            self.client.log_batch(rid, params=[Param(k, v) for k, v in args[0]])
        elif kind == "tags":
            self.client.log_batch(rid, tags=[RunTag(k, v) for k, v in args[0]])
        elif kind == "artifact":
            self.client.log_artifact(rid, args[0], artifact_path=args[1])
            if Path(args[0]).is_relative_to(self._tmp):
                Path(args[0]).unlink(missing_ok=True)
        elif kind == "end":
            self.client.set_terminated(rid, status=args[0])
        elif kind == "flush":
            args[0].set()  # every call queued before it has been delivered

    def _next_batch(self) -> int:
        """How many pending calls, from the head, go out as one request."""
        if self._solo_left or self._pending[0][0] not in ("metrics", "system"):
            return 1
        n = total = 0
        for kind, args in self._pending:
            size = len(args[0]) if kind == "metrics" else len(args[1]) if kind == "system" else -1
            if size < 0 or (n and total + size > _METRIC_BATCH):
                break
            n, total = n + 1, total + size
        return n

    def _drain_pending(self, deadline: float | None) -> bool:
        while self._pending:
            if deadline is not None and time.monotonic() >= deadline:
                return False
            n = self._next_batch()
            items = [self._pending[i] for i in range(n)]
            try:
                self._send(items)
            except Exception as err:  # noqa: BLE001
                if _is_permanent(err):
                    if n > 1:  # one call in the merged batch was rejected: retry them one by one
                        self._solo_left = n
                        continue
                    # Retrying cannot help (e.g. a param logged earlier with another value): drop this call only.
                    _warn(f"MLflow rejected a {items[0][0]} call, skipped: {str(err).splitlines()[0][:300]}")
                    self._pending.popleft()
                    self._solo_left = max(0, self._solo_left - 1)
                    continue
                if not self._failed_once:
                    _warn(f"MLflow call failed, will retry every {self._retry_s:g}s: {_one_line(err)}")
                    self._failed_once = True
                return False
            for _ in range(n):
                self._pending.popleft()
            self._solo_left = max(0, self._solo_left - n)
        if self._failed_once:
            _warn("MLflow reachable again; delayed points delivered")
            self._failed_once = False
        return True

    def _accept(self, item: Item) -> None:
        if len(self._pending) == self._pending.maxlen and not self._dropped_warned:
            _warn("tracking backlog full: oldest points are being dropped")
            self._dropped_warned = True
        self._pending.append(item)

    def _collect(self, wait: float | None) -> bool:
        """Move queued calls to the pending list (waiting up to ``wait`` s for the first one).
        Returns True once close() was called."""
        try:
            item = self._queue.get(timeout=wait)
            while True:
                if item is None:
                    return True
                self._accept(item)
                item = self._queue.get_nowait()
        except queue.Empty:
            return False

    def _worker(self) -> None:
        next_try = 0.0
        deadline: float | None = None  # set once close() was called
        while True:
            if deadline is None:
                wait = None if not self._pending else max(0.0, next_try - time.monotonic())
                if self._collect(wait):
                    deadline = self._deadline if self._deadline is not None else time.monotonic()
                elif time.monotonic() < next_try:
                    continue  # backing off after a failure; keep collecting points
            if self._drain_pending(deadline):
                if deadline is not None:
                    return
                continue
            next_try = time.monotonic() + self._retry_s
            if deadline is not None:
                # Closing: keep trying at a short cadence until the deadline, then give up.
                left = deadline - time.monotonic()
                if left <= 0:
                    return
                time.sleep(min(self._retry_s, 1.0, left))


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
    or attached, so the caller can persist the id before anything else can fail.

    A ``tracking.uri`` whose scheme MLflow cannot handle raises :class:`ConfigError` on every rank
    (so no rank waits for one that stopped), before any thread starts."""
    if not cfg.enabled:
        return Tracker()
    uri = resolve_uri(cfg.uri)
    validate_uri(uri)
    if not is_main:
        return Tracker()
    return MlflowTracker(cfg.model_copy(update={"uri": uri}), run_id=run_id, run_name=run_name, on_run_id=on_run_id)


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
