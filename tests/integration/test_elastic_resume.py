"""Elastic resume through the trainer: one run continued on 2 → 1 → 2 → 4 ranks (ZeRO-2), and on 2 → 1 → 2
ranks with the post-hoc EMA on (ZeRO-3).

Each link resumes the previous link's checkpoint on another number of ranks, trains one more step and
saves. Checked at every link: the trainer says it resumed across world sizes; the EMA it loaded is the
one saved (recovered from the next checkpoint: ema' = r·ema + (1−r)·θ'); the timestep history kept
every saved row and grew by exactly the new world's samples; counters continue. The engine-level
matrix (weights, masters, moments bit for bit, all stages × precisions) is test_elastic_engine.py.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from tests.conftest import TINY_MODEL, run_cmd, torchrun_cmd
from trainer.phema.profiles import sigma_rel_to_gamma

pytestmark = pytest.mark.slow

RATE = 0.9
B = 4


def _launch(nproc: int, args: list[str]) -> str:
    proc = run_cmd(torchrun_cmd(nproc, args), timeout=600)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-4000:]
    return log


def _state(out: Path, step: int) -> tuple[dict, dict]:
    tag = out / "checkpoints" / f"step_{step:08d}"
    export = torch.load(tag / "export.pt", weights_only=True)
    common = torch.load(tag / "trainer" / "common.pt", weights_only=True)
    return export, common


# ZeRO-0 across world sizes is run by test_elastic_engine.py (2→1, 1→2, 2→4) and, mid-epoch 2→4→1 to 1e-5 of the
# never-moved run, by test_world_size_invariance.py; ZeRO-3 through the trainer by the post-hoc EMA test below
# (2→1→2, with the same checks), and 2→4 at ZeRO-3 by the engine matrix: here ZeRO-2, on 2→1→2→4 ranks.
def test_two_one_two_four_ranks(digits_shards: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    common = [
        *TINY_MODEL,
        f"data.batch_size={B}",
        f"data.root={digits_shards}",
        f"train.output_dir={out}",
        "tracking.enabled=false",
        "train.zero_stage=2",
        "train.precision=fp32",
        f"train.ema_rates=[{RATE}]",
        "train.ckpt_every=1",
        "train.warmup_steps=0",  # full LR from the start: the EMA and the weights part at once
        "train.keep_last=5",
        "train.log_every=1",
        "diffusion.timestep_sampler=loss-second-moment",
    ]
    chain = [2, 1, 2, 4]
    _launch(chain[0], [*common, "train.total_steps=2"])
    for i, world in enumerate(chain[1:], start=1):
        before, after = i + 1, i + 2  # one step per link: the EMA update can be undone exactly
        log = _launch(world, [*common, f"train.total_steps={after}"])
        assert f"at step {before} (saved by {chain[i - 1]} ranks, now {world})" in log, log[-3000:]
        assert f"step {after}/{after}" in log
        _assert_link_continued(out, before, after, world)


def _assert_link_continued(out: Path, before: int, after: int, world: int) -> None:
    """The checkpoint at ``after`` (one step on ``world`` ranks) continues the one at ``before``: counters,
    timestep history and the classical EMA (at ``RATE``) carry on from the saved ones."""
    saved_export, saved_common = _state(out, before)
    export, state = _state(out, after)
    assert state["trainer"]["step"] == after
    assert state["trainer"]["samples_seen"] == saved_common["trainer"]["samples_seen"] + B * world
    # The timestep history kept every saved row and grew by exactly one step of the new world (the newest
    # step's pairs are exchanged but folded one step later: they count too).
    hist0, hist = saved_common["timestep_sampler"], state["timestep_sampler"]
    grew = hist["writes"] - hist0["writes"]
    recorded = int(hist["writes"].sum()) + len(hist["exchanged_unfolded"])
    assert recorded - int(hist0["writes"].sum()) - len(hist0["exchanged_unfolded"]) == B * world
    untouched = grew == 0
    assert torch.equal(hist["history"][untouched], hist0["history"][untouched])
    # The EMA continued from the saved one: undo one update, ema0 = (ema1 − (1−r)·θ1) / r. An EMA restarted
    # from the resumed weights would give back θ0 instead, which is far from ema0.
    ema0, ema1, theta1, theta0 = (
        saved_export["ema"][str(RATE)],
        export["ema"][str(RATE)],
        export["model"],
        saved_export["model"],
    )
    assert ema0.keys() == ema1.keys() == theta1.keys()
    assert max(float((ema0[n] - theta0[n]).abs().max()) for n in ema0) > 1e-4
    for name in ema0:
        recovered = (ema1[name].double() - (1 - RATE) * theta1[name].double()) / RATE
        assert torch.allclose(recovered, ema0[name].double(), rtol=0, atol=1e-6), name


def _snapshot(run: Path, step: int) -> tuple[dict, dict[str, torch.Tensor]]:
    """A post-hoc EMA snapshot's index entry and its full tensors of profile SIGMA (ZeRO-3 slices joined)."""
    entry = next(e for e in json.loads((run / "phema" / "index.json").read_text())["snapshots"] if e["step"] == step)
    states = [torch.load(run / "phema" / entry["dir"] / f, weights_only=True) for f in entry["files"]]
    full = {}
    for name, shape in states[0]["shapes"].items():
        flat = torch.cat([s["shadows"][str(SIGMA)][name].reshape(-1) for s in states])
        full[name] = flat[: math.prod(shape)].view(shape)
    return entry, full


SIGMA = 0.2
"""A wide profile (γ ≈ 1.2, close to the running mean): far from the latest weights, so a power EMA restarted
from the resumed weights would be caught."""


def test_phema_continues_across_world_sizes(digits_shards: Path, tmp_path: Path) -> None:
    """ZeRO-3, 2 → 1 → 2 ranks, a snapshot every step: each link's power EMA continues the saved one, its
    profile clock included (ph' = β_t·ph + (1 − β_t)·θ' with β_t = (1 − 1/t)^(γ+1), t the new step); the
    classical EMA, the timestep history and the counters continue too (ZeRO-3 partitions both EMAs)."""
    out = tmp_path / "run"
    common = [
        *TINY_MODEL,
        f"data.batch_size={B}",
        f"data.root={digits_shards}",
        f"train.output_dir={out}",
        "tracking.enabled=false",
        "train.zero_stage=3",
        "train.precision=fp32",
        "train.ckpt_every=1",
        "train.warmup_steps=0",
        "train.keep_last=2",  # checkpoints are pruned; the snapshots (their own retention) are not
        "train.lr_schedule=constant",  # full steps (cosine over 2-4 steps ends near 0): the wide profile lags
        f"train.ema_rates=[{RATE}]",
        "diffusion.timestep_sampler=loss-second-moment",
        "train.phema.enabled=true",
        "train.phema.every_steps=1",
        f"train.phema.sigma_rels=[{SIGMA}]",
    ]
    chain = [2, 1, 2]
    _launch(chain[0], [*common, "train.total_steps=2"])
    gamma = sigma_rel_to_gamma(SIGMA)
    for i, world in enumerate(chain[1:], start=1):
        before, after = i + 1, i + 2
        log = _launch(world, [*common, f"train.total_steps={after}"])
        assert f"at step {before} (saved by {chain[i - 1]} ranks, now {world})" in log, log[-3000:]
        _assert_link_continued(out, before, after, world)
        entry0, ph0 = _snapshot(out, before)
        entry1, ph1 = _snapshot(out, after)
        assert (entry0["t"], entry1["t"], entry1["world_size"]) == (before, after, world)
        assert len(entry1["files"]) == world  # sharded the way the EMA is: one slice per rank under ZeRO-3
        theta0, theta1 = _state(out, before)[0]["model"], _state(out, after)[0]["model"]
        assert max(float((ph0[n] - theta0[n]).abs().max()) for n in ph0) > 1e-4
        b = (1.0 - 1.0 / after) ** (gamma + 1.0)
        for name in ph0:
            recovered = (ph1[name].double() - (1 - b) * theta1[name].double()) / b
            assert torch.allclose(recovered, ph0[name].double(), rtol=0, atol=1e-5), name
    # Checkpoint pruning kept the newest two checkpoints and never touched a snapshot.
    assert sorted(p.name for p in (out / "checkpoints").glob("step_*")) == ["step_00000003", "step_00000004"]
    index = json.loads((out / "phema" / "index.json").read_text())["snapshots"]
    assert [e["step"] for e in index] == [1, 2, 3, 4]
    assert sorted(p.name for p in (out / "phema").glob("snap_*")) == [f"snap_{s:08d}" for s in (1, 2, 3, 4)]
