"""The local-SLURM harness without starting daemons: its configuration, what ``stop`` may signal, when
``make test`` may change the machine, and that the harness stays out of the installed packages."""

from __future__ import annotations

import ast
import json
import subprocess
from pathlib import Path

import pytest
import setuptools

from tests import slurm_harness as harness
from tests.conftest import REPO
from tests.slurm_harness import HarnessError, LocalCluster


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


def test_ensure_fails_loudly_when_the_cluster_cannot_start(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(harness, "installed", lambda: True)
    assert harness.ensure(_Broken(state_dir=tmp_path)) == 1
    assert "error: local SLURM cluster unavailable: slurmctld did not listen" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({}, False),
        ({"CI": ""}, False),
        ({"CI": "false"}, False),
        ({"CI": "0"}, False),
        ({"CI": "true"}, True),
        ({"CI": "TRUE"}, True),
        ({"CI": "1"}, True),
        ({"CI": "yes"}, True),
    ],
)
def test_only_ci_may_change_the_machine(env: dict[str, str], expected: bool) -> None:
    assert harness.should_prepare(env) is expected


def test_what_blocks_a_cluster_that_needs_no_changes() -> None:
    assert harness.blocker_without_changes(is_installed=True, nodes_resolve=True, is_root=True) is None
    assert harness.blocker_without_changes(is_installed=False, nodes_resolve=True, is_root=True) == (
        "SLURM is not installed"
    )
    assert "do not resolve" in str(
        harness.blocker_without_changes(is_installed=True, nodes_resolve=False, is_root=True)
    )
    assert "root" in str(harness.blocker_without_changes(is_installed=True, nodes_resolve=True, is_root=False))


def test_ensure_if_ci_leaves_the_machine_alone_outside_ci(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str] = []
    monkeypatch.setattr(harness, "install", lambda: calls.append("install"))
    monkeypatch.setattr(LocalCluster, "start", lambda self, **_: calls.append("start"))
    monkeypatch.delenv("CI", raising=False)
    assert harness.main(["ensure", "--if-ci"]) == 0
    assert calls == []
    monkeypatch.setenv("CI", "true")
    assert harness.main(["ensure", "--if-ci"]) == 0
    assert calls == ["install", "start"]


def test_start_without_system_changes_writes_nothing_outside_its_state_dir(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Refuse before any daemon starts: the binaries "exist", the node names do not resolve.
    monkeypatch.setattr(harness.shutil, "which", lambda name: f"/usr/sbin/{name}")
    monkeypatch.setattr(harness.os, "geteuid", lambda: 0)
    monkeypatch.setattr(harness, "unresolved_nodes", lambda: list(harness.NODES))
    monkeypatch.setattr(harness, "ensure_hosts", lambda *a: pytest.fail("edited /etc/hosts"))
    monkeypatch.setattr(harness, "link_system_conf", lambda *a: pytest.fail("linked /etc/slurm/slurm.conf"))
    with pytest.raises(HarnessError, match="do not resolve"):
        LocalCluster(state_dir=tmp_path).start(change_system=False)


def test_the_installed_packages_do_not_ship_the_harness() -> None:
    assert not (REPO / "cluster" / "dev").exists(), "the SLURM test harness moved to tests/slurm_harness.py"
    product = [p for pkg in ("trainer", "data_prep", "cluster") for p in sorted((REPO / pkg).rglob("*.py"))]
    assert product
    offenders = []
    for path in product:
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            names = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            offenders += [
                f"{path.relative_to(REPO)}: {n}" for n in names if n.split(".")[0] == "tests" or "harness" in n
            ]
    assert not offenders, offenders


def test_package_discovery_leaves_the_tests_out() -> None:
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    find = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]
    # setuptools' pyproject discovery is namespace-aware by default, so any leftover folder would count.
    finder = setuptools.find_namespace_packages if find.get("namespaces", True) else setuptools.find_packages
    packages = finder(where=str(REPO), include=find["include"], exclude=find.get("exclude", ()))
    assert "cluster" in packages
    assert not [p for p in packages if p.split(".")[0] == "tests" or p.startswith("cluster.dev")], packages
