"""The local-SLURM harness without starting daemons: its configuration and what ``stop`` may signal."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from cluster.dev import harness
from cluster.dev.harness import HarnessError, LocalCluster


def conf_dict(text: str) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for line in text.splitlines():
        key, _, value = line.partition("=")
        out.setdefault(key, []).append(value)
    return out


def test_config_has_what_the_slurm_tests_rely_on(tmp_path: Path) -> None:
    cluster = LocalCluster(state_dir=tmp_path)
    conf = conf_dict(cluster.slurm_conf_text())
    assert conf["AuthInfo"] == ["cred_expire=10"]  # requeued jobs restart after 11 s, not 121 s
    assert conf["EnforcePartLimits"] == ["ALL"]  # impossible requests fail at sbatch
    assert conf["AccountingStorageType"] == ["accounting_storage/slurmdbd"]  # sacct → submitit job states
    assert conf["SlurmdSpoolDir"] == [f"{tmp_path}/spool/%n"]
    nodes = conf["NodeName"]
    assert [n.split()[0] for n in nodes] == list(harness.NODES)
    ports = [n.split("Port=")[1].split()[0] for n in nodes]
    assert len(set(ports)) == len(harness.NODES), "each slurmd needs its own port"
    cluster.write_configs()
    assert cluster.dbd_conf.stat().st_mode & 0o777 == 0o600  # slurmdbd refuses anything else
    assert cluster.dbd_conf.parent == cluster.conf.parent  # found next to $SLURM_CONF


def test_stop_only_signals_the_daemons_it_started(tmp_path: Path) -> None:
    cluster = LocalCluster(state_dir=tmp_path)
    stranger = subprocess.Popen(["sleep", "30"])
    try:
        # A recorded PID that now belongs to another program (PID reuse) must be left alone.
        cluster.pid_file.write_text(json.dumps({"slurmctld": stranger.pid, "slurmd-node1": stranger.pid}))
        assert cluster.running()["slurmctld"] is False
        assert cluster.stop() == []
        assert stranger.poll() is None, "stop() signalled a process it did not start"
        assert not cluster.pid_file.exists()
    finally:
        stranger.kill()
        stranger.wait()


class _Broken(LocalCluster):
    def start(self, timeout_s: float = 90.0) -> None:
        raise HarnessError("slurmctld did not listen on port 1")


def test_ensure_is_fatal_only_when_required(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(harness, "installed", lambda: True)
    assert harness.ensure(_Broken(state_dir=tmp_path), required=False) == 0
    assert "note: local SLURM cluster unavailable: slurmctld did not listen" in capsys.readouterr().err
    assert harness.ensure(_Broken(state_dir=tmp_path), required=True) == 1
    assert "error: local SLURM cluster unavailable" in capsys.readouterr().err
