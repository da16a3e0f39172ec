"""Shared fixtures: real shards built once per session with the data_prep CLI, and process helpers."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


TINY_MODEL = [
    "model.channels=16",
    "model.norm_groups=8",
    "model.channel_mult=[1,2]",
    "model.attention_resolutions=[8]",
    "diffusion.steps=100",
    "sample.num_samples=4",
    "sample.batch_size=4",
    "sample.steps=5",
]
"""Overrides for a model small enough that process start-up dominates multi-process tests."""


def child_env(**extra: str) -> dict[str, str]:
    """Environment for child processes: one OpenMP thread each (2 cores, several ranks)."""
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", MLFLOW_ALLOW_FILE_STORE="true")
    env.update(extra)
    return env


def torchrun_cmd(nproc: int, args: list[str], script: str = "trainer/main.py") -> list[str]:
    """``torchrun`` of the trainer on ``nproc`` local ranks with the quickstart config and ``args``."""
    from trainer.distributed import free_port

    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nproc_per_node={nproc}",
        f"--master_port={free_port()}",
        script,
        "--config",
        "configs/quickstart.yaml",
        *args,
    ]


def run_cmd(args: list[str], timeout: float = 600, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        args, cwd=REPO, env=child_env(**env), capture_output=True, text=True, timeout=timeout, check=False
    )


def train_tiny_export(shards: Path, out: Path, *overrides: str) -> Path:
    """Train the tiny model a few steps in one process (ZeRO-0, no tracking) and return its ``export.pt``."""
    cmd = [
        sys.executable,
        "trainer/main.py",
        "--config",
        "configs/quickstart.yaml",
        *TINY_MODEL,
        f"data.root={shards}",
        f"train.output_dir={out}",
        "tracking.enabled=false",
        "train.zero_stage=0",
        *overrides,
    ]
    proc = run_cmd(cmd, timeout=600)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    (path,) = out.glob("checkpoints/*/export.pt")
    return path


@pytest.fixture(scope="session")
def digits_shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The quickstart's dataset (scikit-learn digits at 16x16) as real webdataset shards."""
    out = tmp_path_factory.mktemp("digits16")
    proc = run_cmd(
        [
            sys.executable,
            "-m",
            "data_prep",
            "make",
            "--source",
            "digits",
            "--out",
            str(out),
            "--image-size",
            "16",
            "--channels",
            "1",
            "--val-fraction",
            "0.1",
            "--max-per-shard",
            "256",
        ],
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert (out / "manifest.json").is_file()
    return out
