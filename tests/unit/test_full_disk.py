"""Writes that meet a real full disk (a 64 KiB tmpfs; mounting needs root, else the tests skip): one line
naming the file, the bytes it needed and the bytes free, nothing half-written left behind."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from trainer.checkpoint import LATEST, CheckpointManager
from trainer.distributed import DistEnv
from trainer.evaluation.parts import PartsError, PartStore

ENV = DistEnv(rank=0, local_rank=0, world_size=1, local_world_size=1, device=torch.device("cpu"), backend="gloo")


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    disk = tmp_path / "disk"
    disk.mkdir()
    proc = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(disk)], capture_output=True, text=True
    )
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a size-limited tmpfs ({' '.join(proc.stderr.split()) or 'mount failed'})")
    try:
        yield disk
    finally:
        if subprocess.run(["umount", str(disk)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(disk)], capture_output=True)


def test_a_part_that_does_not_fit_is_one_line_and_leaves_no_temporary(small_disk: Path) -> None:
    store = PartStore(small_disk / "job", num_parts=2)
    store.claim({"seed": 0})
    store.write(0, x=np.zeros(1000, dtype=np.uint8))
    with pytest.raises(PartsError) as err:
        store.write(1, x=np.zeros(200_000, dtype=np.uint8))
    line = str(err.value)
    assert "\n" not in line and line.startswith(f"{store.path(1)}: not written (OSError: [Errno 28] No space left")
    assert "it needs about 200,000 bytes (200.0 kB)" in line and " bytes free; " not in line and "kB) free; " in line
    assert sorted(p.name for p in store.parts_dir.iterdir()) == ["part_000000.npz"]


class Blob:
    def __init__(self, n: int) -> None:
        self.x = torch.ones(n)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"x": self.x}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.x.copy_(state["x"])


@pytest.mark.parametrize("background", [True, False])
def test_a_checkpoint_that_does_not_fit_is_removed_and_latest_kept(small_disk: Path, background: bool) -> None:
    blob = Blob(1000)  # ~4 kB: fits
    mgr = CheckpointManager(small_disk, keep_last=3, env=ENV, shared={"blob": blob})
    mgr.writer.submit(mgr.begin(1, background=background))
    assert mgr.writer.settle().ok
    blob.x = torch.ones(100_000)  # 400 kB: does not
    mgr.writer.submit(mgr.begin(2, background=background))
    result = mgr.writer.settle()
    assert not result.ok and result.error == "rank 0: OSError: [Errno 28] No space left on device"
    assert result.planned_bytes == 400_000
    assert (small_disk / LATEST).read_text() == "step_00000001"
    assert not (small_disk / "step_00000002").exists()
