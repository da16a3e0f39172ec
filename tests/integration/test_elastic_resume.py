"""Elastic resume through the trainer: one run continued on 2 → 1 → 2 → 4 ranks, for ZeRO 0, 2 and 3.

Each link resumes the previous link's checkpoint on another number of ranks, trains one more step and
saves. Checked at every link: the trainer says it resumed across world sizes; the EMA it loaded is the
one saved (recovered from the next checkpoint: ema' = r·ema + (1−r)·θ'); the timestep history kept
every saved row and grew by exactly the new world's samples; counters continue. The engine-level
matrix (weights, masters, moments bit for bit, all stages × precisions) is test_elastic_engine.py.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.conftest import TINY_MODEL, run_cmd, torchrun_cmd

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


@pytest.mark.parametrize("zero", [0, 2, 3])
def test_two_one_two_four_ranks(digits_shards: Path, tmp_path: Path, zero: int) -> None:
    out = tmp_path / "run"
    common = [
        *TINY_MODEL,
        f"data.batch_size={B}",
        f"data.root={digits_shards}",
        f"train.output_dir={out}",
        "tracking.enabled=false",
        f"train.zero_stage={zero}",
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
        saved_export, saved_common = _state(out, before)
        export, state = _state(out, after)
        assert state["trainer"]["step"] == after
        assert state["trainer"]["samples_seen"] == saved_common["trainer"]["samples_seen"] + B * world
        # The timestep history kept every saved row and grew by exactly one step of the new world (the
        # newest step's pairs are exchanged but folded one step later: they count too).
        hist0, hist = saved_common["timestep_sampler"], state["timestep_sampler"]
        grew = hist["writes"] - hist0["writes"]
        recorded = int(hist["writes"].sum()) + len(hist["exchanged_unfolded"])
        assert recorded - int(hist0["writes"].sum()) - len(hist0["exchanged_unfolded"]) == B * world
        untouched = grew == 0
        assert torch.equal(hist["history"][untouched], hist0["history"][untouched])
        # The EMA continued from the saved one: undo one update, ema0 = (ema1 − (1−r)·θ1) / r. An EMA
        # restarted from the resumed weights would give back θ0 instead, which is far from ema0.
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
