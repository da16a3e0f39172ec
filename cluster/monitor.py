"""Watching submitted jobs: the submission record, job states, and following rank 0's log.

Every submission leaves ``<job folder>/<job id>_submission.json`` next to submitit's own files; it is
how ``cluster/status.py`` finds this project's jobs and where their training output lives.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TextIO

RECORD_SUFFIX = "_submission.json"
RUN_INFO = "run_info.json"  # written by trainer.main in train.output_dir

# sacct states after which the job will not run again. PREEMPTED is missing on purpose: with
# requeue the job comes back (PREEMPTED → PENDING), so it only counts once it has lasted a while.
FINAL_STATES = frozenset(
    {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL", "BOOT_FAIL", "DEADLINE",
     "REVOKED", "SPECIAL_EXIT"}
)  # fmt: skip
PREEMPTED_FINAL_AFTER_S = 60.0


@dataclass
class SubmissionRecord:
    job_id: str
    executor: str
    """``slurm`` or ``local``."""
    job_name: str
    config: str
    overrides: list[str]
    output_dir: str
    """train.output_dir, absolute."""
    folder: str
    """The job's submitit folder (``%j`` resolved)."""
    folder_template: str
    """``cluster.folder`` as submitted, absolute (``%j`` kept)."""
    stdout: str
    stderr: str
    nodes: int
    tasks_per_node: int
    submitted_at: float
    tracking_uri: str
    experiment: str
    extra: dict[str, Any] = field(default_factory=dict)

    def path(self) -> Path:
        return Path(self.folder) / f"{self.job_id}{RECORD_SUFFIX}"

    def write(self) -> Path:
        path = self.path()
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(json.dumps(asdict(self), indent=2))
        os.replace(tmp, path)
        return path

    @classmethod
    def read(cls, path: Path) -> SubmissionRecord:
        return cls(**json.loads(path.read_text()))


def folder_root(folder_template: str | Path) -> Path:
    """The fixed part of a submitit folder template: ``runs/slurm/%j`` → ``runs/slurm``."""
    parts = Path(folder_template).parts
    fixed = []
    for part in parts:
        if "%" in part:
            break
        fixed.append(part)
    return Path(*fixed) if fixed else Path(".")


def find_records(root: Path) -> list[SubmissionRecord]:
    """Every submission recorded under ``root``, oldest first (unreadable files are skipped)."""
    records = []
    for path in root.rglob(f"*{RECORD_SUFFIX}"):
        try:
            records.append(SubmissionRecord.read(path))
        except (OSError, ValueError, TypeError):
            continue
    return sorted(records, key=lambda r: r.submitted_at)


def read_run_info(output_dir: str | Path) -> dict[str, Any]:
    """The trainer's ``run_info.json`` (MLflow run id, restarts), or {} before rank 0 wrote it."""
    try:
        return json.loads((Path(output_dir) / RUN_INFO).read_text())
    except (OSError, ValueError):
        return {}


def mlflow_link(tracking_uri: str, run_id: str) -> str:
    """A URL for an HTTP tracking server, else the command that opens a UI on the store."""
    if tracking_uri.startswith(("http://", "https://")):
        return f"{tracking_uri.rstrip('/')}/#/runs/{run_id}"
    return f"mlflow ui --backend-store-uri {tracking_uri}"


# ----------------------------------------------------------------------------------- job states


def slurm_states(job_ids: Iterable[str]) -> dict[str, str]:
    """Job id → state: ``squeue`` for jobs still known to the controller, else ``sacct``'s newest attempt.

    sacct alone misses held jobs (no eligible time yet, so no accounting record). States are reduced to
    their first word (``CANCELLED by 0`` → ``CANCELLED``). Empty when neither command answers.
    """
    ids = sorted({str(j) for j in job_ids})
    if not ids:
        return {}
    states = _query(["sacct", "-X", "-n", "-P", "-o", "JobID,State", "-j", ",".join(ids)], ids)
    states.update(_query(["squeue", "-h", "-o", "%i|%T", "-j", ",".join(ids)], ids))
    return states


def _query(argv: list[str], ids: list[str]) -> dict[str, str]:
    if shutil.which(argv[0]) is None:
        return {}
    # squeue exits non-zero when none of the ids is still queued: that is an empty answer, not an error.
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
    states: dict[str, str] = {}
    for line in proc.stdout.splitlines():
        job_id, _, state = line.partition("|")
        if job_id in ids and state:
            states[job_id] = state.split()[0]  # a requeued job lists its newest attempt last
    return states


def local_state(folder: Path, job_id: str) -> str:
    """State of a ``--local`` job from submitit's result pickle of rank 0."""
    result = folder / f"{job_id}_0_result.pkl"
    if not result.is_file():
        return "RUNNING" if _pid_alive(job_id) else "UNKNOWN"
    try:
        with result.open("rb") as f:
            outcome = pickle.load(f)[0]  # submitit's own file: ("success"|"error", payload)
    except (OSError, pickle.UnpicklingError, EOFError, IndexError):
        return "UNKNOWN"
    return "COMPLETED" if outcome == "success" else "FAILED"


def _pid_alive(job_id: str) -> bool:
    # A local job's id is its controller's PID.
    return job_id.isdigit() and Path(f"/proc/{job_id}").exists()


def record_state(record: SubmissionRecord, states: dict[str, str]) -> str:
    if record.executor == "local":
        return local_state(Path(record.folder), record.job_id)
    return states.get(record.job_id, "UNKNOWN")


# ----------------------------------------------------------------------------------- following


class LogTail:
    """Prints what is appended to a set of files (they may not exist yet)."""

    def __init__(self, paths: Iterable[Path], out: TextIO) -> None:
        self.offsets = {Path(p): 0 for p in paths}
        self.out = out

    def poll(self) -> None:
        for path, offset in self.offsets.items():
            try:
                size = path.stat().st_size
            except OSError:
                continue
            if size < offset:  # truncated: start over
                offset = 0
            if size == offset:
                continue
            with path.open("rb") as f:
                f.seek(offset)
                chunk = f.read(size - offset)
            # Print whole lines only; a partial last line waits for its newline.
            cut = chunk.rfind(b"\n") + 1
            if cut:
                self.out.write(chunk[:cut].decode(errors="replace"))
                self.out.flush()
            self.offsets[path] = offset + cut


def follow(
    state_of: Callable[[], str],
    logs: Iterable[Path],
    output_dir: Path,
    tracking_uri: str,
    out: TextIO | None = None,
    poll_s: float = 1.0,
    state_every_s: float = 3.0,
    timeout_s: float | None = None,
) -> str:
    """Tail ``logs`` until ``state_of()`` reports a final state; return it.

    Also announces the MLflow run id as soon as rank 0 (re)writes ``run_info.json``.
    """
    out = out or sys.stdout
    tail = LogTail(logs, out)
    info_path = output_dir / RUN_INFO
    info_mtime = info_path.stat().st_mtime if info_path.exists() else 0.0
    start = time.monotonic()
    last_check = -state_every_s
    state, preempted_since = "PENDING", None
    while True:
        tail.poll()
        if info_path.exists() and info_path.stat().st_mtime > info_mtime:
            info_mtime = info_path.stat().st_mtime
            run_id = read_run_info(output_dir).get("mlflow_run_id")
            if run_id:
                out.write(f"[submit] MLflow run {run_id}  ({mlflow_link(tracking_uri, run_id)})\n")
                out.flush()
        now = time.monotonic()
        if now - last_check >= state_every_s:
            last_check = now
            state = state_of()
            if state == "PREEMPTED":
                preempted_since = preempted_since or now
                if now - preempted_since >= PREEMPTED_FINAL_AFTER_S:
                    break
            else:
                preempted_since = None
            if state in FINAL_STATES:
                break
        if timeout_s is not None and now - start > timeout_s:
            return f"{state} (stopped following after {timeout_s:.0f} s)"
        time.sleep(poll_s)
    time.sleep(poll_s)  # the last lines can land just after the state flips
    tail.poll()
    return state
