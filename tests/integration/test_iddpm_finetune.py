"""An improved-diffusion checkpoint imported, fine-tuned on the digits (``train.init_from``), and resumed.

The import is reference case (a) of tests/ref/iddpm (learned range, cosine, T = 4000, rescaled timesteps), so the
fine-tune also trains through ``model.rescale_timesteps``. The digits are made 32x32 RGB, the smallest images its
flags build. Checked: the run starts from the imported weights (an EMA at 0.9999 barely moves in 10 steps, a
fresh network would be far from them), a second launch resumes at step 10 and reaches step 20, a network that
does not fit the export stops at once with one line.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import REPO, run_cmd
from tests.ref.iddpm_weights import redraw
from trainer.convert import from_iddpm
from trainer.export import load_export

pytestmark = pytest.mark.slow

CASE = REPO / "tests" / "ref" / "iddpm" / "a_learned_cosine_rescaled.json"


@pytest.fixture(scope="module")
def digits32(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("digits32")
    args = ["--source", "digits", "--out", str(out), "--image-size", "32", "--channels", "3", "--val-fraction", "0.1"]
    proc = run_cmd([sys.executable, "-m", "data_prep", "make", *args, "--max-per-shard", "256", "--quiet"])
    assert proc.returncode == 0, proc.stderr
    return out


def _import(tmp: Path) -> Path:
    meta = json.loads(CASE.read_text())
    ckpt = tmp / "iddpm.pt"
    torch.save(redraw([(n, s) for n, s in meta["param_shapes"]], meta["weights_seed"]), ckpt)
    flags = " ".join(f"--{k} {v}" for k, v in meta["kwargs"].items() if k != "timestep_respacing")
    from_iddpm(str(ckpt), flags, str(tmp / "imported"))
    return tmp / "imported"


def _train(run_dir: Path, data: Path, out: Path, total: int, *extra: str) -> tuple[int, str]:
    cmd = [
        sys.executable,
        "trainer/main.py",
        "--config",
        str(run_dir / "config.yaml"),
        f"data.root={data}",
        "data.batch_size=4",
        "data.num_workers=0",
        f"train.output_dir={out}",
        f"train.init_from={run_dir}",
        f"train.total_steps={total}",
        "train.ckpt_every=10",
        "train.log_every=5",
        "train.zero_stage=2",
        "train.precision=fp32",
        "sample.num_samples=2",
        "sample.batch_size=2",
        "sample.steps=3",
        "tracking.enabled=false",
        *extra,
    ]
    proc = run_cmd(cmd, timeout=900)
    return proc.returncode, proc.stdout + proc.stderr


def test_import_finetune_resume(digits32: Path, tmp_path: Path) -> None:
    run_dir = _import(tmp_path)
    imported = load_export(run_dir)["model"]
    out = tmp_path / "ft"
    rc, log = _train(run_dir, digits32, out, 10)
    assert rc == 0, log[-3000:]
    assert "train.init_from: model and EMA start from" in log
    first = load_export(out / "checkpoints")
    assert first["step"] == 10
    ema = first["ema"]["0.9999"]
    # EMA_10 = init + (1 − 0.9999^k)-weighted updates: within ~1e-3 of the weights it started from.
    drift = max(float((ema[k] - imported[k]).abs().max()) for k in imported)
    assert drift < 1e-2, drift
    moved = max(float((first["model"][k] - imported[k]).abs().max()) for k in imported)
    assert moved > 10 * drift  # the raw weights did train
    assert first["config"]["model"]["rescale_timesteps"] is True

    rc, log = _train(run_dir, digits32, out, 20)
    assert rc == 0, log[-3000:]
    second = load_export(out / "checkpoints")
    assert second["step"] == 20
    assert not torch.equal(second["model"]["out.1.weight"], first["model"]["out.1.weight"])
    assert all(torch.isfinite(v).all() for v in second["model"].values())


def test_init_from_a_network_that_does_not_fit(digits32: Path, tmp_path: Path) -> None:
    run_dir = _import(tmp_path)
    rc, log = _train(run_dir, digits32, tmp_path / "bad", 10, "model.channels=64")
    assert rc == 2
    lines = [ln for ln in log.strip().splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and "train.init_from:" in lines[0] and "model.channels is 64" in lines[0], log[-2000:]


def test_init_from_under_zero3(digits32: Path, tmp_path: Path) -> None:
    """The weights are loaded into the network before DeepSpeed partitions it: ZeRO-3 starts from them too."""
    run_dir = _import(tmp_path)
    imported = load_export(run_dir)["model"]
    rc, log = _train(run_dir, digits32, tmp_path / "z3", 2, "train.zero_stage=3", "train.ckpt_every=2")
    assert rc == 0, log[-3000:]
    ema = load_export(tmp_path / "z3" / "checkpoints")["ema"]["0.9999"]
    assert max(float((ema[k] - imported[k]).abs().max()) for k in imported) < 1e-2
