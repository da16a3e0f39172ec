"""A run's identity: its output directory, ``run_info.json``, its MLflow run and the scheduler's restart count.

``run_info.json`` (read by ``--resume auto`` and by ``cluster/``) holds the MLflow run id, the tracking URI
and the restart count. The run id is written the moment MLflow creates or re-attaches the run (from
whichever thread learns it), so a restart continues the same MLflow run even when the tracking server was
down when the run started; a known id is never replaced by None.
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from trainer import distributed
from trainer.config import ConfigError, TrackingConfig
from trainer.console import say
from trainer.state import TrainState
from trainer.tracking import Tracker, create_tracker, resolve_uri

RUN_INFO = "run_info.json"


def read_run_info(out: Path) -> dict[str, Any]:
    try:
        return json.loads((out / RUN_INFO).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return {}


def prepare_output_dir(out: Path, env: distributed.DistEnv) -> None:
    """Rank 0 creates ``train.output_dir``; every rank learns whether that worked (no one waits forever)."""
    error = None
    if env.is_main:
        try:
            out.mkdir(parents=True, exist_ok=True)
            probe = out / ".write_test"
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as err:
            error = f"train.output_dir={out}: cannot write there ({err.strerror or type(err).__name__})"
    error = distributed.broadcast_object(error, env.device)
    if error:
        raise ConfigError(error)


class RunIdentity:
    """Owns ``run_info.json`` and the run's tracker (rank 0's MLflow run; a no-op tracker elsewhere)."""

    def __init__(
        self,
        out: Path,
        tracking: TrackingConfig,
        state: TrainState,
        env: distributed.DistEnv,
        make_tracker: Callable[..., Tracker] = create_tracker,
    ) -> None:
        self.out, self.tracking, self.state, self.env = out, tracking, state, env
        self._make_tracker = make_tracker
        self.tracker: Tracker = Tracker()
        self._lock = threading.Lock()

    def known_run_id(self) -> str | None:
        """The MLflow run this output directory already belongs to, if any."""
        return read_run_info(self.out).get("mlflow_run_id")

    def start(self, run_id: str | None, params: dict[str, Any], config_yaml: str) -> Tracker:
        """Create (``run_id`` None: log ``params`` and the config) or re-attach the MLflow run; record the
        restart count. Returns the tracker, also kept as :attr:`tracker`."""
        fresh = run_id is None
        self.tracker = self._make_tracker(
            self.tracking, self.env.is_main, run_id, self.tracking.run_name, self._on_run_id
        )
        restarts = distributed.restart_count()
        self.record(restarts=restarts)
        if restarts:
            say(self.env.is_main, f"this job was restarted {restarts} time(s) by the scheduler")
        if fresh:
            self.tracker.log_params(params)
            self.tracker.log_artifact_bytes(config_yaml.encode(), "config/resolved.yaml")
        self.tracker.set_tags({"restarts": str(restarts), "world_size": str(self.env.world_size)})
        if self.tracker.ui_hint:
            say(self.env.is_main, self.tracker.ui_hint)
        return self.tracker

    @property
    def run_id(self) -> str | None:
        return self.tracker.run_id or self.state.mlflow_run_id

    def report_hang(self, where: Path) -> None:
        """Rank 0, before the process exits for a hang (:mod:`trainer.watchdog`): the stack dumps go to the MLflow
        run, which ends FAILED."""
        for f in sorted(where.iterdir()):
            self.tracker.log_artifact_file(f, f"hangs/{where.name}")
        self.tracker.close(status="FAILED")

    def _on_run_id(self, run_id: str) -> None:
        """Called by the tracker, from whichever thread learns the id: persist it at once."""
        self.state.mlflow_run_id = run_id
        self.record(mlflow_run_id=run_id)

    def record(self, **extra: Any) -> None:
        """Keep ``run_info.json`` up to date (rank 0). A known run id is never replaced by None, so a tracking
        outage cannot fork the MLflow run on restart."""
        if not self.env.is_main:
            return
        with self._lock:
            info = read_run_info(self.out)
            new = dict(info, tracking_uri=resolve_uri(self.tracking.uri), **extra)
            if self.state.mlflow_run_id:
                new["mlflow_run_id"] = self.state.mlflow_run_id
            if new != info:
                tmp = self.out / f".{RUN_INFO}.tmp"
                tmp.write_text(json.dumps(new, indent=2))
                os.replace(tmp, self.out / RUN_INFO)
