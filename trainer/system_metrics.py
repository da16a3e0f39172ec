"""System metrics (CPU, memory, disk, network; GPU utilisation, memory and power where NVML is present via
``nvidia-ml-py``), sampled with MLflow's own collectors on a daemon thread and handed to the tracker, which
logs them as ``system/<name>`` through its queue (so they obey the same outage rules and follow a run that
is only created later). MLflow's ``SystemMetricsMonitor`` is not used as is: it needs the run id up front,
calls ``get_run`` on every sample, stops for good at the first failure, and joins its thread without a
timeout. ``MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING=false`` turns them off.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

from trainer.console import one_line as _one_line
from trainer.console import warn


def _warn(msg: str) -> None:
    warn(f"[tracking] {msg}")


def system_metrics_disabled() -> bool:
    return os.environ.get("MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING", "").strip().lower() in ("false", "0")


class SystemMetricsSampler:
    """Samples MLflow's system-metric collectors on a daemon thread and hands each sample to ``emit``
    (no I/O here, so a dead server cannot stop or slow it)."""

    def __init__(self, interval_s: float, emit: Callable[[int, dict[str, float]], None]) -> None:
        self.interval_s = interval_s
        self._emit = emit
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="mlflow-system-metrics", daemon=True)
        self._thread.start()

    @staticmethod
    def _monitors() -> list[Any]:
        from mlflow.system_metrics.metrics.cpu_monitor import CPUMonitor
        from mlflow.system_metrics.metrics.disk_monitor import DiskMonitor
        from mlflow.system_metrics.metrics.gpu_monitor import GPUMonitor
        from mlflow.system_metrics.metrics.network_monitor import NetworkMonitor
        from mlflow.system_metrics.metrics.rocm_monitor import ROCMMonitor

        monitors: list[Any] = [CPUMonitor(), DiskMonitor(), NetworkMonitor()]
        errors = []
        for gpu_cls in (GPUMonitor, ROCMMonitor):  # MLflow's own order: NVIDIA, then AMD
            try:
                monitors.append(gpu_cls())
                break
            except Exception as err:  # noqa: BLE001 - no GPU, no driver or no bindings
                errors.append(_one_line(err))
        else:
            torch = sys.modules.get("torch")
            if torch is not None and torch.cuda.is_available():
                _warn(f"GPU system metrics unavailable: {errors[0]}")
        return monitors

    def _run(self) -> None:
        try:
            monitors = self._monitors()
            for m in monitors:  # the first CPU sample has no interval to measure: discard it
                m.collect_metrics()
                m.clear_metrics()
            while not self._stop.wait(self.interval_s):
                values: dict[str, float] = {}
                for m in monitors:
                    m.collect_metrics()
                    values.update(m.aggregate_metrics())
                    m.clear_metrics()
                self._emit(int(time.time() * 1000), values)
        except Exception as err:  # noqa: BLE001 - system metrics must never disturb training
            _warn(f"system metrics stopped: {_one_line(err)}")

    def stop(self, timeout_s: float) -> None:
        self._stop.set()
        self._thread.join(timeout_s)
