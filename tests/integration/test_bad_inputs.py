"""Bad inputs to the real CLIs: each ends as one ``error:`` line on stderr naming the problem, exit status 2,
and nothing half-written that a later run would trust.

Only the tests that need a trained export (one 2-step training run, shared) are marked slow; every other
command here must fail before any training starts.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from data_prep.manifest import Manifest, SplitInfo, write_json_atomic
from tests.conftest import TINY_MODEL, run_cmd, train_tiny_export

TRAIN = [sys.executable, "trainer/main.py", "--config", "configs/quickstart.yaml", *TINY_MODEL]
SAMPLE = [sys.executable, "trainer/sample.py"]
EVALUATE = [sys.executable, "trainer/evaluate.py"]
DATA_PREP = [sys.executable, "-m", "data_prep"]

# DeepSpeed logs "[2026-01-01 12:00:00,000] [WARNING] [real_accelerator.py:...] Setting accelerator to CPU"
# on import, before any argument is read: the one unrelated line a failing command may print.
_LIBRARY_NOISE = re.compile(r"^\[\d{4}-\d\d-\d\d [\d:,]+\] \[(WARNING|INFO)\] ")


def error_line(proc: subprocess.CompletedProcess[str]) -> str:
    """The single ``error:`` line of a command that must fail with exit status 2."""
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip() and not _LIBRARY_NOISE.match(ln)]
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-3000:])
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr[-3000:]
    return lines[0]


def tree(root: Path) -> list[str]:
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*"))


# --------------------------------------------------------------------------- trainer/main.py config


def test_bad_sample_steps_fails_at_config_load(digits_shards: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    # Many steps: if the spec slipped through, training would run far past the timeout (and fail the test)
    # instead of reaching the final grid where "abc" used to crash.
    cmd = [
        *TRAIN,
        "sample.steps=abc",
        f"data.root={digits_shards}",
        f"train.output_dir={out}",
        "train.total_steps=100000",
        "tracking.enabled=false",
        "train.zero_stage=0",
    ]
    proc = run_cmd(cmd, timeout=120)
    line = error_line(proc)
    assert line.startswith("error: configs/quickstart.yaml: sample.steps: ")
    assert line.endswith("(got 'abc')")
    assert not out.exists()


def test_respacing_beyond_diffusion_steps_fails_at_config_load(tmp_path: Path) -> None:
    out = tmp_path / "run"
    proc = run_cmd([*TRAIN, "sample.steps=ddim40", f"train.output_dir={out}", "tracking.enabled=false"], timeout=120)
    line = error_line(proc)
    assert line == (
        "error: configs/quickstart.yaml: sample.steps: no integer stride gives exactly 40 of 100 steps (got 'ddim40')"
    )
    assert not out.exists()


# The next two pass once trainer/main.py (and trainer/tracking.py) check train.output_dir and
# tracking.uri before training: they are written to the same contract as the others and may fail until then.


def test_output_dir_under_a_regular_file(digits_shards: Path, tmp_path: Path) -> None:
    afile = tmp_path / "afile"
    afile.write_text("not a directory")
    out = afile / "run"
    cmd = [
        *TRAIN,
        f"data.root={digits_shards}",
        f"train.output_dir={out}",
        "train.total_steps=2",
        "tracking.enabled=false",
        "train.zero_stage=0",
    ]
    line = error_line(run_cmd(cmd, timeout=300))
    assert "train.output_dir" in line and str(out) in line
    assert afile.read_text() == "not a directory"


def test_bogus_tracking_uri(digits_shards: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    cmd = [
        *TRAIN,
        f"data.root={digits_shards}",
        f"train.output_dir={out}",
        "train.total_steps=2",
        "tracking.enabled=true",
        "tracking.uri=bogus://x",
        "train.zero_stage=0",
    ]
    line = error_line(run_cmd(cmd, timeout=300))
    assert "tracking.uri" in line and "bogus://x" in line
    assert not out.exists()


# --------------------------------------------------------------------------- data_prep


def test_make_on_folder_without_images(tmp_path: Path) -> None:
    src = tmp_path / "in"
    (src / "cat").mkdir(parents=True)
    (src / "notes.txt").write_text("not an image")
    out = tmp_path / "shards"
    line = error_line(run_cmd([*DATA_PREP, "make", "--source", "folder", "--input", str(src), "--out", str(out)]))
    assert str(src) in line and ".png" in line and ".jpg" in line
    assert not out.exists()


def test_make_on_folder_of_unreadable_images(tmp_path: Path) -> None:
    src = tmp_path / "in"
    src.mkdir()
    (src / "a.png").write_bytes(b"this is no png")
    out = tmp_path / "shards"
    # --quiet: without it the encoding progress bar (stderr) precedes the error, as it should.
    cmd = [*DATA_PREP, "make", "--source", "folder", "--input", str(src), "--out", str(out), "--quiet"]
    line = error_line(run_cmd(cmd))
    assert f"--input {src}: no readable images for the train split (1 of 1 inputs unreadable, e.g. a.png:" in line
    assert not out.exists()


def test_make_on_npz_without_images(tmp_path: Path) -> None:
    src = tmp_path / "empty.npz"
    np.savez(src, images=np.zeros((0, 8, 8), np.uint8))
    out = tmp_path / "shards"
    line = error_line(run_cmd([*DATA_PREP, "make", "--source", "npz", "--input", str(src), "--out", str(out)]))
    assert line == f"error: {src}: no images"
    assert not out.exists()


def test_verify_on_manifest_without_train_samples(tmp_path: Path) -> None:
    root = tmp_path / "shards"
    root.mkdir()
    empty = Manifest(image_size=16, channels=1, class_names=(), splits={"train": SplitInfo(), "val": SplitInfo()})
    write_json_atomic(root / "manifest.json", empty.to_json())
    proc = run_cmd([*DATA_PREP, "verify", str(root)])
    assert error_line(proc) == f"error: {root / 'manifest.json'}: no train samples (re-run `python -m data_prep make`)"
    assert "OK" not in proc.stdout


# --------------------------------------------------------------------------- sample.py / evaluate.py


@pytest.fixture(scope="module")
def export(digits_shards: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``export.pt`` of a 2-step run (plain python, one process)."""
    return train_tiny_export(digits_shards, tmp_path_factory.mktemp("export_run"), "train.total_steps=2")


def _inference_cmds(path: Path, tmp_path: Path) -> dict[str, list[str]]:
    return {
        "sample": [*SAMPLE, str(path), "--no-mlflow", "--out", str(tmp_path / "samples")],
        "evaluate": [*EVALUATE, str(path), "--no-mlflow", "--out", str(tmp_path / "eval.json"), "--max-batches", "1"],
    }


@pytest.mark.slow
@pytest.mark.parametrize("tool", ["sample", "evaluate"])
def test_export_whose_config_was_edited(export: Path, tmp_path: Path, tool: str) -> None:
    state = torch.load(export, map_location="cpu", weights_only=True)
    channels = state["config"]["model"]["channels"]
    state["config"]["model"]["channels"] = channels + 8  # still divisible by model.norm_groups: builds fine
    edited = tmp_path / "edited" / "export.pt"
    edited.parent.mkdir()
    torch.save(state, edited)
    line = error_line(run_cmd(_inference_cmds(edited, tmp_path)[tool], timeout=300))
    assert line.startswith(
        f"error: {edited}: weights do not match its config (model.channels is {channels + 8}, "
        f"the weights have {channels}): "
    )
    assert "shape mismatch 'time_embed.mlp.0.weight': saved (" in line
    # Nothing written: neither where --out points nor next to the export.
    assert tree(tmp_path) == ["edited", "edited/export.pt"]


@pytest.mark.slow
@pytest.mark.parametrize("tool", ["sample", "evaluate"])
def test_truncated_export(export: Path, tmp_path: Path, tool: str) -> None:
    blob = export.read_bytes()
    truncated = tmp_path / "cut" / "export.pt"
    truncated.parent.mkdir()
    truncated.write_bytes(blob[: len(blob) // 2])
    line = error_line(run_cmd(_inference_cmds(truncated, tmp_path)[tool], timeout=300))
    assert line.startswith(f"error: {truncated}: unreadable (")
    assert tree(tmp_path) == ["cut", "cut/export.pt"]


@pytest.mark.slow
def test_not_a_torch_file(export: Path, tmp_path: Path) -> None:
    text = tmp_path / "notes.pt"
    text.write_text("hello, not a checkpoint\n")
    line = error_line(run_cmd(_inference_cmds(text, tmp_path)["sample"], timeout=300))
    assert line.startswith(f"error: {text}: unreadable (")
    assert tree(tmp_path) == ["notes.pt"]


@pytest.mark.slow
@pytest.mark.parametrize(
    ("steps", "reason"),
    [
        ("abc", "'abc' is not a step count (expected '', 'K', 'a,b,c' or 'ddimK') (got 'abc')"),
        ("ddim40", "no integer stride gives exactly 40 of 100 steps (got 'ddim40')"),
    ],
)
def test_sample_steps_flag_checked_before_sampling(export: Path, tmp_path: Path, steps: str, reason: str) -> None:
    line = error_line(run_cmd([*_inference_cmds(export, tmp_path)["sample"], "--steps", steps], timeout=300))
    assert line == f"error: {export}: sample.steps: {reason}"
    assert tree(tmp_path) == []
