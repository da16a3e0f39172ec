"""Storage faults with real full disks: a size-limited tmpfs as the output directory, 2 real gloo ranks.

- Room for one checkpoint and not two (background saves, ``train.ckpt_failures_allowed=1``): the second save
  fails, one warning line, training goes on; the final save fails too and the run stops with one error line,
  exit 5, MLflow FAILED; ``latest`` still names the first checkpoint and no partial directory is left. After
  the file system is grown, ``--resume auto`` ends bit for bit where the uninterrupted run ends.
- Room for none (synchronous saves, default policy): two warnings, then the final save stops the run; no
  checkpoint directory at all; after growing the disk the run starts afresh and ends equal too.
- kill -9 while a background save is being written (the writer held at a known file by a test hook,
  tests/integration/hold_writer.py): ``latest`` stays on the previous complete checkpoint; the resume removes
  the partial directory, continues from it and ends equal to the uninterrupted run.

Mounting needs root; without it the tests skip and say why.
"""

from __future__ import annotations

import contextlib
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import REPO, TINY_MODEL, child_env, torchrun_cmd
from tests.integration.test_exact_resume import _descendants, _signal_all, assert_identical, checkpoint_contents
from trainer.distributed import free_port
from trainer.storage import tree_bytes

pytestmark = pytest.mark.slow

TOTAL, EVERY = 24, 8
FINAL = f"step_{TOTAL:08d}"
SETTINGS_THAT_DIFFER = ("/train/async_checkpoint", "/train/ckpt_failures_allowed")
"""Config values the fault runs set differently from the straight run (they change no training state)."""


def _args(shards: Path, out: Path, uri: str, *extra: str) -> list[str]:
    return [
        *TINY_MODEL,
        "data.batch_size=8",
        f"data.root={shards}",
        f"train.output_dir={out}",
        f"tracking.uri={uri}",
        "tracking.experiment=storage",
        "train.zero_stage=2",
        "train.precision=fp32",
        f"train.total_steps={TOTAL}",
        f"train.ckpt_every={EVERY}",
        "train.log_every=4",
        "train.keep_last=2",
        *extra,
    ]


def _launch(args: list[str]) -> list[subprocess.CompletedProcess[str]]:
    """Two ranks started by hand, so each rank's exit status and stderr are its own (torchrun folds them)."""
    port = str(free_port())
    procs = [
        subprocess.Popen(
            [sys.executable, "trainer/main.py", "--config", "configs/quickstart.yaml", *args],
            cwd=REPO,
            env=child_env(RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=port),
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


def _ok(ranks: list[subprocess.CompletedProcess[str]]) -> str:
    log = "".join(r.stdout + r.stderr for r in ranks)
    assert [r.returncode for r in ranks] == [0, 0], log[-4000:]
    return log


def _contents(tag_dir: Path) -> dict[str, Any]:
    return {k: v for k, v in checkpoint_contents(tag_dir).items() if not any(d in k for d in SETTINGS_THAT_DIFFER)}


def _status(uri: str) -> str:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    (run,) = client.search_runs([client.get_experiment_by_name("storage").experiment_id])
    return run.info.status


@contextlib.contextmanager
def _tmpfs(path: Path, size: int) -> Iterator[Path]:
    path.mkdir()
    proc = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size // 1024}k", "tmpfs", str(path)], capture_output=True, text=True
    )
    if proc.returncode != 0:
        pytest.skip(
            f"cannot mount a size-limited tmpfs ({' '.join(proc.stderr.split()) or 'mount failed'}): needs root"
        )
    try:
        yield path
    finally:
        if subprocess.run(["umount", str(path)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(path)], capture_output=True)


def _grow(path: Path, size: int) -> None:
    subprocess.run(["mount", "-o", f"remount,size={size // 1024}k", str(path)], check=True)


@pytest.fixture(scope="module")
def straight(digits_shards: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[int, dict[str, Any]]:
    """The uninterrupted run: the size of one checkpoint and the final checkpoint's contents."""
    root = tmp_path_factory.mktemp("straight")
    _ok(_launch(_args(digits_shards, root / "run", f"sqlite:///{root / 'm.db'}")))
    ckpts = root / "run" / "checkpoints"
    return tree_bytes(ckpts / f"step_{EVERY * 2:08d}"), _contents(ckpts / FINAL)


def _check_failed_run(ranks: list[subprocess.CompletedProcess[str]], warnings: int) -> tuple[list[str], str]:
    """Exit 5 on both ranks, no traceback, one error line per rank, ``warnings`` checkpoint warnings."""
    log = "".join(r.stdout + r.stderr for r in ranks)
    assert [r.returncode for r in ranks] == [5, 5], log[-4000:]
    assert "Traceback" not in log, log[-4000:]
    for r in ranks:
        errors = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
        assert len(errors) == 1, errors
    error = [ln for ln in ranks[0].stderr.splitlines() if ln.startswith("error:")][0]
    found = [ln for ln in ranks[0].stdout.splitlines() if ln.startswith("warning: checkpoint")]
    assert len(found) == warnings, found
    assert not [ln for ln in ranks[1].stdout.splitlines() if ln.startswith("warning: checkpoint")]
    print(*found, error, sep="\n")  # what the user sees (pytest -rP shows it)
    return found, error


def test_room_for_one_checkpoint_not_two(
    straight: tuple[int, dict[str, Any]], digits_shards: Path, tmp_path: Path
) -> None:
    size, final = straight
    uri = f"sqlite:///{tmp_path / 'm.db'}"
    with _tmpfs(tmp_path / "disk", size * 3 // 2 + 100_000) as disk:
        out = disk / "run"
        args = _args(digits_shards, out, uri, "train.ckpt_failures_allowed=1")
        warnings, error = _check_failed_run(_launch(args), warnings=1)
        ckpts = out / "checkpoints"
        (warning,) = warnings
        assert warning.startswith(f"warning: checkpoint {ckpts / 'step_00000016'} not saved (rank "), warning
        assert "[Errno 28] No space left on device" in warning and "MB) free on " in warning
        assert "latest is still step_00000008" in warning and "training goes on" in warning
        assert error.startswith(f"error: checkpoint {ckpts / FINAL} not saved"), error
        assert "latest is still step_00000008" in error and "stopping (exit 5)" in error
        assert (ckpts / "latest").read_text().strip() == "step_00000008"
        assert sorted(p.name for p in ckpts.glob("step_*")) == ["step_00000008"]  # no partial directory
        assert _status(uri) == "FAILED"

        _grow(disk, size * 6)
        log = _ok(_launch(args))
        assert f"resumed from {ckpts / 'step_00000008'} at step 8" in log
        assert assert_identical(final, _contents(ckpts / FINAL)) == 0.0


def test_room_for_no_checkpoint(straight: tuple[int, dict[str, Any]], digits_shards: Path, tmp_path: Path) -> None:
    size, final = straight
    uri = f"sqlite:///{tmp_path / 'm.db'}"
    with _tmpfs(tmp_path / "disk", size // 2) as disk:
        out = disk / "run"
        args = _args(digits_shards, out, uri, "train.async_checkpoint=false")
        ranks = _launch(args)
        start = [ln for ln in ranks[0].stdout.splitlines() if ln.startswith(f"warning: {out / 'checkpoints'} has ")]
        assert len(start) == 1 and "estimated from the model and optimizer" in start[0], ranks[0].stdout[-3000:]
        warnings, error = _check_failed_run(ranks, warnings=2)
        assert all("latest is still none (no checkpoint yet)" in w for w in warnings), warnings
        assert "failure 2 in a row, train.ckpt_failures_allowed=3" in warnings[1]
        assert "no checkpoint step follows: stopping (exit 5)" in error, error
        ckpts = out / "checkpoints"
        assert not (ckpts / "latest").exists() and not list(ckpts.glob("step_*"))
        assert _status(uri) == "FAILED"

        _grow(disk, size * 6)
        log = _ok(_launch(args))
        assert "no checkpoint in" in log
        assert assert_identical(final, _contents(ckpts / FINAL)) == 0.0


def test_kill_during_background_write_keeps_previous_latest(
    straight: tuple[int, dict[str, Any]], digits_shards: Path, tmp_path: Path
) -> None:
    _, final = straight
    out = tmp_path / "run"
    args = _args(digits_shards, out, f"sqlite:///{tmp_path / 'm.db'}")
    proc = subprocess.Popen(
        torchrun_cmd(2, args, script="tests/integration/hold_writer.py"),
        cwd=REPO,
        env=child_env(HOLD_SAVE="16"),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    seen: list[str] = []
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            seen.append(line)
            if sum(ln.startswith("writer held at step 16") for ln in seen) == 2:
                break
        assert sum(ln.startswith("writer held at step 16") for ln in seen) == 2, "".join(seen)[-3000:]
        _signal_all([proc.pid, *_descendants(proc.pid)], signal.SIGKILL)
        proc.wait(60)
    finally:
        if proc.poll() is None:
            _signal_all([proc.pid, *_descendants(proc.pid)], signal.SIGKILL)
            proc.wait(60)
    ckpts = out / "checkpoints"
    assert (ckpts / "latest").read_text().strip() == "step_00000008"
    assert (ckpts / "step_00000016").is_dir() and not (ckpts / "step_00000016" / "COMPLETE").exists()
    assert any((ckpts / "step_00000016").glob("*optim_states.pt"))  # held mid-save: DeepSpeed's files are there

    log = _ok(_launch(args))
    assert f"removed {ckpts / 'step_00000016'}: an interrupted save" in log, log[-3000:]
    assert f"resumed from {ckpts / 'step_00000008'} at step 8" in log
    assert assert_identical(final, _contents(ckpts / FINAL)) == 0.0
