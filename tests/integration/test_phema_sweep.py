"""The post-hoc EMA sweep on a tiny real run: reconstruct several σ_rel, evaluate each (and the run's
fixed-rate EMA) on bits/dim with the same images, timesteps and noise, and find the table, the plot and the
best σ_rel in the training run's MLflow store."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from tests.conftest import TINY_MODEL, run_cmd

pytestmark = pytest.mark.slow


def test_sweep_evaluates_every_reconstruction_and_logs_to_the_run(digits_shards: Path, tmp_path: Path) -> None:
    run, uri = tmp_path / "run", f"sqlite:///{tmp_path / 'mlflow.db'}"
    train = [sys.executable, "trainer/main.py", "--config", "configs/quickstart.yaml", *TINY_MODEL]
    train += [f"data.root={digits_shards}", f"train.output_dir={run}", f"tracking.uri={uri}", "tracking.experiment=sw"]
    train += ["train.zero_stage=0", "train.precision=fp32", "train.total_steps=20", "train.ckpt_every=20"]
    train += ["train.phema.enabled=true", "train.phema.every_steps=2", "train.ema_rates=[0.9]"]
    proc = run_cmd(train, timeout=600)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]

    cmd = [sys.executable, "-m", "trainer.phema", "reconstruct", str(run), "--sigma-rel", "0.05", "0.07", "0.1"]
    cmd += ["--eval", "bpd", "--eval-images", "16", "--eval-timesteps", "4"]
    proc = run_cmd(cmd, timeout=600)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-4000:]
    report = json.loads((run / "phema" / "reconstructed" / "sweep_step00000020" / "sweep.json").read_text())
    rows = {r["model"]: r for r in report["rows"]}
    assert set(rows) == {"sigma_rel 0.0500", "sigma_rel 0.0700", "sigma_rel 0.1000", "ema 0.9"}
    assert report["tracked"] == [0.05, 0.1]
    values = [r["bpd"] for r in report["rows"]]
    assert all(isinstance(v, float) and 0 < v < 20 for v in values) and len(set(values)) == len(values)
    best = min((r for r in report["rows"] if r["sigma_rel"] is not None), key=lambda r: r["bpd"])
    assert report["best"]["bpd"] == best
    assert f"best by bpd: sigma_rel {best['sigma_rel']:.4f}" in log
    # The evaluation's heading names the sweep, not a training cadence (eval_every=1 is only how it is driven).
    assert "post-hoc EMA sweep at step 20: every model evaluated the same way: bits/dim estimate on 16" in log
    assert "evaluation every" not in log

    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    (mlrun,) = client.search_runs([client.get_experiment_by_name("sw").experiment_id])
    names = {a.path for a in client.list_artifacts(mlrun.info.run_id, "phema/sweep_step20")}
    assert names == {f"phema/sweep_step20/{f}" for f in ("sweep.json", "sweep.md", "sweep_bpd.png")}
    assert mlrun.data.metrics["phema/best_sigma_rel_bpd"] == pytest.approx(best["sigma_rel"])
    assert mlrun.data.metrics["phema/best_bpd"] == pytest.approx(best["bpd"])
