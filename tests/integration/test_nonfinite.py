"""The non-finite policy with real ranks: a NaN on ONE rank is seen by all, the step is skipped whole
(weights, moments, LR schedule, EMA, timestep history untouched), counted and warned about; K bad
steps in a row stop the run with one line, a non-zero exit, MLflow status FAILED and the newest
finite checkpoint kept as latest. NaN is injected by a test harness (tests/integration/nan_inject.py).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import REPO, TINY_MODEL, child_env
from trainer.distributed import free_port

pytestmark = pytest.mark.slow


def _run(args: list[str], **env: str) -> list[subprocess.CompletedProcess[str]]:
    """Two ranks started by hand (the launcher contract: RANK, LOCAL_RANK, WORLD_SIZE, MASTER_*), so each
    rank's own exit status and stderr can be checked (torchrun folds them into its own)."""
    port = str(free_port())
    procs = [
        subprocess.Popen(
            [sys.executable, "tests/integration/nan_inject.py", "--config", "configs/quickstart.yaml", *args],
            cwd=REPO,
            env=child_env(
                RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=port, **env
            ),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for r in range(2)
    ]
    results = []
    for p in procs:
        out, err = p.communicate(timeout=600)
        results.append(subprocess.CompletedProcess(p.args, p.returncode, out, err))
    return results


def _adam_steps(tag_dir: Path) -> set[float]:
    """AdamW's step counts in a DeepSpeed checkpoint: in the model states (ZeRO-0) or in each rank's
    optimizer partition (ZeRO 1-3)."""
    found: set[float] = set()

    def walk(node: object) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                if key == "step" and isinstance(value, torch.Tensor):
                    found.add(float(value))
                else:
                    walk(value)
        elif isinstance(node, list | tuple):
            for value in node:
                walk(value)

    for path in tag_dir.glob("*optim_states.pt"):
        walk(torch.load(path, weights_only=False))  # our own test checkpoint
    walk(torch.load(tag_dir / "mp_rank_00_model_states.pt", weights_only=False).get("optimizer"))
    return found


@pytest.mark.parametrize(
    ("precision", "zero", "mode", "log_every", "ckpt_every"),
    [("fp32", 2, "loss", 1, 2), ("bf16", 2, "grad", 5, 6), ("fp32", 0, "grad", 5, 6)],
    ids=["fp32-zero2-loss-settled", "bf16-zero2-grad-deferred", "fp32-zero0-grad-deferred"],
)
def test_nan_on_one_rank_is_skipped_then_a_streak_stops_the_run(
    digits_shards: Path, tmp_path: Path, precision: str, zero: int, mode: str, log_every: int, ckpt_every: int
) -> None:
    """With ``log_every=1`` every step's verdict is read at once; with 5 (checkpoints every 6) the verdicts
    on steps 3 and 7-9 are read a step late, after the next step was launched (no host wait): the
    skip must then be applied on the device (fused AdamW, masked EMA) and undone on the host (LR)."""
    out = tmp_path / "run"
    uri = f"sqlite:///{tmp_path / 'm.db'}"
    args = [
        *TINY_MODEL,
        "data.batch_size=8",
        f"data.root={digits_shards}",
        f"train.output_dir={out}",
        f"tracking.uri={uri}",
        "tracking.experiment=nan",
        f"train.precision={precision}",
        f"train.zero_stage={zero}",
        "train.total_steps=50",
        f"train.log_every={log_every}",
        f"train.ckpt_every={ckpt_every}",
        "train.keep_last=1",
        "train.max_bad_steps=3",
        "diffusion.timestep_sampler=loss-second-moment",
    ]
    # Attempt 3 alone (skipped, the run goes on), then attempts 8, 9, 10 in a row (the run stops).
    ranks = _run(args, NAN_ATTEMPTS="3,8-10", NAN_RANK="1", NAN_MODE=mode)
    stdout = ranks[0].stdout
    for r in ranks:
        log = r.stdout + r.stderr
        assert r.returncode == 3, log[-4000:]
        assert "Traceback" not in log, log[-4000:]
        errors = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
        assert len(errors) == 1, errors
        assert errors[0].startswith(
            "error: 3 consecutive optimizer steps had a non-finite loss or gradient (from step 7)"
        ), errors
        assert "step_00000006" in errors[0]
    # Attempt 3 is skipped on both ranks (NaN on rank 1 only), attempts 4-7 train steps 3-6.
    assert "non-finite loss or gradient at step 3: step skipped on every rank (1 in a row, 1 in total" in stdout
    assert "(3 in a row, 4 in total" in stdout

    ckpts = out / "checkpoints"
    assert (ckpts / "latest").read_text().strip() == "step_00000006"
    assert sorted(p.name for p in ckpts.glob("step_*")) == ["step_00000006"]
    export = torch.load(ckpts / "step_00000006" / "export.pt", weights_only=True)
    for group in (export["model"], *export["ema"].values()):
        assert all(torch.isfinite(v).all() for v in group.values())
    # Skipped attempts left no trace: the LR schedule and the history count 6 steps, not 7.
    model_states = torch.load(ckpts / "step_00000006" / "mp_rank_00_model_states.pt", weights_only=False)
    assert model_states["lr_scheduler"]["last_epoch"] == 6
    assert _adam_steps(ckpts / "step_00000006") == {6.0}  # the fused kernel undid its count on the skip
    common = torch.load(ckpts / "step_00000006" / "trainer" / "common.pt", weights_only=True)
    history = common["timestep_sampler"]  # the newest step's pairs are folded one step later
    assert int(history["writes"].sum()) + len(history["exchanged_unfolded"]) == 6 * 8 * 2  # 6 kept steps x 2 x 8
    assert common["trainer"]["step"] == 6 and common["trainer"]["skipped_steps"] == 1

    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    (run,) = client.search_runs([client.get_experiment_by_name("nan").experiment_id])
    assert run.info.status == "FAILED"
    losses = client.get_metric_history(run.info.run_id, "train/loss")
    assert [m.step for m in losses] == [s for s in range(1, 7) if s % log_every == 0]
    assert all(m.value == m.value for m in losses)  # no NaN ever logged
    skipped = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "train/skipped_steps")}
    assert skipped == {s: float(s >= 3) for s in range(1, 7) if s % log_every == 0}
