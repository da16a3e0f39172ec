"""``trainer/sample.py --method pc`` on 1 and 2 ranks (torchrun, gloo): the same images bit for bit, since every part
is seeded on its own and the corrector's step size is per sample (not per batch). Its predictor is ``--method sde``'s
Euler–Maruyama step, so this covers both samplers' distribution over ranks."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tests.conftest import run_cmd, train_tiny_export
from tests.integration.test_distributed_inference import launch, ok, sample_args

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("method", ["pc"])
def test_score_samplers_same_on_one_and_two_ranks(method: str, digits_shards: Path, tmp_path: Path) -> None:
    export = train_tiny_export(digits_shards, tmp_path / "run", "diffusion.steps=20", "train.total_steps=3")
    extra = ["--snr", "0.1", "--corrector-steps", "2"] if method == "pc" else []
    for nproc, name in ((1, "one"), (2, "two")):
        args = [*sample_args(export, tmp_path / name, n=10, method=method, steps="7"), *extra]
        ok(run_cmd(launch("trainer/sample.py", args, nproc)))
    one, two = (np.load(tmp_path / name / "samples.npz")["arr_0"] for name in ("one", "two"))
    assert one.shape == (10, 16, 16, 1) and np.array_equal(one, two)
    assert one.std() > 0  # not a constant image
