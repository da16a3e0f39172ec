"""The chaos run, short schedule (tests/chaos.py): 5 seeded faults over 60 tiny steps on 2 gloo ranks, one of
each kind that needs no tracking server (kill -9 between checkpoints and while one is written, the stop
signal, a full output directory for one checkpoint, a hung rank), relaunched with ``--resume auto`` after
each; it must end bitwise equal to the fault-free run, in one MLflow run with one loss point per step.
7 launches of ~40-60 s each on a loaded 2-core machine (measured 5-7.5 min at load average 8-10; the long schedule is
``python -m tests.chaos --faults 20 --steps 300``)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.chaos import KINDS, run_chaos
from trainer.watchdog import EXIT_HUNG

pytestmark = pytest.mark.slow


def test_short_chaos_schedule_ends_equal_to_the_fault_free_run(digits_shards: Path, tmp_path: Path) -> None:
    report = run_chaos(tmp_path, digits_shards, steps=60, faults=5, seed=1, mlflow_server=False)
    print(report.table())
    assert set(report.skipped_kinds) <= {"mlflow", "enospc"}, report.skipped_kinds
    planned = {f["kind"] for f in report.faults}
    assert planned == set(KINDS) - set(report.skipped_kinds), report.table()  # every kind struck once
    assert report.injected == len(report.faults) == 5, report.table()
    assert all(f["launch"] is not None for f in report.faults), report.table()
    for f in report.faults:
        codes = report.launches[f["launch"] - 1]["codes"]
        if f["kind"] == "hang":
            assert codes == [EXIT_HUNG, EXIT_HUNG], report.table()
        if f["kind"] == "stop":
            assert codes == [75, 75], report.table()
    assert report.launches[-1]["codes"] == [0, 0]
    assert report.steps_retrained > 0  # the hard faults lost steps, re-trained to the same values
    assert report.checks["state bitwise equal to the fault-free run"] is True, report.table()
    assert report.checks["one loss point per step"] is True, report.table()
    assert report.checks["losses equal the fault-free run's"] is True, report.table()
    assert report.checks["restart count recorded"] is True, report.table()
    assert report.passed, report.table()
