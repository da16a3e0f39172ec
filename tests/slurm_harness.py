"""Start and stop a four-node SLURM 22.05 cluster (with accounting) on this one machine.

Test tooling, not part of the product (it lives under tests/, outside the installed packages).

    python -m tests.slurm_harness install          # apt packages (idempotent, needs root)
    python -m tests.slurm_harness start            # idempotent; prints the SLURM_CONF to export
    python -m tests.slurm_harness status           # exit 0 when every daemon runs and 4 nodes answer
    python -m tests.slurm_harness stop             # stops exactly the daemons this harness started
    python -m tests.slurm_harness ensure           # install + /etc/hosts + start (`make slurm-dev`)
    python -m tests.slurm_harness ensure --if-ci   # the same only when CI=true, else nothing (`make test`)

Only CI (``CI=true``) or an explicit ``make slurm-dev`` may change the machine (apt, /etc/hosts,
/etc/slurm/slurm.conf). Elsewhere the SLURM tests start an already installed cluster without touching
the system, or skip with one line saying how to get one (``tests/integration/conftest.py``).

Layout: MariaDB (private port and data dir) ← slurmdbd ← slurmctld ← slurmd × 4. Accounting is not
optional: submitit polls job state with ``sacct``; without it a job's state stays UNKNOWN and waiting
on a cancelled job hangs. The four "nodes" are slurmd daemons on 127.0.0.1 with distinct ports
(``slurmd -N nodeK``); their names must resolve, so ``node1..node4`` are added to /etc/hosts
(submitit uses the first node name as the master address). Authentication is ``auth/none``
(no munge). Every daemon runs in the foreground (``-D``) in its own session and its PID is recorded,
so ``stop`` signals exactly those processes and nothing else.

Client commands (sbatch, sacct, squeue) find the cluster through ``SLURM_CONF``; ``start`` also links
/etc/slurm/slurm.conf to it when that file is absent (or already our link), so plain commands work
(not with ``change_system=False``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

PACKAGES = ("slurmctld", "slurmd", "slurm-client", "slurmdbd", "mariadb-server")
BINARIES = (
    "slurmctld",
    "slurmd",
    "slurmdbd",
    "sbatch",
    "srun",
    "sacct",
    "sinfo",
    "mariadbd",
    "mysql_install_db",
)
DEFAULT_STATE_DIR = Path("/tmp/iddpm-slurm")
CLUSTER_NAME = "iddpm-dev"
PARTITION = "debug"
NODES = ("node1", "node2", "node3", "node4")
SYSTEM_CONF = Path("/etc/slurm/slurm.conf")
HOSTS_FILE = Path("/etc/hosts")
HOSTS_MARK = "# iddpm-slurm dev nodes"


class HarnessError(RuntimeError):
    """The local cluster could not be installed, started or stopped; the message says why."""


@dataclass(frozen=True)
class Ports:
    # Away from common services; 2024 is taken on these machines.
    mariadb: int = 16306
    slurmdbd: int = 16819
    slurmctld: int = 16817
    slurmd: tuple[int, ...] = (16901, 16902, 16903, 16904)


@dataclass(frozen=True)
class NodeShape:
    cpus: int = 4
    """CPUs each node advertises (oversubscribing this machine is fine for tiny test jobs)."""
    memory_mb: int = 8000


@dataclass
class LocalCluster:
    state_dir: Path = DEFAULT_STATE_DIR
    ports: Ports = field(default_factory=Ports)
    shape: NodeShape = field(default_factory=NodeShape)
    cred_expire_s: int = 10
    """A requeued job waits ``cred_expire + 1`` s before it may start again (default 121 s)."""

    # ------------------------------------------------------------------ paths

    @property
    def conf(self) -> Path:
        return self.state_dir / "etc" / "slurm.conf"

    @property
    def dbd_conf(self) -> Path:
        # slurmdbd has no -f option: it reads slurmdbd.conf next to $SLURM_CONF.
        return self.conf.parent / "slurmdbd.conf"

    @property
    def log_dir(self) -> Path:
        return self.state_dir / "log"

    @property
    def pid_file(self) -> Path:
        return self.state_dir / "pids.json"

    @property
    def mysql_dir(self) -> Path:
        return self.state_dir / "mysql"

    @property
    def mysql_socket(self) -> Path:
        return self.state_dir / "run" / "mysqld.sock"

    def env(self) -> dict[str, str]:
        """Environment a client (sbatch, sacct, submitit) needs to talk to this cluster."""
        return {"SLURM_CONF": str(self.conf)}

    def _daemon_env(self) -> dict[str, str]:
        return {**os.environ, **self.env()}

    # ------------------------------------------------------------------ config files

    def slurm_conf_text(self) -> str:
        s = self.state_dir
        node_lines = [
            f"NodeName={name} NodeHostname=localhost NodeAddr=127.0.0.1 Port={port} "
            f"CPUs={self.shape.cpus} RealMemory={self.shape.memory_mb} State=UNKNOWN"
            for name, port in zip(NODES, self.ports.slurmd, strict=True)
        ]
        lines = [
            f"ClusterName={CLUSTER_NAME}",
            "SlurmctldHost=localhost(127.0.0.1)",
            f"SlurmctldPort={self.ports.slurmctld}",
            "SlurmUser=root",
            "SlurmdUser=root",
            "AuthType=auth/none",
            "CredType=cred/none",
            f"AuthInfo=cred_expire={self.cred_expire_s}",
            f"StateSaveLocation={s}/ctld",
            f"SlurmdSpoolDir={s}/spool/%n",
            f"SlurmdPidFile={s}/run/slurmd-%n.pid",
            f"SlurmdLogFile={s}/log/slurmd-%n.log",
            f"SlurmctldPidFile={s}/run/slurmctld.pid",
            f"SlurmctldLogFile={s}/log/slurmctld.log",
            "SlurmdParameters=config_overrides",
            "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_CPU_Memory",
            "SchedulerType=sched/backfill",
            "MpiDefault=none",
            "SwitchType=switch/none",
            "JobAcctGatherType=jobacct_gather/none",
            "JobCompType=jobcomp/none",
            "AccountingStorageType=accounting_storage/slurmdbd",
            "AccountingStorageHost=127.0.0.1",
            f"AccountingStoragePort={self.ports.slurmdbd}",
            # An impossible request fails at sbatch time instead of pending forever.
            "EnforcePartLimits=ALL",
            "ReturnToService=2",
            # Short waits so cancel/requeue round trips stay quick in tests.
            "KillWait=5",
            "MinJobAge=600",
            "InactiveLimit=0",
            "SlurmctldTimeout=30",
            "SlurmdTimeout=60",
            "SchedulerParameters=sched_interval=2",
            *node_lines,
            f"PartitionName={PARTITION} Nodes=node[1-{len(NODES)}] Default=YES MaxTime=INFINITE State=UP",
        ]
        return "\n".join(lines) + "\n"

    def dbd_conf_text(self) -> str:
        s = self.state_dir
        return (
            "\n".join(
                [
                    "AuthType=auth/none",
                    "DbdHost=localhost",
                    "DbdAddr=127.0.0.1",
                    f"DbdPort={self.ports.slurmdbd}",
                    "SlurmUser=root",
                    f"LogFile={s}/log/slurmdbd.log",
                    f"PidFile={s}/run/slurmdbd.pid",
                    "StorageType=accounting_storage/mysql",
                    "StorageHost=127.0.0.1",
                    f"StoragePort={self.ports.mariadb}",
                    "StorageUser=slurm",
                    "StoragePass=slurmdev",
                    "StorageLoc=slurm_acct_db",
                ]
            )
            + "\n"
        )

    def write_configs(self) -> None:
        for sub in ("etc", "log", "run", "ctld", "spool"):
            (self.state_dir / sub).mkdir(parents=True, exist_ok=True)
        self.conf.write_text(self.slurm_conf_text())
        self.dbd_conf.write_text(self.dbd_conf_text())
        self.dbd_conf.chmod(0o600)  # slurmdbd refuses a readable file (it holds the DB password)

    # ------------------------------------------------------------------ processes

    def _pids(self) -> dict[str, int]:
        if not self.pid_file.is_file():
            return {}
        return {k: int(v) for k, v in json.loads(self.pid_file.read_text()).items()}

    def _save_pids(self, pids: dict[str, int]) -> None:
        tmp = self.pid_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(pids, indent=1))
        tmp.replace(self.pid_file)

    def _spawn(self, name: str, argv: list[str]) -> int:
        log = (self.log_dir / f"{name}.stdout").open("ab")
        # Own session: the daemons outlive this process and are not hit by signals to its group.
        proc = subprocess.Popen(
            argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            env=self._daemon_env(), start_new_session=True,
        )  # fmt: skip
        log.close()
        pids = self._pids()
        pids[name] = proc.pid
        self._save_pids(pids)
        return proc.pid

    def daemons(self) -> dict[str, list[str]]:
        """Name → argv of every daemon, in start order."""
        mysql = [
            shutil.which("mariadbd") or "mariadbd",
            "--no-defaults",
            "--user=root",
            f"--datadir={self.mysql_dir}",
            f"--socket={self.mysql_socket}",
            f"--port={self.ports.mariadb}",
            "--bind-address=127.0.0.1",
            f"--pid-file={self.state_dir / 'run' / 'mariadb.pid'}",
            f"--log-error={self.log_dir / 'mariadb.log'}",
            "--innodb-buffer-pool-size=64M",
            "--innodb-log-file-size=16M",
            "--innodb-flush-log-at-trx-commit=2",
            "--skip-log-bin",
        ]
        out = {
            "mariadb": mysql,
            "slurmdbd": [shutil.which("slurmdbd") or "slurmdbd", "-D"],
            "slurmctld": [shutil.which("slurmctld") or "slurmctld", "-D", "-f", str(self.conf)],
        }
        for node in NODES:
            out[f"slurmd-{node}"] = [
                shutil.which("slurmd") or "slurmd",
                "-D",
                "-N",
                node,
                "-f",
                str(self.conf),
            ]
        return out

    def _running(self, name: str, pid: int) -> bool:
        """True when ``pid`` is alive and still is the daemon we started (PIDs get reused)."""
        proc = Path(f"/proc/{pid}")
        try:
            stat = (proc / "stat").read_text()
            cmdline = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            return False
        if stat.rsplit(")", 1)[1].split()[0] == "Z":
            with contextlib.suppress(ChildProcessError):  # our own child that died: reap it
                os.waitpid(pid, os.WNOHANG)
            return False
        binary = Path(cmdline[0].decode(errors="replace")).name if cmdline and cmdline[0] else ""
        expected = Path(self.daemons()[name][0]).name
        if binary != expected:
            return False
        return not name.startswith("slurmd-") or name.removeprefix("slurmd-").encode() in cmdline

    def running(self) -> dict[str, bool]:
        pids = self._pids()
        return {name: name in pids and self._running(name, pids[name]) for name in self.daemons()}

    # ------------------------------------------------------------------ lifecycle

    def start(self, timeout_s: float = 90.0, change_system: bool = True) -> None:
        """Bring every daemon up (those already running are left alone) and wait for 4 idle nodes.

        With ``change_system=False`` nothing outside the state directory is written: node names must
        already resolve, and clients find the cluster through ``SLURM_CONF`` only.
        """
        missing = [b for b in BINARIES if shutil.which(b) is None]
        if missing:
            raise HarnessError(f"SLURM not installed (missing {', '.join(missing)}): run `{_self_cmd('install')}`")
        if os.geteuid() != 0:
            raise HarnessError("the local SLURM cluster runs its daemons as root: run as root")
        if change_system:
            ensure_hosts()
        elif unresolved_nodes():
            raise HarnessError(f"{', '.join(unresolved_nodes())} do not resolve (add them to {HOSTS_FILE})")
        self.write_configs()
        if change_system:
            link_system_conf(self.conf)
        deadline = time.monotonic() + timeout_s
        up = self.running()
        argv = self.daemons()
        if not up["mariadb"]:
            self._init_mysql()
            self._spawn("mariadb", argv["mariadb"])
        _wait_port(self.ports.mariadb, deadline, "mariadb", self.log_dir / "mariadb.log")
        self._grant_slurm_user()
        if not up["slurmdbd"]:
            self._spawn("slurmdbd", argv["slurmdbd"])
        _wait_port(self.ports.slurmdbd, deadline, "slurmdbd", self.log_dir / "slurmdbd.log")
        self._register_cluster(deadline)
        if not up["slurmctld"]:
            self._spawn("slurmctld", argv["slurmctld"])
        _wait_port(self.ports.slurmctld, deadline, "slurmctld", self.log_dir / "slurmctld.log")
        for node in NODES:
            if not up[f"slurmd-{node}"]:
                self._spawn(f"slurmd-{node}", argv[f"slurmd-{node}"])
        self._wait_nodes(deadline)

    def _init_mysql(self) -> None:
        if (self.mysql_dir / "mysql").is_dir():
            return
        self.mysql_dir.mkdir(parents=True, exist_ok=True)
        _run(
            ["mysql_install_db", "--no-defaults", "--user=root", f"--datadir={self.mysql_dir}",
             "--auth-root-authentication-method=normal", "--skip-test-db"],
            "mysql_install_db",
        )  # fmt: skip

    def _grant_slurm_user(self) -> None:
        sql = (
            "CREATE USER IF NOT EXISTS 'slurm'@'127.0.0.1' IDENTIFIED BY 'slurmdev'; "
            "GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1'; FLUSH PRIVILEGES;"
        )
        client = shutil.which("mariadb") or "mysql"
        _run(
            [client, "--no-defaults", f"--socket={self.mysql_socket}", "-u", "root", "-e", sql],
            "mariadb grant",
        )

    def _register_cluster(self, deadline: float) -> None:
        env = self._daemon_env()
        while True:
            listed = subprocess.run(
                ["sacctmgr", "-n", "-P", "list", "cluster", "format=cluster"],
                capture_output=True, text=True, env=env, timeout=30,
            )  # fmt: skip
            if listed.returncode == 0:
                break
            if time.monotonic() > deadline:
                raise HarnessError(f"sacctmgr cannot reach slurmdbd: {listed.stderr.strip()}")
            time.sleep(0.5)
        if CLUSTER_NAME not in listed.stdout.split():
            _run(["sacctmgr", "-i", "add", "cluster", CLUSTER_NAME], "sacctmgr add cluster", env=env)

    def _wait_nodes(self, deadline: float) -> None:
        env = self._daemon_env()
        states: list[str] = []
        while time.monotonic() < deadline:
            out = subprocess.run(
                ["sinfo", "-h", "-N", "-o", "%N %t"], capture_output=True, text=True, env=env, timeout=30
            )
            states = out.stdout.split("\n") if out.returncode == 0 else []
            ready = {line.split()[0] for line in states if len(line.split()) == 2 and line.split()[1] in _READY}
            if ready >= set(NODES):
                return
            time.sleep(0.5)
        raise HarnessError(f"nodes not ready after start: {'; '.join(s for s in states if s) or 'no sinfo output'}")

    def stop(self, timeout_s: float = 30.0) -> list[str]:
        """Cancel jobs, then stop the recorded daemons (reverse start order). Returns the names stopped."""
        pids = self._pids()
        alive = {name: pid for name, pid in pids.items() if name in self.daemons() and self._running(name, pid)}
        if alive.get("slurmctld"):
            # Job steps (slurmstepd + tasks) are detached from slurmd; cancel them while the controller runs.
            subprocess.run(["scancel", "--full", "--user", "root"], env=self._daemon_env(), capture_output=True)
            self._wait_no_jobs(time.monotonic() + 15)
        stopped: list[str] = []
        for name in reversed(list(self.daemons())):
            pid = alive.get(name)
            if pid is None:
                continue
            os.kill(pid, signal.SIGTERM)
            end = time.monotonic() + timeout_s
            while self._running(name, pid) and time.monotonic() < end:
                time.sleep(0.1)
            if self._running(name, pid):
                os.kill(pid, signal.SIGKILL)
            stopped.append(name)
        if self.pid_file.exists():
            self.pid_file.unlink()
        return stopped

    def _wait_no_jobs(self, deadline: float) -> None:
        while time.monotonic() < deadline:
            out = subprocess.run(["squeue", "-h", "-o", "%i"], capture_output=True, text=True, env=self._daemon_env())
            if out.returncode != 0 or not out.stdout.strip():
                return
            time.sleep(0.5)

    def is_up(self) -> bool:
        if not all(self.running().values()):
            return False
        out = subprocess.run(
            ["sinfo", "-h", "-N", "-o", "%N %t"], capture_output=True, text=True, env=self._daemon_env()
        )
        ready = {ln.split()[0] for ln in out.stdout.splitlines() if len(ln.split()) == 2 and ln.split()[1] in _READY}
        return out.returncode == 0 and ready >= set(NODES)


# Node states from `sinfo %t` that accept jobs (allocated/mixed nodes are up, just busy).
_READY = frozenset({"idle", "alloc", "mix", "comp"})


def installed() -> bool:
    return all(shutil.which(b) for b in BINARIES)


def install() -> None:
    """apt-get the packages unless every binary is already there (needs root and a package mirror)."""
    if installed():
        return
    if os.geteuid() != 0:
        raise HarnessError("installing SLURM needs root (apt-get)")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    _run(["apt-get", "update", "-qq"], "apt-get update", env=env)
    _run(["apt-get", "install", "-y", "-qq", "--no-install-recommends", *PACKAGES], "apt-get install", env=env)


def unresolved_nodes() -> list[str]:
    """Node names that do not resolve here (each must, as submitit uses the first as MASTER_ADDR)."""
    unresolved = []
    for node in NODES:
        try:
            socket.gethostbyname(node)
        except OSError:
            unresolved.append(node)
    return unresolved


def ensure_hosts(hosts_file: Path = HOSTS_FILE) -> None:
    """Make node1..node4 resolve to 127.0.0.1 (submitit uses the first node name as MASTER_ADDR)."""
    if unresolved_nodes():
        with hosts_file.open("a") as f:
            f.write(f"127.0.0.1 {' '.join(NODES)} {HOSTS_MARK}\n")


def link_system_conf(conf: Path, system_conf: Path = SYSTEM_CONF) -> None:
    """Point /etc/slurm/slurm.conf at ours, unless it is someone else's real file."""
    if system_conf.is_symlink() and Path(os.readlink(system_conf)) == conf:
        return
    if system_conf.exists() or system_conf.is_symlink():
        if system_conf.is_symlink() and str(os.readlink(system_conf)).startswith(str(conf.parent.parent)):
            system_conf.unlink()
        else:
            return  # a real configuration: leave it; clients then need SLURM_CONF
    system_conf.parent.mkdir(parents=True, exist_ok=True)
    system_conf.symlink_to(conf)


SETUP_HINT = "run `make slurm-dev` (installs SLURM + MariaDB with apt, edits /etc/hosts; root) then `make test`"


def should_prepare(env: Mapping[str, str]) -> bool:
    """Whether ``make test`` may change this machine (apt, /etc/hosts) to get a cluster: only under CI.

    CI sets ``CI=true``; there the SLURM tests must run, so a cluster that cannot start fails them.
    """
    return env.get("CI", "").strip().lower() in ("1", "true", "yes")


def blocker_without_changes(*, is_installed: bool, nodes_resolve: bool, is_root: bool) -> str | None:
    """Why the cluster cannot start without changing this machine, or None when it can."""
    if not is_installed:
        return "SLURM is not installed"
    if not nodes_resolve:
        return f"{', '.join(NODES)} do not resolve"
    if not is_root:
        return "the local SLURM cluster runs its daemons as root"
    return None


def ensure(cluster: LocalCluster) -> int:
    """Install (apt) when needed, make the node names resolve, and start the cluster; exit status."""
    t0 = time.monotonic()
    try:
        install()
        cluster.start()
    except HarnessError as err:
        print(f"error: local SLURM cluster unavailable: {err}", file=sys.stderr)
        return 1
    print(f"local SLURM cluster up ({time.monotonic() - t0:.1f} s); SLURM_CONF={cluster.conf}")
    return 0


def _run(argv: list[str], what: str, env: dict[str, str] | None = None) -> None:
    proc = subprocess.run(argv, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        detail = (proc.stderr or proc.stdout).strip().splitlines()
        raise HarnessError(f"{what} failed (exit {proc.returncode}): {detail[-1] if detail else 'no output'}")


def _wait_port(port: int, deadline: float, name: str, log: Path) -> None:
    while time.monotonic() < deadline:
        with socket.socket() as s:
            s.settimeout(0.5)
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    tail = log.read_text(errors="replace").strip().splitlines()[-1:] if log.is_file() else []
    raise HarnessError(f"{name} did not listen on port {port}: {tail[0] if tail else f'see {log}'}")


def _self_cmd(verb: str) -> str:
    return f"python -m tests.slurm_harness {verb}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.slurm_harness", description=__doc__.split("\n")[0])
    parser.add_argument("command", choices=["install", "start", "stop", "status", "env", "ensure"])
    parser.add_argument("--state-dir", type=Path, default=DEFAULT_STATE_DIR)
    parser.add_argument(
        "--if-ci", action="store_true", help="ensure: do nothing unless CI=true (the SLURM tests then skip)"
    )
    args = parser.parse_args(argv)
    cluster = LocalCluster(state_dir=args.state_dir)
    try:
        if args.command == "ensure":
            # Outside CI `make test` leaves the machine alone; the test run prints how to get a cluster.
            if args.if_ci and not should_prepare(os.environ):
                return 0
            return ensure(cluster)
        if args.command == "install":
            install()
            print("SLURM packages installed")
        elif args.command == "start":
            t0 = time.monotonic()
            cluster.start()
            print(f"cluster up in {time.monotonic() - t0:.1f} s; export SLURM_CONF={cluster.conf}")
        elif args.command == "stop":
            stopped = cluster.stop()
            print(f"stopped: {', '.join(stopped) or 'nothing was running'}")
        elif args.command == "env":
            print(f"export SLURM_CONF={cluster.conf}")
        else:
            for name, ok in cluster.running().items():
                print(f"{name:15s} {'running' if ok else 'stopped'}")
            up = cluster.is_up()
            print("cluster: up" if up else "cluster: down")
            return 0 if up else 1
    except HarnessError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
