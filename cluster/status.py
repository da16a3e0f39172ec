"""List this project's submitted jobs and their state.

    python -m cluster.status                      # jobs under runs/slurm (cluster.folder's default)
    python -m cluster.status --folder /scratch/me/slurm --json

Jobs are found through the records ``submit.py`` writes next to submitit's files; states come from one
``squeue`` and one ``sacct`` call (local jobs: from their result files). The MLflow run id and restart count come from
the trainer's ``run_info.json`` in each job's output directory.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse
import json
import time
from dataclasses import dataclass
from typing import Any

from cluster import monitor
from trainer.config import ClusterConfig


@dataclass(frozen=True)
class JobRow:
    job_id: str
    name: str
    executor: str
    state: str
    tasks: str
    submitted: str
    restarts: int | None
    mlflow_run_id: str | None
    output_dir: str
    log: str

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def collect(root: Path) -> list[JobRow]:
    records = monitor.find_records(root)
    states = monitor.slurm_states(r.job_id for r in records if r.executor == "slurm")
    rows = []
    for r in records:
        info = monitor.read_run_info(r.output_dir)
        rows.append(
            JobRow(
                job_id=r.job_id,
                name=r.job_name,
                executor=r.executor,
                state=monitor.record_state(r, states),
                tasks=f"{r.nodes}x{r.tasks_per_node}",
                submitted=time.strftime("%Y-%m-%d %H:%M", time.localtime(r.submitted_at)),
                restarts=info.get("restarts"),
                mlflow_run_id=info.get("mlflow_run_id"),
                output_dir=r.output_dir,
                log=r.stdout,
            )
        )
    return rows


def format_table(rows: list[JobRow]) -> str:
    header = ("JOB", "NAME", "EXEC", "STATE", "TASKS", "SUBMITTED", "RESTARTS", "MLFLOW RUN", "OUTPUT")
    body = [
        (
            r.job_id,
            r.name,
            r.executor,
            r.state,
            r.tasks,
            r.submitted,
            "-" if r.restarts is None else str(r.restarts),
            r.mlflow_run_id or "-",
            r.output_dir,
        )  # fmt: skip
        for r in rows
    ]
    widths = [max(len(str(row[i])) for row in [header, *body]) for i in range(len(header))]
    return "\n".join(
        "  ".join(str(v).ljust(w) for v, w in zip(row, widths, strict=True)).rstrip() for row in [header, *body]
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m cluster.status", description=__doc__.split("\n")[0])
    default_root = monitor.folder_root(ClusterConfig().folder)
    p.add_argument("--folder", type=Path, default=default_root, help="submitit folder root (default: %(default)s)")
    p.add_argument("--json", action="store_true", help="one JSON object per job")
    args = p.parse_args(argv)
    root = monitor.folder_root(args.folder)
    if not root.is_dir():
        print(f"error: no such folder: {root}", file=sys.stderr)
        return 2
    rows = collect(root)
    if args.json:
        for row in rows:
            print(json.dumps(row.as_dict()))
    elif rows:
        print(format_table(rows))
    else:
        print(f"no jobs recorded under {root}")
    return 0


def cli() -> None:
    sys.exit(main())


if __name__ == "__main__":
    cli()
