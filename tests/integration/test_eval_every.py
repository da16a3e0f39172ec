"""``train.eval_every`` end to end: quality metrics in a real MLflow file store against the step, training
unchanged bit for bit by the evaluations, 2 ranks, and the one-line start-up error for a missing reference.

FID uses a small classifier trained here on the digits (the Inception weights cannot be downloaded here)."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import REPO, TINY_MODEL, child_env, run_cmd, torchrun_cmd
from tests.integration.test_exact_resume import assert_identical, checkpoint_contents

pytestmark = pytest.mark.slow

TOTAL = 5
COMMON = [
    *TINY_MODEL,
    "data.batch_size=8",
    "train.precision=fp32",
    "train.log_every=1",
    f"train.total_steps={TOTAL}",
    f"train.ckpt_every={TOTAL}",
]
EVAL = [
    "train.eval_every=2",
    "train.eval_images=16",
    "train.eval_timesteps=8",
    "train.eval_fid_samples=16",
    "train.eval_sample_steps=ddim4",
]


@pytest.fixture(scope="module")
def fid_files(digits_shards: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A digits classifier (2 epochs) and the reference statistics of the train split under it."""
    from trainer.config import DataConfig
    from trainer.data import load_manifest, read_ranges
    from trainer.evaluation.features import train_classifier
    from trainer.evaluation.quality import save_reference

    info = load_manifest(str(digits_shards))
    cfg = DataConfig(root=str(digits_shards), batch_size=256, num_workers=0, pin_memory=False, random_flip=False)
    chunks = list(read_ranges(cfg, info, "train", [(0, 512)]))
    pos = np.concatenate([p.numpy() for _, _, p in chunks])
    order = np.argsort(pos)
    x = np.concatenate(
        [((x + 1) * 127.5).round().clamp(0, 255).byte().permute(0, 2, 3, 1).numpy() for x, _, _ in chunks]
    )
    y = np.concatenate([y.numpy() for _, y, _ in chunks])
    images, labels = x[order], y[order]
    net = train_classifier(images, labels, info.num_classes, epochs=2, seed=0)
    out = tmp_path_factory.mktemp("fid")
    net.save(out / "classifier.pt")
    save_reference(out / "ref.npz", net.extract(images), {"feature_net": net.name})
    return out / "classifier.pt", out / "ref.npz"


def _cmd(args: list[str], nproc: int = 1) -> list[str]:
    if nproc > 1:
        return torchrun_cmd(nproc, args)
    return [sys.executable, "trainer/main.py", "--config", "configs/quickstart.yaml", *args]


def _train_all(*runs: list[str], nproc: int = 1) -> list[str]:
    """Run the trainings side by side (start-up is mostly imports, which overlap well); their logs."""
    procs = [
        subprocess.Popen(_cmd(a, nproc), cwd=REPO, env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        for a in runs
    ]
    logs = []
    try:
        for proc in procs:
            out, _ = proc.communicate(timeout=300)
            logs.append(out.decode(errors="replace"))
            assert proc.returncode == 0, logs[-1][-4000:]
    finally:
        for proc in procs:  # a failed or stuck run must not leave the other one running
            if proc.poll() is None:
                proc.kill()
                proc.wait(60)
    return logs


def _history(uri: str, experiment: str, key: str) -> dict[int, float]:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    (run,) = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    points = client.get_metric_history(run.info.run_id, key)
    return {m.step: m.value for m in points}


def test_eval_every_logs_quality_and_leaves_training_unchanged(
    digits_shards: Path, fid_files: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    classifier, ref = fid_files
    uri = f"file://{tmp_path / 'mlruns'}"
    base = [*COMMON, f"data.root={digits_shards}", f"tracking.uri={uri}"]
    on = [*EVAL, f"train.eval_features={classifier}", f"train.eval_reference={ref}"]
    log, _ = _train_all(
        [*base, *on, "tracking.experiment=evals_on", f"train.output_dir={tmp_path / 'on'}"],
        [*base, "tracking.experiment=evals_off", f"train.output_dir={tmp_path / 'off'}"],
    )

    evals = [ln for ln in log.splitlines() if ln.startswith("eval step ")]
    assert [ln.split(":")[0] for ln in evals] == ["eval step 2", "eval step 4", "eval step 5"], log[-3000:]
    assert all("val bits/dim" in ln and "fid" in ln for ln in evals)

    bpd = _history(uri, "evals_on", "eval/val_bpd_est")
    assert sorted(bpd) == [2, 4, 5]  # every eval_every steps, and the last step
    assert all(math.isfinite(v) and v > 0 for v in bpd.values())
    parts = ["eval/val_bpd_t0", "eval/val_bpd_q1", "eval/val_bpd_q2", "eval/val_bpd_q3", "eval/val_bpd_q4"]
    total = sum(_history(uri, "evals_on", k)[5] for k in [*parts, "eval/val_prior_bpd"])
    assert total == pytest.approx(bpd[5], rel=1e-9)
    assert _history(uri, "evals_on", "eval/val_images") == {2: 16.0, 4: 16.0, 5: 16.0}
    fid = _history(uri, "evals_on", "eval/fid")
    assert sorted(fid) == [2, 4, 5] and all(math.isfinite(v) and v >= 0 for v in fid.values())
    for key in ("eval/precision", "eval/recall"):
        assert all(0.0 <= v <= 1.0 for v in _history(uri, "evals_on", key).values())
    assert sorted(_history(uri, "evals_on", "eval/kid")) == [2, 4, 5]
    assert not _history(uri, "evals_off", "eval/val_bpd_est")

    # Training did not notice: the same losses and, bit for bit, the same final checkpoint (weights,
    # optimizer, EMA, RNG streams, data position), apart from the eval settings in the saved config.
    assert _history(uri, "evals_on", "train/loss") == _history(uri, "evals_off", "train/loss")
    tag = f"checkpoints/step_{TOTAL:08d}"

    def contents(run: str) -> dict:
        skip = ("eval_", "/tracking/experiment")
        return {k: v for k, v in checkpoint_contents(tmp_path / run / tag).items() if not any(s in k for s in skip)}

    assert assert_identical(contents("on"), contents("off")) == 0.0


def test_two_ranks(digits_shards: Path, fid_files: tuple[Path, Path], tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    classifier, ref = fid_files
    uri = f"file://{tmp_path / 'mlruns'}"
    args = [
        *COMMON,
        *EVAL,
        "train.total_steps=4",
        f"train.eval_features={classifier}",
        f"train.eval_reference={ref}",
        f"data.root={digits_shards}",
        f"tracking.uri={uri}",
        "tracking.experiment=two",
        f"train.output_dir={tmp_path / 'run'}",
    ]
    (log,) = _train_all(args, nproc=2)
    assert sum(ln.startswith("eval step ") for ln in log.splitlines()) == 2, log[-3000:]  # rank 0 prints
    bpd = _history(uri, "two", "eval/val_bpd_est")
    assert sorted(bpd) == [2, 4] and all(math.isfinite(v) and v > 0 for v in bpd.values())
    assert set(_history(uri, "two", "eval/val_images").values()) == {16.0}  # every image once over the ranks
    assert sorted(_history(uri, "two", "eval/fid")) == [2, 4]


def test_missing_reference_stops_at_start_in_one_line(digits_shards: Path, tmp_path: Path) -> None:
    missing = tmp_path / "nope.npz"
    proc = run_cmd(
        [
            sys.executable,
            "trainer/main.py",
            "--config",
            "configs/quickstart.yaml",
            *COMMON,
            *EVAL,
            "train.eval_features=inception",
            f"train.eval_reference={missing}",
            f"data.root={digits_shards}",
            "tracking.enabled=false",
            f"train.output_dir={tmp_path / 'run'}",
        ],
        timeout=300,
    )
    assert proc.returncode == 2, (proc.stdout + proc.stderr)[-3000:]
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and f"reference {missing}: no such file" in errors[0], proc.stderr[-3000:]
    assert "step 1/" not in proc.stdout
