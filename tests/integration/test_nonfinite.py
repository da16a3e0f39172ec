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


@pytest.mark.parametrize(("precision", "zero", "mode"), [("fp32", 2, "loss"), ("bf16", 2, "grad"), ("fp32", 0, "grad")])
def test_nan_on_one_rank_is_skipped_then_a_streak_stops_the_run(
    digits_shards: Path, tmp_path: Path, precision: str, zero: int, mode: str
) -> None:
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
        "train.log_every=1",
        "train.ckpt_every=2",
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
    common = torch.load(ckpts / "step_00000006" / "trainer" / "common.pt", weights_only=True)
    history = common["timestep_sampler"]  # the newest step's pairs are folded one step later
    assert int(history["writes"].sum()) + len(history["exchanged_unfolded"]) == 6 * 8 * 2  # 6 kept steps x 2 x 8
    assert common["trainer"]["step"] == 6 and common["trainer"]["skipped_steps"] == 1

    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    (run,) = client.search_runs([client.get_experiment_by_name("nan").experiment_id])
    assert run.info.status == "FAILED"
    losses = client.get_metric_history(run.info.run_id, "train/loss")
    assert [m.step for m in losses] == [1, 2, 3, 4, 5, 6]
    assert all(m.value == m.value for m in losses)  # no NaN ever logged
    skipped = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "train/skipped_steps")}
    assert skipped[2] == 0 and skipped[3] == 1
