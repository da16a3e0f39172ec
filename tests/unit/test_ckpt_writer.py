"""Checkpoint writing in one process: background saves are consistent snapshots, complete only when every file
is on disk, and a failed save leaves nothing; the EMA's partitioned state reassembles from any slicing."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from trainer.checkpoint import COMPLETE, LATEST, CheckpointManager, load_plain
from trainer.distributed import DistEnv
from trainer.ema import EMA, slice_bounds
from trainer.storage import estimate_checkpoint_bytes, space_warning

ENV = DistEnv(rank=0, local_rank=0, world_size=1, local_world_size=1, device=torch.device("cpu"), backend="gloo")


class Part:
    def __init__(self) -> None:
        self.weights = torch.arange(1000, dtype=torch.float32)
        self.extra: Any = None

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {"weights": self.weights, "view": self.weights[10:20]}
        if self.extra is not None:
            state["extra"] = self.extra
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.weights.copy_(state["weights"])


@pytest.mark.parametrize("background", [True, False])
def test_save_is_a_snapshot_and_complete_after_settle(tmp_path: Path, background: bool) -> None:
    part = Part()
    mgr = CheckpointManager(tmp_path, keep_last=1, env=ENV, shared={"part": part})
    first = part.weights.clone()
    job = mgr.begin(1, background=background)
    mgr.writer.submit(job)
    part.weights.add_(1.0)  # training goes on while the files are written
    result = mgr.writer.settle()
    assert result is not None and result.ok and result.error is None
    assert result.planned_bytes == 1000 * 4 + 10 * 4
    saved = load_plain(tmp_path / "step_00000001" / "trainer" / "common.pt")["part"]
    assert torch.equal(saved["weights"], first)  # the state at the save, not after
    assert torch.equal(saved["view"], first[10:20])
    assert json.loads((tmp_path / "step_00000001" / COMPLETE).read_text()) == {"step": 1, "world_size": 1}
    assert (tmp_path / LATEST).read_text() == "step_00000001"
    assert not list(tmp_path.rglob(".*.tmp"))

    mgr.writer.submit(mgr.begin(2, background=background))  # reuses the first save's host buffers
    part.weights.mul_(3.0)
    assert mgr.writer.settle().ok
    assert mgr.complete_tags() == ["step_00000002"]  # keep_last=1 pruned the first
    second = load_plain(tmp_path / "step_00000002" / "trainer" / "common.pt")["part"]
    assert torch.equal(second["weights"], first + 1.0) and torch.equal(second["view"], first[10:20] + 1.0)


@pytest.mark.parametrize("background", [True, False])
def test_failed_save_leaves_nothing_and_keeps_latest(tmp_path: Path, background: bool) -> None:
    part = Part()
    mgr = CheckpointManager(tmp_path, keep_last=3, env=ENV, shared={"part": part})
    mgr.writer.submit(mgr.begin(1, background=background))
    assert mgr.writer.settle().ok
    part.extra = lambda: None  # a value torch.save cannot pickle: this save fails while writing
    mgr.writer.submit(mgr.begin(2, background=background))
    result = mgr.writer.settle()
    assert result is not None and not result.ok
    assert result.error is not None and result.error.startswith("rank 0: ") and "\n" not in result.error
    assert not (tmp_path / "step_00000002").exists()
    assert (tmp_path / LATEST).read_text() == "step_00000001"


def test_incomplete_directories_are_removed_at_start(tmp_path: Path) -> None:
    mgr = CheckpointManager(tmp_path, keep_last=3, env=ENV, shared={"part": Part()})
    mgr.writer.submit(mgr.begin(1, background=False))
    assert mgr.writer.settle().ok
    (tmp_path / "step_00000002" / "trainer").mkdir(parents=True)  # what a kill -9 mid-save leaves
    assert mgr.remove_incomplete() == ["step_00000002"]
    assert mgr.complete_tags() == ["step_00000001"]


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(7, 5)  # 35 + 5
        self.b = nn.Conv2d(5, 3, 3)  # 135 + 3


def _sliced_states(ema: EMA, world: int) -> list[dict[str, Any]]:
    """What ``world`` ranks of the sliced layout would have saved, cut from a one-rank state."""
    whole = ema.state_dict()
    states = []
    for r in range(world):
        lo, hi = slice_bounds(whole["numel"], world, r)
        shadows = {k: v[lo:hi].clone() for k, v in whole["shadows"].items()}
        states.append({**whole, "rank": r, "world": world, "start": lo, "end": hi, "shadows": shadows})
    return states


@pytest.mark.parametrize("world", [2, 3, 4, 7])
def test_ema_slices_reassemble_exactly(world: int) -> None:
    torch.manual_seed(0)
    net = Net()
    ema = EMA(net, [0.9, 0.99])
    with torch.no_grad():
        for p in net.parameters():
            p.mul_(-2.0)
    ema.update()
    # float64 reference of one update from θ0 to θ1 = -2 θ0: θ_ema = r θ0 + (1 - r) θ1
    for rate in ema.rates:
        for name, value in ema.full_state_dict(rate).items():
            theta1 = dict(net.named_parameters())[name].detach().double()
            ref = rate * (theta1 / -2.0) + (1 - rate) * theta1
            assert torch.allclose(value.double(), ref, rtol=0, atol=1e-6), name
    states = _sliced_states(ema, world)
    assert sum(s["end"] - s["start"] for s in states) == ema.numel == 40 + 138
    assert max(s["end"] - s["start"] for s in states) == math.ceil(ema.numel / world)
    other = EMA(Net(), [0.9, 0.99])
    other.load_state_dict_resharded(states)
    for rate in ema.rates:
        for name, value in other.full_state_dict(rate).items():
            assert torch.equal(value, ema.full_state_dict(rate)[name]), name
    with pytest.raises(ValueError, match="cover"):
        other.load_state_dict_resharded(states[:-1])


def test_checkpoint_size_estimate_and_space_warning(tmp_path: Path) -> None:
    # ZeRO-2 bf16, one EMA: 2 (module) + 4 (master) + 8 (Adam) + 4 (EMA) + 8 (export raw + EMA) bytes a parameter
    assert estimate_checkpoint_bytes(1000, 2, True, 1) == 26_000
    assert estimate_checkpoint_bytes(1000, 4, False, 2) == 1000 * (4 + 8 + 8 + 12)
    assert space_warning(tmp_path, 1, keep_last=3, existing=0, how="x") is None
    line = space_warning(tmp_path, 1 << 62, keep_last=3, existing=1, how="measured")
    assert line is not None and line.startswith(f"warning: {tmp_path} has ") and "keeps up to 4 at once" in line


@pytest.mark.parametrize("other_rank_marks", [True, False])
def test_a_run_ending_on_an_error_waits_for_the_other_ranks_only_a_grace(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, other_rank_marks: bool
) -> None:
    """Rank 0 of 2 closing after an error: it finalizes when rank 1's mark is there, and otherwise gives up after
    the grace instead of holding the allocation (rank 1 was killed: its mark never comes)."""
    import time

    from trainer import ckpt_writer

    monkeypatch.setattr(ckpt_writer, "GRACE_S", 0.5)
    finalized: list[int] = []
    writer = ckpt_writer.Writer(
        rank=0,
        world=2,
        finalize=lambda job: finalized.append(job.step),
        discard=lambda job: None,
        gather=lambda x: [x, x],
        broadcast=lambda x: x,
    )
    tag_dir = tmp_path / "step_00000007"
    job = writer.new_job(tag_dir, 7, background=True)
    job.add(tag_dir / "trainer" / "rank_0.pt", {"w": torch.ones(4)})
    if other_rank_marks:
        tag_dir.mkdir(parents=True)
        (tag_dir / ckpt_writer.mark_name(1, True)).touch()
    writer.submit(job)
    t0 = time.perf_counter()
    writer.close()
    assert time.perf_counter() - t0 < 5.0
    assert (tag_dir / "trainer" / "rank_0.pt").is_file()  # rank 0's own part is always written
    assert finalized == ([7] if other_rank_marks else [])


@pytest.mark.parametrize("background", [True, False])
def test_a_failure_after_completion_keeps_the_checkpoint(tmp_path: Path, background: bool) -> None:
    """The completion callback prints; stdout on a full disk raises OSError. The checkpoint is complete and
    named by `latest` by then (and keep_last=1 pruned the older one): it must stand."""
    part = Part()
    mgr = CheckpointManager(tmp_path, keep_last=1, env=ENV, shared={"part": part})
    mgr.writer.submit(mgr.begin(1, background=background))
    assert mgr.writer.settle().ok

    def full_disk(job: Any) -> None:
        raise OSError(28, "No space left on device")

    mgr.on_complete = full_disk
    mgr.writer.submit(mgr.begin(2, background=background))
    result = mgr.writer.settle()
    assert result is not None and result.ok
    assert mgr.complete_tags() == ["step_00000002"] and (tmp_path / LATEST).read_text() == "step_00000002"


def test_post_hoc_ema_turned_on_mid_run_is_named(tmp_path: Path) -> None:
    from trainer.checkpoint import CheckpointError

    mgr = CheckpointManager(tmp_path, keep_last=1, env=ENV, shared={"part": Part()})
    mgr.writer.submit(mgr.begin(1, background=False))
    assert mgr.writer.settle().ok
    later = CheckpointManager(tmp_path, keep_last=1, env=ENV, shared={"part": Part()}, per_rank={"phema": Part()})
    with pytest.raises(CheckpointError, match="has no 'phema' state: train.phema was turned on after this run"):
        later.load(tmp_path / "step_00000001")
