"""The local SLURM cluster for ``test_slurm*.py``: started once per session, stopped only if we started it.

Without the SLURM packages (or root) the tests skip, except under CI (``CI=true``), where they must run:
CI calls ``python -m cluster.dev.harness ensure`` first, and a cluster that cannot start fails them.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from cluster.dev.harness import HarnessError, LocalCluster, installed


def _required() -> bool:
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


@pytest.fixture(scope="session")
def slurm_cluster() -> Iterator[LocalCluster]:
    cluster = LocalCluster()
    unavailable = None
    if not installed():
        unavailable = "SLURM is not installed (python -m cluster.dev.harness install)"
    elif os.geteuid() != 0:
        unavailable = "the local SLURM cluster needs root"
    if unavailable:
        if _required():
            pytest.fail(f"CI=true but {unavailable}")
        pytest.skip(unavailable)
    was_up = cluster.is_up()
    try:
        cluster.start()
    except HarnessError as err:
        if _required():
            pytest.fail(f"local SLURM cluster did not start: {err}")
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
