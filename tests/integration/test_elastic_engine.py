"""Elastic resume (trainer/elastic.py, EMA.load_state_dict_resharded) with real gloo processes.

One launch checks every case: a 1-rank and a 2-rank run each save checkpoints for ZeRO 0-3 × fp32/bf16,
then 1-, 2- and 4-rank runs resume them (2->1, 1->2, 2->4) and compare weights, fp32 masters, Adam
moments and step, LR schedule and EMA bit for bit with the saved state (tests/integration/elastic_worker.py).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from tests.conftest import REPO, child_env
from trainer.distributed import free_port
from trainer.ema import EMA

pytestmark = pytest.mark.slow

STAGES = [(0, False), (0, True), (1, False), (1, True), (2, False), (2, True), (3, False), (3, True)]
TRANSITIONS = [(2, 1), (1, 2), (2, 4)]
TAG = "step_00000003"  # elastic_worker.TAG
BROKEN = "w1_s2_fp32_broken"
STALE_TMP_CASE = "w2_s1_fp32"


def _name(world: int, stage: int, bf16: bool) -> str:
    return f"w{world}_s{stage}_{'bf16' if bf16 else 'fp32'}"


def _cases(saved_world: int) -> list[dict[str, Any]]:
    cases = [{"name": _name(saved_world, s, b), "stage": s, "bf16": b, "saved_world": saved_world} for s, b in STAGES]
    # EMA states saved under ZeRO-3 load onto a ZeRO-2 engine and the reverse.
    for case in cases:
        if not case["bf16"] and case["stage"] in (2, 3):
            case["cross_ema"] = _name(saved_world, 5 - case["stage"], False)
    return cases


def _launch(mode: str, world: int, root: Path, cases: list[dict[str, Any]], timeout: float = 300) -> dict[str, str]:
    """Run ``world`` ranks of the worker; returns case -> verdict (the same on every rank, else all of them)."""
    port = str(free_port())
    procs, logs = [], []
    for rank in range(world):
        env = child_env(
            RANK=str(rank),
            LOCAL_RANK=str(rank),
            WORLD_SIZE=str(world),
            LOCAL_WORLD_SIZE=str(world),
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=port,
        )
        log = root / f"log_{mode}_{world}_r{rank}.txt"
        logs.append(log)
        with open(log, "w") as out:
            argv = [sys.executable, "-m", "tests.integration.elastic_worker", mode, str(root), json.dumps(cases)]
            procs.append(subprocess.Popen(argv, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT))
    try:
        codes = [p.wait(timeout=timeout) for p in procs]
    except subprocess.TimeoutExpired:
        for p in procs:
            p.kill()
            p.wait()
        pytest.fail(f"{mode} on {world} ranks hung for {timeout} s:\n{logs[0].read_text()[-3000:]}")
    for rank, (code, log) in enumerate(zip(codes, logs, strict=True)):
        assert code == 0, f"{mode} rank {rank}/{world} exited {code}:\n{log.read_text()[-3000:]}"
    per_rank = [json.loads((root / f"results_{mode}_{world}_r{r}.json").read_text()) for r in range(world)]
    verdicts = {}
    for case in cases:
        seen = [res[case["name"]] for res in per_rank]
        verdicts[case["name"]] = (
            seen[0] if len(set(seen)) == 1 else " | ".join(f"r{r}: {v}" for r, v in enumerate(seen))
        )
    return verdicts


def _stat(case: str, root: Path) -> tuple[int, int]:
    marker = root / case / "ckpt" / TAG / "universal" / "zero" / "optimizer_state.pt"
    st = marker.stat()
    return st.st_ino, st.st_mtime_ns


@dataclass
class Matrix:
    root: Path
    results: dict[tuple[int, int], dict[str, str]] = field(default_factory=dict)
    universal_after_first: dict[str, tuple[int, int]] = field(default_factory=dict)


@pytest.fixture(scope="module")
def matrix(tmp_path_factory: pytest.TempPathFactory) -> Matrix:
    root = tmp_path_factory.mktemp("elastic")
    for world in (1, 2):
        assert set(_launch("save", world, root, _cases(world)).values()) == {"ok"}

    # A checkpoint whose ZeRO partition file is damaged cannot be converted.
    shutil.copytree(root / _name(1, 2, False), root / BROKEN)
    (optim,) = (root / BROKEN / "ckpt" / TAG).glob("*optim_states.pt")
    optim.write_bytes(optim.read_bytes()[:200])
    # What a conversion that crashed leaves behind: a temporary folder that must not be trusted.
    junk = root / STALE_TMP_CASE / "ckpt" / TAG / ".universal.tmp" / "zero"
    junk.mkdir(parents=True)
    (junk / "optimizer_state.pt").write_bytes(b"half-written")

    m = Matrix(root)
    m.results[(2, 1)] = _launch("load", 1, root, _cases(2))
    m.universal_after_first = {c["name"]: _stat(c["name"], root) for c in _cases(2) if c["stage"] > 0}
    broken = {"name": BROKEN, "stage": 2, "bf16": False, "saved_world": 1}
    m.results[(1, 2)] = _launch("load", 2, root, [*_cases(1), broken])
    m.results[(2, 4)] = _launch("load", 4, root, _cases(2))  # reuses the conversions of the 2->1 run
    return m


@pytest.mark.parametrize("stage,bf16", STAGES, ids=[_name(0, s, b)[3:] for s, b in STAGES])
@pytest.mark.parametrize("saved,current", TRANSITIONS, ids=[f"{a}to{b}" for a, b in TRANSITIONS])
def test_resume_on_other_world_size_is_exact(matrix: Matrix, saved: int, current: int, stage: int, bf16: bool) -> None:
    assert matrix.results[(saved, current)][_name(saved, stage, bf16)] == "ok"


def test_conversion_is_reused_and_crash_leftover_replaced(matrix: Matrix) -> None:
    for case, before in matrix.universal_after_first.items():
        assert _stat(case, matrix.root) == before, f"{case}: the 2->4 resume converted again"
    tag_dir = matrix.root / STALE_TMP_CASE / "ckpt" / TAG
    assert not (tag_dir / ".universal.tmp").exists()
    assert (tag_dir / "universal").is_dir()
    # ZeRO-0 state is replicated: resumed without any conversion.
    assert not (matrix.root / _name(2, 0, True) / "ckpt" / TAG / "universal").exists()


def test_unconvertible_checkpoint_is_a_one_line_error(matrix: Matrix) -> None:
    verdict = matrix.results[(1, 2)][BROKEN]  # the same on both ranks: no rank is left waiting
    assert verdict.startswith("CheckpointError: "), verdict
    assert "\n" not in verdict
    tag_dir = matrix.root / BROKEN / "ckpt" / TAG
    assert str(tag_dir) in verdict
    assert "saved by 1 ranks, now 2" in verdict
    assert "universal checkpoint conversion failed" in verdict
    assert not (tag_dir / "universal").exists() and not (tag_dir / ".universal.tmp").exists()


@pytest.mark.parametrize("resharded", [False, True])
def test_new_ema_rate_starts_from_resumed_weights(resharded: bool) -> None:
    torch.manual_seed(0)
    module = nn.Linear(3, 2)
    saved_ema = EMA(module, [0.9])
    with torch.no_grad():
        for p in module.parameters():
            p.add_(1.0)
    saved_ema.update()
    state = saved_ema.state_dict()

    torch.manual_seed(1)
    resumed = nn.Linear(3, 2)
    ema = EMA(resumed, [0.9, 0.5])  # built at start-up, from the initial random weights
    with torch.no_grad():  # then the engine loads the checkpoint's weights
        for p, q in zip(resumed.parameters(), module.parameters(), strict=True):
            p.copy_(q)
    if resharded:
        ema.load_state_dict_resharded([state, state])
    else:
        ema.load_state_dict(state)
    for name, value in ema.full_state_dict(0.9).items():
        assert torch.equal(value, saved_ema.full_state_dict(0.9)[name])
    for name, value in ema.full_state_dict(0.5).items():
        assert torch.equal(value, dict(module.named_parameters())[name].detach())
