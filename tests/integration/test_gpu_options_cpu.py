"""The GPU-oriented options run on the CPU too, through the real DeepSpeed engine and the real step, so that
their first GPU run is not their first run: ``train.compile`` (inductor on the CPU) and ``model.channels_last``.

Compiled and NHWC training must train the same model as the plain one: same losses at every step and the
same weights after three steps, up to the reordering of float operations (dropout off: inductor draws its
own dropout masks).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import TINY_MODEL, run_cmd

pytestmark = pytest.mark.slow

STEPS = 3


def _train(shards: Path, out: Path, extra: list[str]) -> tuple[str, dict[int, float]]:
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{out}.db"
    args = [
        *TINY_MODEL,
        "diffusion.steps=20",
        "model.dropout=0",
        f"data.root={shards}",
        "data.batch_size=4",
        f"train.total_steps={STEPS}",
        "train.log_every=1",
        "train.precision=fp32",
        "train.zero_stage=0",
        f"train.output_dir={out}",
        f"tracking.uri={uri}",
        "tracking.experiment=gpu-options",
        *extra,
    ]
    proc = run_cmd([sys.executable, "trainer/main.py", "--config", "configs/quickstart.yaml", *args], timeout=900)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-4000:]
    client = MlflowClient(tracking_uri=uri)
    (run,) = client.search_runs([client.get_experiment_by_name("gpu-options").experiment_id])
    return log, {m.step: m.value for m in client.get_metric_history(run.info.run_id, "train/loss")}


def test_compile_and_channels_last_train_the_same_model(digits_shards: Path, tmp_path: Path) -> None:
    _, plain = _train(digits_shards, tmp_path / "plain", [])
    log, fast = _train(digits_shards, tmp_path / "fast", ["train.compile=true", "model.channels_last=true"])
    assert "train.compile: the UNet is compiled" in log
    assert sorted(plain) == sorted(fast) == list(range(1, STEPS + 1))
    for step in plain:
        assert fast[step] == pytest.approx(plain[step], rel=1e-4), step
    export = f"checkpoints/step_{STEPS:08d}/export.pt"
    a = torch.load(tmp_path / "plain" / export, weights_only=True)["model"]
    b = torch.load(tmp_path / "fast" / export, weights_only=True)["model"]
    assert a.keys() == b.keys()
    # Over the whole model: a near-zero gradient component whose sign the reordering flips moves its weight
    # by ~2·lr under Adam, which no per-element tolerance survives, and the norm does not notice.
    diff = sum(float((a[k] - b[k]).double().square().sum()) for k in a) ** 0.5
    norm = sum(float(a[k].double().square().sum()) for k in a) ** 0.5
    assert diff <= 1e-5 * norm, diff / norm
