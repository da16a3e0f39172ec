"""The local SLURM cluster for ``test_slurm*.py``: started once per session, stopped only if we started it.

Under CI (``CI=true``) the tests must run: ``make test`` first runs ``python -m tests.slurm_harness ensure
--if-ci`` (apt install, /etc/hosts), and a cluster that cannot start fails them. Elsewhere nothing on the
machine is changed: an installed cluster whose node names resolve is started (state under /tmp only),
otherwise the SLURM tests skip and the run ends with one line saying how to get a cluster.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from tests.slurm_harness import (
    SETUP_HINT,
    HarnessError,
    LocalCluster,
    blocker_without_changes,
    installed,
    should_prepare,
    unresolved_nodes,
)

_skip_cause: list[str] = []
"""Why the SLURM tests skipped this session (set once by the fixture, read by the terminal summary)."""


@pytest.fixture(scope="session")
def slurm_cluster() -> Iterator[LocalCluster]:
    cluster = LocalCluster()
    required = should_prepare(os.environ)
    blocker = blocker_without_changes(
        is_installed=installed(), nodes_resolve=not unresolved_nodes(), is_root=os.geteuid() == 0
    )
    # Under CI a blocker is not a reason to skip: start() below names it and the tests fail.
    if blocker and not required:
        _skip_cause.append(blocker)
        pytest.skip(f"no local SLURM cluster: {blocker}")
    was_up = cluster.is_up()
    try:
        # Only CI may edit /etc (hosts, slurm.conf link); elsewhere clients use SLURM_CONF below.
        cluster.start(change_system=required)
    except HarnessError as err:
        if required:
            pytest.fail(f"local SLURM cluster did not start: {err}")
        _skip_cause.append(f"it did not start: {err}")
        pytest.skip(f"local SLURM cluster did not start: {err}")
    # sbatch/sacct in this process (submitit) and in the jobs (scontrol requeue) find the cluster.
    previous = os.environ.get("SLURM_CONF")
    os.environ.update(cluster.env())
    yield cluster
    if previous is None:
        os.environ.pop("SLURM_CONF", None)
    else:
        os.environ["SLURM_CONF"] = previous
    if not was_up:
        cluster.stop()


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> Iterator[None]:
    # Outermost wrapper, so the line comes after pytest's short summary, just above the final counts:
    # one loud line instead of a quiet "s" that is easy to read as "the SLURM tests passed".
    yield
    skipped = [r for r in terminalreporter.stats.get("skipped", []) if "slurm" in getattr(r, "keywords", {})]
    if _skip_cause and skipped:
        terminalreporter.write_line(
            f"SLURM tests skipped ({len(skipped)}): no local cluster ({_skip_cause[0]}); {SETUP_HINT}",
            yellow=True,
            bold=True,
        )
