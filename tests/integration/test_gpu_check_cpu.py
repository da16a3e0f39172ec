"""bench/gpu_check.sh as far as a CPU allows: its no-GPU refusal, and its whole flow on a tiny CPU model.

The real check runs on a GPU node (CIFAR-10 preset, full stack vs bare loop, quickstart end to end);
``--dry-run`` runs the same steps (data, both training variants in their own processes, the quickstart
under ``-X importtime``, the report, the copy to ``$OUT``) with a tiny model for a few steps.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import REPO, child_env

SCRIPT = REPO / "bench" / "gpu_check.sh"

pytestmark = pytest.mark.slow


def _run(args: list[str], tmp_path: Path, timeout: float, **env: str) -> subprocess.CompletedProcess[str]:
    # PYTHON: this interpreter (the node's is plain python3). No wheels: a `make gpu-wheels` folder holds
    # cp312 builds for the node, and this environment already has every package they carry.
    (tmp_path / "wheels").mkdir(exist_ok=True)
    extra = {
        "PYTHON": sys.executable,
        "GPU_CHECK_SITE": str(tmp_path / "site"),
        "GPU_CHECK_WHEELS": str(tmp_path / "wheels"),
        **env,
    }
    return subprocess.run(
        ["bash", str(SCRIPT), *args],
        cwd=REPO,
        env=child_env(**extra),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_without_a_gpu_it_stops_at_once_with_one_line(tmp_path: Path) -> None:
    proc = _run([], tmp_path, timeout=60)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert proc.stderr.strip() == "gpu_check: no CUDA device visible (this check needs a GPU)"
    assert proc.stdout == ""
    assert not (tmp_path / "site").exists()  # nothing was installed


def test_dry_run_exercises_every_part_on_cpu(tmp_path: Path) -> None:
    out, carried = tmp_path / "results", tmp_path / "out"
    proc = _run(["--dry-run", "--out", str(out)], tmp_path, timeout=240, OUT=str(carried))
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-4000:]
    report = json.loads((out / "gpu.json").read_text())
    assert report["ok"] and report["dry_run"]
    train = report["train"]
    for variant in ("trainer", "bare"):
        assert train[variant]["ok"], train[variant]
        assert train[variant]["images_per_s"] > 0
    assert train["ratio"] > 0
    assert train["trainer"]["mfu"] is None  # no peak FLOP/s for a CPU
    quick = report["quickstart"]
    assert quick["ok"] and quick["exit_code"] == 0, quick
    assert quick["last_log"].startswith("step 3/3")
    assert not [m for m in quick["mlflow_imported_by"] if not m.startswith("deepspeed.")]
    assert (out / "gpu_quickstart_grid.png").read_bytes().startswith(b"\x89PNG")
    assert "Overall: OK" in (out / "gpu.md").read_text()
    assert sorted(p.name for p in carried.iterdir()) == [
        "gpu.json",
        "gpu.md",
        "gpu_check.log",
        "gpu_quickstart_grid.png",
    ]
    log_file = (out / "gpu_check.log").read_text()
    trainer_log = log_file.split("===== (a) bare")[0]
    assert "step 2/" in trainer_log and "step 4/" in trainer_log  # fit's metrics path ran (log_every=2)
    assert "===== (b) quickstart" in log_file
