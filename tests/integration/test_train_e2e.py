"""End-to-end training with real processes, real shards and a real MLflow store.

Each launch costs ~20 s of start-up on 2 cores, so each test checks several things per launch.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import REPO, TINY_MODEL, run_cmd
from trainer.distributed import free_port

pytestmark = pytest.mark.slow

TINY = [*TINY_MODEL, "data.batch_size=8", "train.log_every=2"]


def _launch(launcher: str, nproc: int, args: list[str]) -> tuple[int, str]:
    port = str(free_port())
    if launcher == "torchrun":
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            f"--nproc_per_node={nproc}",
            f"--master_port={port}",
        ]
    elif launcher == "deepspeed":
        cmd = [str(Path(sys.executable).parent / "deepspeed"), f"--num_gpus={nproc}", f"--master_port={port}"]
    else:
        cmd = [sys.executable]
    proc = run_cmd([*cmd, "trainer/main.py", "--config", "configs/quickstart.yaml", *args], timeout=600)
    out = proc.stdout + proc.stderr
    return proc.returncode, out


def _mlflow_run(uri: str, experiment: str):  # noqa: ANN202 - mlflow entity
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name(experiment)
    assert exp is not None, f"experiment {experiment} not in {uri}"
    runs = client.search_runs([exp.experiment_id])
    assert len(runs) == 1, [r.info.run_id for r in runs]
    return client, runs[0]


def _rank_states(tag_dir: Path) -> list[dict]:
    return [torch.load(tag_dir / "trainer" / f"rank_{r}.pt", weights_only=True) for r in range(2)]


def test_two_ranks_torchrun_zero2_bf16_then_resume(digits_shards: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    common = [
        *TINY,
        f"data.root={digits_shards}",
        f"train.output_dir={out}",
        f"tracking.uri={uri}",
        "tracking.experiment=e2e",
        "train.zero_stage=2",
        "train.precision=bf16",
        "train.ckpt_every=3",
        "diffusion.timestep_sampler=loss-second-moment",
    ]
    code, log = _launch("torchrun", 2, [*common, "train.total_steps=6", "--resume", "none"])
    assert code == 0, log[-4000:]
    assert "step 6/6" in log and "steps/s" in log and "ETA" in log

    ckpts = out / "checkpoints"
    assert (ckpts / "latest").read_text().strip() == "step_00000006"
    assert sorted(p.name for p in ckpts.iterdir() if p.name.startswith("step_")) == [
        "step_00000003",
        "step_00000006",
    ]
    # Both ranks end with identical parameters (the save-time replica check stays silent), each with its own
    # RNG stream (ranks must not share their noise), and each saved its own half of the EMA: together the
    # export's EMA, once.
    assert "replicas differ" not in log
    r0, r1 = _rank_states(ckpts / "step_00000006")
    assert not torch.equal(r0["rng"]["torch"], r1["rng"]["torch"])
    e0, e1 = r0["ema"], r1["ema"]
    assert e0["layout"] == e1["layout"] == "sliced"
    assert (e0["start"], e1["start"], e1["end"]) == (0, e0["end"], e0["numel"]) and e0["end"] > 0
    export = torch.load(ckpts / "step_00000006" / "export.pt", weights_only=True)
    assert export["step"] == 6 and set(export["ema"]) == {"0.99"}
    whole = torch.cat([v.reshape(-1) for v in export["ema"]["0.99"].values()])
    assert torch.equal(torch.cat([e0["shadows"]["0.99"], e1["shadows"]["0.99"]]), whole)
    assert all(torch.isfinite(v).all() for v in export["model"].values())
    assert list((out / "samples").glob("*.png"))

    client, run = _mlflow_run(uri, "e2e")
    losses = client.get_metric_history(run.info.run_id, "train/loss")
    assert [m.step for m in losses] == [2, 4, 6]
    assert all(torch.isfinite(torch.tensor(m.value)) for m in losses)
    for key in (
        "train/mse",
        "train/vb",
        "train/lr",
        "train/grad_norm",
        "train/samples_per_s",
        "train/data/wait_s",
        "train/data/samples_per_s",
        "train/loss_q0",
        "train/ts_p_max_over_uniform",
    ):
        assert client.get_metric_history(run.info.run_id, key), key
    assert run.data.params["train.zero_stage"] == "2"
    assert run.info.status == "FINISHED"
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "samples")}
    assert any(p.endswith(".png") for p in artifacts), artifacts

    # --resume none into a directory that holds checkpoints: refused, one line, exit 2, nothing touched.
    code, log = _launch("python", 1, [*common, "tracking.enabled=false", "train.total_steps=8", "--resume", "none"])
    errors = [ln for ln in log.splitlines() if ln.startswith("error:")]
    assert code == 2 and len(errors) == 1 and "already holds checkpoints (newest step_00000006)" in errors[0], log
    assert (ckpts / "latest").read_text().strip() == "step_00000006"

    # Resume: same MLflow run, step counter continues, no duplicated metric steps.
    code, log = _launch("torchrun", 2, [*common, "train.total_steps=8", "--resume", "auto"])
    assert code == 0, log[-4000:]
    assert "resumed from" in log and "step_00000006" in log
    client, run2 = _mlflow_run(uri, "e2e")
    assert run2.info.run_id == run.info.run_id
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "train/loss")]
    assert steps == [2, 4, 6, 8]
    common_state = torch.load(ckpts / "step_00000008" / "trainer" / "common.pt", weights_only=True)
    assert common_state["trainer"]["step"] == 8
    assert common_state["trainer"]["samples_seen"] == 8 * 8 * 2


def test_deepspeed_launcher_zero3_fp32(digits_shards: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    args = [
        *TINY,
        f"data.root={digits_shards}",
        f"train.output_dir={out}",
        f"tracking.uri={uri}",
        "tracking.experiment=z3",
        "train.zero_stage=3",
        "train.precision=fp32",
        "train.total_steps=4",
        "train.ckpt_every=4",
        "train.grad_accum=2",
    ]
    code, log = _launch("deepspeed", 2, args)
    assert code == 0, log[-4000:]
    export = torch.load(out / "checkpoints" / "step_00000004" / "export.pt", weights_only=True)
    # The ZeRO-3 EMA is gathered from both ranks' shards into full tensors of the right shapes.
    assert export["ema"]["0.99"].keys() == export["model"].keys()
    for k, v in export["model"].items():
        assert export["ema"]["0.99"][k].shape == v.shape, k
    client, run = _mlflow_run(uri, "z3")
    assert [m.step for m in client.get_metric_history(run.info.run_id, "train/loss")] == [2, 4]


def test_single_plain_process_zero0(digits_shards: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    args = [
        *TINY,
        f"data.root={digits_shards}",
        f"train.output_dir={out}",
        "tracking.enabled=false",
        "train.zero_stage=0",
        "train.total_steps=2",
    ]
    code, log = _launch("python", 1, args)
    assert code == 0, log[-4000:]
    assert (out / "checkpoints" / "step_00000002" / "COMPLETE").is_file()


def test_missing_checkpoint_is_one_line(digits_shards: Path, tmp_path: Path) -> None:
    code, log = _launch(
        "python",
        1,
        [f"data.root={digits_shards}", f"train.output_dir={tmp_path}", "--resume", str(tmp_path / "nope")],
    )
    assert code == 2
    assert f"error: --resume {tmp_path / 'nope'}: checkpoint not found" in log
    assert "Traceback" not in log


def test_readme_commands_are_what_ci_runs() -> None:
    readme = (REPO / "README.md").read_text()
    assert "make quickstart" in readme and "make test" in readme
    ci = [ln.strip() for ln in (REPO / ".ci" / "run").read_text().splitlines()]
    assert "make test" in ci
