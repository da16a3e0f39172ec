"""Post-hoc EMA across ranks: a 2-rank ZeRO-3 run writes sharded snapshots (each rank its own slice); the
reconstruction on 2 ranks (torchrun, gloo) equals the one on 1 rank bit for bit (each parameter is
computed by one rank with the same float64 operations in the same order, whatever the number of ranks);
the export samples with trainer/sample.py unchanged; bad requests are one line, exit status 2."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import TINY_MODEL, run_cmd, torchrun_cmd
from trainer.distributed import free_port

pytestmark = pytest.mark.slow


def _reconstruct(nproc: int, run_dir: Path, out: Path, *args: str) -> tuple[int, str]:
    tail = ["reconstruct", str(run_dir), "--out", str(out), *args]
    if nproc == 1:
        cmd = [sys.executable, "-m", "trainer.phema", *tail]
    else:
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            f"--nproc_per_node={nproc}",
            f"--master_port={free_port()}",
        ]
        cmd += ["-m", "trainer.phema", *tail]
    proc = run_cmd(cmd, timeout=600)
    return proc.returncode, proc.stdout + proc.stderr


def test_zero3_snapshots_reconstruct_the_same_on_one_and_two_ranks(digits_shards: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    args = [
        *TINY_MODEL,
        f"data.root={digits_shards}",
        "data.batch_size=8",
        f"train.output_dir={run}",
        "tracking.enabled=false",
        "train.zero_stage=3",
        "train.precision=fp32",
        "train.total_steps=12",
        "train.ckpt_every=12",
        "train.phema.enabled=true",
        "train.phema.every_steps=3",
    ]
    proc = run_cmd(torchrun_cmd(2, args), timeout=600)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-4000:]
    assert "post-hoc EMA: profiles sigma_rel [0.05, 0.1], a snapshot every 3 steps" in log
    index = json.loads((run / "phema" / "index.json").read_text())["snapshots"]
    assert [e["step"] for e in index] == [3, 6, 9, 12] and all(e["files"] == ["rank_0.pt", "rank_1.pt"] for e in index)

    one, two = tmp_path / "one", tmp_path / "two"
    sigmas = ["--sigma-rel", "0.05", "0.07", "0.12"]
    rc1, log1 = _reconstruct(1, run, one, *sigmas)
    assert rc1 == 0, log1[-3000:]
    rc2, log2 = _reconstruct(2, run, two, *sigmas)
    assert rc2 == 0, log2[-3000:]
    for name in ("sigma0.0500_step00000012", "sigma0.0700_step00000012", "sigma0.1200_step00000012"):
        a = torch.load(one / name / "export.pt", weights_only=True)
        b = torch.load(two / name / "export.pt", weights_only=True)
        assert a["model"].keys() == b["model"].keys() and a["meta"]["phema"] == b["meta"]["phema"]
        for key, tensor in a["model"].items():
            assert torch.equal(tensor, b["model"][key]), (name, key)
        (ema,) = a["ema"].values()  # the run's sampling EMA rate holds the reconstruction too
        assert all(torch.equal(ema[k], v) for k, v in a["model"].items())
    # The tracked profile at its own snapshot step is that snapshot: both ranks' slices, concatenated.
    rec = torch.load(one / "sigma0.0500_step00000012" / "export.pt", weights_only=True)["model"]
    shards = [torch.load(run / "phema" / "snap_00000012" / f"rank_{r}.pt", weights_only=True) for r in (0, 1)]
    for key, tensor in rec.items():
        flat = torch.cat([s["shadows"]["0.05"][key].reshape(-1) for s in shards])[: tensor.numel()]
        torch.testing.assert_close(tensor.reshape(-1), flat, rtol=1e-5, atol=0)
    # A normal export: trainer/sample.py reads it unchanged.
    proc = run_cmd(
        [
            sys.executable,
            "trainer/sample.py",
            str(one / "sigma0.0700_step00000012"),
            "--num-samples",
            "4",
            "--steps",
            "5",
        ]
    )
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    assert "weights, step 12" in proc.stdout

    # Bad requests: one line each, exit status 2.
    for extra, expected in (
        (["--sigma-rel", "0.4"], "out of range (0, 0.2887]"),
        (["--sigma-rel", "0.001"], "is out of range of the 4 snapshots"),
        (["--sigma-rel", "0.07", "--step", "5"], "--step 5: no snapshot at that step"),
    ):
        rc, out = _reconstruct(1, run, tmp_path / "bad", *extra)
        lines = [ln for ln in out.splitlines() if ln.startswith("error:")]
        assert rc == 2 and len(lines) == 1 and expected in lines[0] and "Traceback" not in out, out[-2000:]
    (run / "phema" / "snap_00000006" / "rank_1.pt").unlink()
    rc, out = _reconstruct(1, run, tmp_path / "bad", "--sigma-rel", "0.07")
    assert rc == 2 and "snap_00000006/rank_1.pt: listed in" in out and "Traceback" not in out, out[-2000:]
    shutil.move(run / "phema" / "index.json", run / "phema" / "index.old")
    rc, out = _reconstruct(1, run, tmp_path / "bad", "--sigma-rel", "0.07")
    assert rc == 2 and "index.json: missing" in out and "Traceback" not in out, out[-2000:]
