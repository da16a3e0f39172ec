"""Helpers shared by the SLURM and local-executor tests: launching submit.py and reading what it left."""

from __future__ import annotations

import re
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from tests.conftest import REPO, TINY_MODEL, child_env

# A model small enough that start-up dominates (same spirit as test_train_e2e.py).
TINY = [
    *TINY_MODEL,
    # Small enough that some rank often draws no t in a quarter of [0, T): the per-quarter loss metrics
    # must still reduce with the same shape on every rank (a mismatch hangs the job after step 1).
    "data.batch_size=8",
    "train.log_every=1",
]
SUBMIT = [sys.executable, "cluster/submit.py"]
STEP_RE = re.compile(r"^step (\d+)/(\d+) \|", re.MULTILINE)


class Launch:
    """``submit.py`` as a child process; every output line is kept with its arrival time."""

    def __init__(self, args: list[str]) -> None:
        self.t0 = time.monotonic()
        self.lines: list[tuple[float, str]] = []
        self.proc = subprocess.Popen(
            [*SUBMIT, *args],
            cwd=REPO,
            env=child_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append((time.monotonic() - self.t0, line))

    def wait(self, timeout: float) -> int:
        try:
            code = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            match = re.search(r"submitted job (\d+) \(slurm", self.text)
            if match:  # do not leave the job holding the test cluster's nodes
                subprocess.run(["scancel", match[1]], check=False)
            raise AssertionError(f"submit.py still running after {timeout} s:\n{self.text[-3000:]}") from None
        self._reader.join(timeout=10)
        return code

    @property
    def text(self) -> str:
        return "".join(line for _, line in self.lines)

    def first_time(self, pattern: str) -> float:
        """Seconds from launch to the first line matching ``pattern``."""
        for t, line in self.lines:
            if re.search(pattern, line):
                return t
        raise AssertionError(f"no line matches {pattern!r}:\n{self.text[-3000:]}")


def job_id_from(text: str) -> str:
    match = re.search(r"submitted job (\S+) ", text)
    assert match, text
    return match[1]


def wait_until(predicate: Any, timeout: float, what: str, poll_s: float = 0.25) -> float:
    """Poll until ``predicate()`` is truthy; returns the time it took."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if predicate():
            return time.monotonic() - t0
        time.sleep(poll_s)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def read(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except OSError:
        return ""


def logged_steps(text: str) -> list[int]:
    return [int(m[1]) for m in STEP_RE.finditer(text)]


def mlflow_single_run(uri: str, experiment: str) -> Any:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name(experiment)
    assert exp is not None, f"experiment {experiment!r} missing from {uri}"
    runs = client.search_runs([exp.experiment_id])
    assert len(runs) == 1, [r.info.run_id for r in runs]
    return client, runs[0]
