"""Distributed sampling and bits/dim: 2 ranks give the one-process result bit for bit, and a killed job
rerun with the same command redoes only what was never written (real processes, gloo, real shards)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import REPO, child_env, run_cmd, train_tiny_export

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def export(digits_shards: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("infer_run")
    return train_tiny_export(digits_shards, out, "diffusion.steps=20", "train.total_steps=3")


def launch(script: str, args: list[str], nproc: int, launcher: str = "torchrun") -> list[str]:
    if nproc == 1:
        return [sys.executable, script, *args]
    from trainer.distributed import free_port

    if launcher == "deepspeed":  # appends --local_rank=N to the script's arguments
        deepspeed = str(Path(sys.executable).parent / "deepspeed")
        return [deepspeed, f"--num_gpus={nproc}", f"--master_port={free_port()}", script, *args]
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nproc_per_node={nproc}",
        f"--master_port={free_port()}",
        script,
        *args,
    ]


def sample_args(export: Path, out: Path, n: int = 10, method: str = "ddim", steps: str = "5") -> list[str]:
    return [
        str(export),
        "--num-samples",
        str(n),
        "--batch-size",
        "4",
        "--part-size",
        "4",
        "--method",
        method,
        "--steps",
        steps,
        "--seed",
        "3",
        "--out",
        str(out),
        "--no-mlflow",
    ]


def bpd_args(export: Path, out: Path, n: int = 20) -> list[str]:
    return [str(export), "--max-images", str(n), "--batch-size", "4", "--out", str(out), "--no-mlflow", "--seed", "5"]


def ok(proc: subprocess.CompletedProcess[str]) -> subprocess.CompletedProcess[str]:
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    return proc


@pytest.mark.parametrize("launcher", ["torchrun", "deepspeed"])
def test_sampling_on_two_ranks_equals_one_process(export: Path, tmp_path: Path, launcher: str) -> None:
    ok(run_cmd(launch("trainer/sample.py", sample_args(export, tmp_path / "one"), 1)))
    ok(run_cmd(launch("trainer/sample.py", sample_args(export, tmp_path / "two"), 2, launcher)))
    one = np.load(tmp_path / "one" / "samples.npz")["arr_0"]
    two = np.load(tmp_path / "two" / "samples.npz")["arr_0"]
    assert one.shape == (10, 16, 16, 1) and one.dtype == np.uint8
    np.testing.assert_array_equal(one, two)
    # Parts differ from each other (per-part seeds), so equality above is not trivially all-equal images.
    assert not np.array_equal(one[:4], one[4:8])
    assert (tmp_path / "two" / "grid.png").stat().st_size > 0
    summary = json.loads((tmp_path / "two" / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["made_now"] == 10


def test_bpd_on_two_ranks_equals_one_process(export: Path, tmp_path: Path) -> None:
    ok(run_cmd(launch("trainer/evaluate.py", ["bpd", *bpd_args(export, tmp_path / "one.json")], 1)))
    ok(run_cmd(launch("trainer/evaluate.py", bpd_args(export, tmp_path / "two.json"), 2)))
    one = json.loads((tmp_path / "one.json").read_text())
    two = json.loads((tmp_path / "two.json").read_text())
    assert one["num_images"] == two["num_images"] == 20
    assert two["world_size"] == 2
    assert one["bits_per_dim"] == two["bits_per_dim"]
    assert one["vb_per_t"] == two["vb_per_t"]
    assert len(one["vb_per_t"]) == 20
    # The headline is the mean of the per-image bounds (summed over t in float32 per image), so it equals
    # the sum of the per-t means up to float32 rounding.
    assert one["bits_per_dim"] == pytest.approx(sum(one["vb_per_t"]) + one["prior_bpd"], rel=1e-6)


def kill_after_first_part(tool: str, args: list[str]) -> None:
    """Run ``tool`` held after its first part (tests/integration/hold_parts.py), then kill it there."""
    proc = subprocess.Popen(
        [sys.executable, "tests/integration/hold_parts.py", tool, *args],
        cwd=REPO,
        env=child_env(HOLD_AFTER="1"),
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        start_new_session=True,
    )
    try:
        assert proc.stdout is not None
        lines = []
        for line in proc.stdout:
            lines.append(line)
            if line.startswith("held after 1 part"):
                break
        assert lines and lines[-1].startswith("held after 1 part"), "".join(lines)[-2000:]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def snapshot(parts: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in parts.glob("part_*.npz")}


@pytest.mark.parametrize("tool", ["sample", "bpd"])
def test_resume_after_kill_redoes_only_missing_parts(export: Path, tmp_path: Path, tool: str) -> None:
    if tool == "sample":
        # Full 20-step DDPM on 64 samples: 16 parts.
        args = lambda out: sample_args(export, out, n=64, method="ddpm", steps="")  # noqa: E731
        make = lambda out: launch("trainer/sample.py", args(out), 1)  # noqa: E731
        parts_of = lambda out: out / "parts"  # noqa: E731
        result = lambda out: np.load(out / "samples.npz")["arr_0"]  # noqa: E731
        killed, clean = tmp_path / "killed", tmp_path / "clean"
    else:
        args = lambda out: bpd_args(export, out, n=64)  # noqa: E731
        make = lambda out: launch("trainer/evaluate.py", args(out), 1)  # noqa: E731
        parts_of = lambda out: out.parent / f"{out.stem}_parts" / "parts"  # noqa: E731
        result = lambda out: json.loads(out.read_text())["vb_per_t"]  # noqa: E731
        killed, clean = tmp_path / "killed.json", tmp_path / "clean.json"

    kill_after_first_part("sample" if tool == "sample" else "evaluate", args(killed))
    before = snapshot(parts_of(killed))
    assert len(before) == 1, f"kill landed at {len(before)} of 16 parts"
    rerun = ok(run_cmd(make(killed)))
    assert f"resuming: {len(before)} of 16 parts already" in rerun.stdout
    after = snapshot(parts_of(killed))
    assert len(after) == 16
    assert {k: after[k] for k in before} == before, "a finished part was rewritten"
    ok(run_cmd(make(clean)))
    a, b = result(killed), result(clean)
    if tool == "sample":
        np.testing.assert_array_equal(a, b)
    else:
        assert a == b


def test_rerun_with_other_settings_is_refused(export: Path, tmp_path: Path) -> None:
    ok(run_cmd(launch("trainer/sample.py", sample_args(export, tmp_path / "s"), 1)))
    proc = run_cmd(launch("trainer/sample.py", [*sample_args(export, tmp_path / "s"), "--eta", "0.5"], 1))
    assert proc.returncode == 2
    line = proc.stderr.strip().splitlines()[-1]
    assert line == (
        f"error: {tmp_path / 's'} holds parts of another job (eta: 0.0 there, 0.5 now); pass another --out or delete it"
    )
