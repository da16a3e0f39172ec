"""Post-hoc EMA snapshots and reconstruction in one process: a known weight trajectory is averaged by the
real PowerEMA, snapshotted by the real writer, and reconstructed; the result is compared with the power
EMA of the wanted σ_rel computed directly from the trajectory (float64)."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from trainer.distributed import DistEnv
from trainer.phema import PowerEMA, SnapshotWriter
from trainer.phema.profiles import sigma_rel_to_gamma
from trainer.phema.reconstruct import make_plan, reconstruct_part, split_names
from trainer.phema.snapshots import SnapshotError, check_index, read_index

ENV = DistEnv(0, 0, 1, 1, torch.device("cpu"), "gloo")
STEPS, EVERY = 400, 20


def _trajectory() -> torch.Tensor:
    """θ_1..θ_T of 2 + 6 parameters: a drift plus a random walk, as training weights wander."""
    gen = torch.Generator().manual_seed(3)
    tau = torch.arange(1, STEPS + 1, dtype=torch.float64)[:, None]
    walk = torch.randn(STEPS, 8, generator=gen, dtype=torch.float64).cumsum(0) * 0.05
    return torch.sin(tau / 60.0 + torch.arange(8)) + walk


def _power_ema(traj: torch.Tensor, sigma_rel: float) -> torch.Tensor:
    # w_t(τ) = (τ^(γ+1) - (τ-1)^(γ+1)) / t^(γ+1) (the β products telescope), computed with τ/t to stay finite.
    g, t = sigma_rel_to_gamma(sigma_rel), traj.shape[0]
    tau = np.arange(1, t + 1, dtype=np.float64)
    w = (tau / t) ** (g + 1) - ((tau - 1) / t) ** (g + 1)
    return (torch.from_numpy(w)[:, None] * traj).sum(0)


class _Two(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = torch.nn.Parameter(torch.zeros(2))
        self.b = torch.nn.Parameter(torch.zeros(2, 3))


def _run(root: Path, keep: int = 0) -> tuple[torch.Tensor, PowerEMA]:
    traj = _trajectory()
    module = _Two()
    phema = PowerEMA(module, [0.05, 0.10], torch.device("cpu"))
    writer = SnapshotWriter(root, phema, ENV, keep)
    for i in range(STEPS):
        with torch.no_grad():
            module.a.copy_(traj[i, :2].float())
            module.b.copy_(traj[i, 2:].float().view(2, 3))
        phema.update(keep=torch.tensor(1.0))
        if (i + 1) % EVERY == 0:
            writer.write(i + 1, (i + 1) * 32)
    return traj, phema


def _flat(parts: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([parts["a"].reshape(-1), parts["b"].reshape(-1)]).double()


def test_reconstruction_matches_the_direct_power_ema_of_a_known_trajectory(tmp_path: Path) -> None:
    traj, phema = _run(tmp_path)
    shapes = phema.full_shapes()
    # A tracked profile at a snapshot step comes back as itself (coefficient 1 on its own snapshot).
    plan = make_plan(tmp_path, STEPS, [0.05, 0.10], [], [])
    (a, b) = reconstruct_part(tmp_path, plan, ["a", "b"], shapes)
    for got, s in ((a, 0.05), (b, 0.10)):
        own = torch.cat([x.reshape(-1) for x in phema.shadows[s]]).double()
        torch.testing.assert_close(_flat(got), own, rtol=1e-5, atol=0)
    # Untracked widths, inside and a little outside the tracked ones, at the last and an earlier step.
    for step, sigmas in ((STEPS, [0.03, 0.04, 0.07, 0.13]), (200, [0.07])):
        plan = make_plan(tmp_path, step, sigmas, [], [])
        out = reconstruct_part(tmp_path, plan, ["a", "b"], shapes)
        for got, s, err in zip(out, sigmas, plan.errors, strict=True):
            want = _power_ema(traj[:step], s)
            # Stated tolerance: 1 % of how far the two tracked EMAs lie apart (measured: 0.02-0.33 %, the
            # largest for σ_rel 0.03 and at step 200, from 10 snapshots; the continuous profiles the solve
            # uses differ from the discrete per-step weights by O(γ/t), and the fit is not exact).
            spread = float((_power_ema(traj[:step], 0.05) - _power_ema(traj[:step], 0.10)).abs().max())
            dev = float((_flat(got) - want).abs().max())
            assert err < 0.05 and dev <= 0.01 * spread, (s, step, dev, spread, err)
            # And it is much closer to its own EMA than to the nearest tracked one.
            nearest = 0.05 if abs(s - 0.05) < abs(s - 0.10) else 0.10
            assert dev < 0.5 * float((_power_ema(traj[:step], nearest) - want).abs().max()), (s, step)


def test_index_retention_and_stale_index(tmp_path: Path) -> None:
    _run(tmp_path, keep=3)
    entries = read_index(tmp_path)
    assert [e["step"] for e in entries] == [360, 380, 400]
    assert sorted(p.name for p in tmp_path.glob("snap_*")) == ["snap_00000360", "snap_00000380", "snap_00000400"]
    assert all(e["t"] == e["step"] and e["images"] == 32 * e["step"] for e in entries)
    check_index(tmp_path, entries)
    with pytest.raises(SnapshotError, match="no snapshot at that step"):
        make_plan(tmp_path, 100, [0.07], [], [])
    with pytest.raises(SnapshotError, match="out of range"):
        make_plan(tmp_path, None, [0.3], [], [])
    with pytest.raises(SnapshotError, match="out of range of the 3 snapshots"):
        make_plan(tmp_path, None, [0.005], [], [])
    (tmp_path / "snap_00000380" / "rank_0.pt").unlink()
    with pytest.raises(SnapshotError, match="listed in .* but missing"):
        make_plan(tmp_path, None, [0.07], [], [])
    shutil.rmtree(tmp_path / "snap_00000380")
    (tmp_path / "snap_00000370").mkdir()  # written, never listed, older than the newest listed: stale
    with pytest.raises(SnapshotError, match="stale index"):
        check_index(tmp_path, [e for e in entries if e["step"] != 380])
    # The run's next snapshot removes such leftovers (interrupted writes or prunes: never read).
    phema = PowerEMA(_Two(), [0.05, 0.10], torch.device("cpu"))
    phema.update(keep=torch.tensor(1.0))
    assert SnapshotWriter(tmp_path, phema, ENV, keep=3).write(420, 32 * 420) == tmp_path / "snap_00000420"
    assert not (tmp_path / "snap_00000370").exists()  # (380 was deleted above; retention pruned 360)
    assert sorted(p.name for p in tmp_path.glob("snap_*")) == ["snap_00000400", "snap_00000420"]


def test_a_snapshot_that_cannot_be_written_is_skipped_with_one_warning(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]
) -> None:
    import trainer.phema.snapshots as snapshots

    _run(tmp_path, keep=3)
    before = read_index(tmp_path)
    phema = PowerEMA(_Two(), [0.05, 0.10], torch.device("cpu"))
    phema.update(keep=torch.tensor(1.0))

    def full(*args: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(snapshots, "atomic_torch_save", full)
    assert SnapshotWriter(tmp_path, phema, ENV, keep=3).write(420, 32 * 420) is None
    lines = [ln for ln in capfd.readouterr().err.splitlines() if "warning" in ln]
    assert lines == [
        "warning: rank 0: post-hoc EMA snapshot of step 420 not written (OSError: [Errno 28] No space left on device); "
        "skipped, training goes on"
    ], lines
    assert read_index(tmp_path) == before and not (tmp_path / "snap_00000420").exists()
    monkeypatch.undo()
    assert SnapshotWriter(tmp_path, phema, ENV, keep=3).write(440, 32 * 440) is not None
    assert [e["step"] for e in read_index(tmp_path)] == [380, 400, 440]


def test_split_names_puts_every_parameter_on_one_rank() -> None:
    shapes = {f"p{i}": [i + 1, 3] for i in range(7)}
    for world in (1, 2, 3):
        split = split_names(shapes, world)
        assert sorted(n for names in split for n in names) == sorted(shapes)
