"""cluster/submit.py without a cluster: resolved resources, the rendered sbatch script, refusals."""

from __future__ import annotations

import os
import pickle
import re
import sys
import threading
import time
from io import StringIO
from pathlib import Path

import cloudpickle
import pytest
import submitit
import yaml

from cluster import monitor, status, submit
from cluster.job import MASTER_PORT_RANGE, TrainJob, export_torch_env, master_port_for_job
from cluster.request import (
    RequestError,
    mem_string,
    parse_slurm_arg,
    parse_time_minutes,
    render_sbatch,
    slurm_parameters,
)
from tests.conftest import run_cmd
from trainer.config import ClusterConfig

REPO = Path(__file__).resolve().parents[2]
QUICKSTART = REPO / "configs" / "quickstart.yaml"


def sbatch_lines(text: str) -> dict[str, str | bool]:
    """``#SBATCH --key=value`` lines of a script as {key: value} (True for bare flags)."""
    out: dict[str, str | bool] = {}
    for line in text.splitlines():
        m = re.fullmatch(r"#SBATCH --([\w-]+)(?:=(.*))?", line)
        if m:
            out[m[1]] = m[2] if m[2] is not None else True
    return out


@pytest.fixture
def partitions(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Pretend SLURM is here, with these partitions (no sbatch or sinfo call)."""
    names = ["cpu", "gpu"]
    monkeypatch.setattr(submit, "available_partitions", lambda: names)
    monkeypatch.setattr(submit, "slurm_available", lambda: True)
    return names


@pytest.fixture
def data_root(tmp_path: Path) -> Path:
    root = tmp_path / "data"
    root.mkdir()
    (root / "manifest.json").write_text("{}")
    return root


def run_main(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = submit.main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


# ------------------------------------------------------------------------------ pure parsing


@pytest.mark.parametrize(
    ("text", "minutes"),
    [("90", 90), ("1:30", 90), ("1:30:00", 90), ("0:00:30", 1), ("2-00:00", 2880), ("1-02:03:04", 1564)],
)
def test_time_parsing(text: str, minutes: int) -> None:
    assert parse_time_minutes(text) == minutes


@pytest.mark.parametrize("text", ["", "abc", "1:75", "0", "1:00:61", "-5"])
def test_time_parsing_rejects(text: str) -> None:
    with pytest.raises(RequestError, match="--time"):
        parse_time_minutes(text)


def test_slurm_arg_and_mem_forms() -> None:
    assert parse_slurm_arg("mail-type=END") == ("mail-type", "END")
    assert parse_slurm_arg("--mail_user=a@b=c") == ("mail-user", "a@b=c")
    assert parse_slurm_arg("requeue") == ("requeue", True)
    assert mem_string(64) == "64GB"
    assert mem_string(1.5) == "1536MB"


# ------------------------------------------------------------------------------ dry run


def test_dry_run_gpu_request_has_the_right_sbatch_lines(
    tmp_path: Path, partitions: list[str], data_root: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = tmp_path / "slurm" / "%j"
    code, out, err = run_main(
        [
            "--config", str(QUICKSTART), "--nodes", "4", "--gpus-per-node", "8", "--partition", "gpu",
            "--time", "1-00:00:00", "--account", "proj", "--qos", "high", "--constraint", "h100",
            "--cpus-per-task", "10", "--mem-gb", "480", "--exclusive", "--job-name", "ddpm64",
            "--dependency", "afterok:41", "--slurm-arg", "mail-type=END", "--slurm-arg", "requeue",
            "--folder", str(folder), "--dry-run", f"data.root={data_root}", "train.total_steps=7",
        ],
        capsys,
    )  # fmt: skip
    assert code == 0, err
    lines = sbatch_lines(out)
    expected = {
        "nodes": "4", "ntasks-per-node": "8", "gpus-per-node": "8", "partition": "gpu", "time": "1440",
        "account": "proj", "qos": "high", "constraint": "h100", "cpus-per-task": "10", "mem": "480GB",
        "exclusive": True, "job-name": "ddpm64", "dependency": "afterok:41", "mail-type": "END",
        "requeue": True, "signal": "USR2@90", "open-mode": "append",
        "output": f"{folder}/%j_0_log.out", "error": f"{folder}/%j_0_log.err",
    }  # fmt: skip
    for key, value in expected.items():
        assert lines.get(key) == value, (key, lines.get(key))
    srun = next(line for line in out.splitlines() if line.startswith("srun "))
    assert "--kill-on-bad-exit=1" in srun
    assert srun.endswith(f"-u -m submitit.core._submit {folder}")
    assert f"export PYTHONPATH={REPO}" in out
    # The per-task call and the resolved config (overrides applied, CLI values in the cluster section).
    assert "--resume', 'auto', " in out and "'train.total_steps=7'" in out
    assert "# binding: all 8 GPUs visible to every task: rank uses GPU LOCAL_RANK\n" in out
    resolved = yaml.safe_load(out.split("# ---- resolved config ----\n", 1)[1])
    assert resolved["train"]["total_steps"] == 7
    assert resolved["cluster"]["nodes"] == 4 and resolved["cluster"]["gpus_per_node"] == 8
    assert not (tmp_path / "slurm").exists(), "a dry run must not create the job folder"


def test_yaml_cluster_section_gives_defaults_and_flags_win(
    tmp_path: Path, partitions: list[str], data_root: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = tmp_path / "site.yaml"
    cfg.write_text(
        yaml.safe_dump(
            {
                "base": str(QUICKSTART),
                "data": {"root": str(data_root)},
                "cluster": {
                    "partition": "cpu", "time_min": 30, "nodes": 2, "tasks_per_node": 3,
                    "slurm_args": {"mail-type": "FAIL", "comment": "from-yaml"},
                    "setup": ["module load gcc"], "folder": str(tmp_path / "s" / "%j"),
                },
            }
        )
    )  # fmt: skip
    code, out, err = run_main(
        ["--config", str(cfg), "--time", "2:00:00", "--slurm-arg", "mail-type=ALL", "--dry-run"], capsys
    )
    assert code == 0, err
    lines = sbatch_lines(out)
    assert lines["partition"] == "cpu" and lines["nodes"] == "2" and lines["ntasks-per-node"] == "3"
    assert lines["time"] == "120"  # the flag beats time_min: 30
    assert lines["mail-type"] == "ALL" and lines["comment"] == "from-yaml"
    assert "gpus-per-node" not in lines
    assert "module load gcc" in out.split("# command")[0]
    # An override of the cluster section applies too, and the flag still wins over it.
    code, out, _ = run_main(["--config", str(cfg), "cluster.nodes=3", "--dry-run"], capsys)
    assert sbatch_lines(out)["nodes"] == "3"
    code, out, _ = run_main(["--config", str(cfg), "cluster.nodes=3", "--nodes", "1", "--dry-run"], capsys)
    assert sbatch_lines(out)["nodes"] == "1"


def test_dry_run_script_is_the_script_submitit_writes(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """The printed script and the one SlurmExecutor submits come from the same parameters."""
    monkeypatch.setattr(submitit.SlurmExecutor, "affinity", classmethod(lambda cls: 2))  # no srun needed
    c = ClusterConfig(nodes=3, gpus_per_node=4, partition="gpu", mem_gb=32, slurm_args={"mail-type": "END"})
    params = slurm_parameters(c, REPO)
    folder = tmp_path / "%j"
    executor = submitit.SlurmExecutor(folder=folder)
    executor.update_parameters(**params)
    submitted = executor._make_submission_file_text(executor._submitit_command_str, "uid")
    assert render_sbatch(params, folder) == submitted


@pytest.mark.parametrize(
    ("flags", "sbatch", "srun_bind", "binding"),
    [
        (
            ["--gpus-per-task", "1"],
            {"gpus-per-task": "1", "ntasks": "16", "ntasks-per-node": "8"},
            None,
            "8 tasks/node, 1 GPU per task (--gpus-per-task=1): each rank uses its only visible GPU",
        ),
        (
            ["--gpu-bind", "single:1"],
            {"gpu-bind": "single:1", "gpus-per-node": "8", "ntasks-per-node": "8"},
            "--gpu-bind=single:1",
            "8 tasks/node, 1 GPU per task (--gpu-bind=single:1): each rank uses its only visible GPU",
        ),
        (
            ["--gpus-per-task", "1", "--gpu-bind", "single:1"],
            {"gpus-per-task": "1", "gpu-bind": "single:1", "ntasks": "16"},
            "--gpu-bind=single:1",
            "8 tasks/node, 1 GPU per task (--gpus-per-task=1 --gpu-bind=single:1): each rank uses its only visible GPU",
        ),
        (
            ["--gpus-per-task", "1", "--gpu-bind", "none"],
            {"gpus-per-task": "1", "gpu-bind": "none"},
            "--gpu-bind=none",
            "all 8 GPUs visible to every task (--gpus-per-task=1 --gpu-bind=none): rank uses GPU LOCAL_RANK",
        ),
        (
            ["--gpu-bind", "closest"],
            {"gpu-bind": "closest", "gpus-per-node": "8"},
            "--gpu-bind=closest",
            "8 tasks/node, site binding (--gpu-bind=closest): a rank that sees all 8 GPUs uses GPU LOCAL_RANK, "
            "one that sees a single GPU uses it; fewer GPUs than ranks is refused at start",
        ),
    ],
)
def test_dry_run_gpu_binding_flags(
    flags: list[str],
    sbatch: dict[str, str],
    srun_bind: str | None,
    binding: str,
    partitions: list[str],
    data_root: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    code, out, err = run_main(
        [
            "--config",
            str(QUICKSTART),
            "--nodes",
            "2",
            "--gpus-per-node",
            "8",
            *flags,
            "--dry-run",
            f"data.root={data_root}",
        ],
        capsys,
    )
    assert code == 0, err
    lines = sbatch_lines(out)
    for key, value in sbatch.items():
        assert lines.get(key) == value, (key, lines.get(key))
    if "--gpus-per-task" in flags:
        # GPUs by task replace GPUs by node (same total); sbatch wants a task count with --gpus-per-task.
        assert "gpus-per-node" not in lines
    srun = next(line for line in out.splitlines() if line.startswith("srun "))
    assert (srun_bind in srun) if srun_bind else ("--gpu-bind" not in srun)
    assert f"# binding: {binding}\n" in out
    # The flags are recorded in the resolved config (cluster.slurm_args), so a rerun from it binds the same.
    resolved = yaml.safe_load(out.split("# ---- resolved config ----\n", 1)[1])
    given = dict(zip(flags[::2], flags[1::2], strict=True))
    expected = {"gpus-per-task": 1} if "--gpus-per-task" in given else {}
    if "--gpu-bind" in given:
        expected["gpu-bind"] = given["--gpu-bind"]
    assert resolved["cluster"]["slurm_args"] == expected


def test_dry_run_binding_line_on_cpu(
    partitions: list[str], data_root: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = run_main(
        ["--config", str(QUICKSTART), "--tasks-per-node", "2", "--dry-run", f"data.root={data_root}"], capsys
    )
    assert code == 0, err
    assert "# binding: no GPUs: 2 task(s)/node on CPU (gloo)\n" in out


def test_binding_from_yaml_slurm_args(
    tmp_path: Path, partitions: list[str], data_root: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = tmp_path / "site.yaml"
    cfg.write_text(
        yaml.safe_dump(
            {
                "base": str(QUICKSTART),
                "data": {"root": str(data_root)},
                "cluster": {"gpus_per_node": 4, "slurm_args": {"gpus_per_task": 1}},
            }
        )
    )
    code, out, err = run_main(["--config", str(cfg), "--dry-run"], capsys)
    assert code == 0, err
    lines = sbatch_lines(out)
    assert lines["gpus-per-task"] == "1" and lines["ntasks"] == "4" and "gpus-per-node" not in lines
    assert "# binding: 4 tasks/node, 1 GPU per task (--gpus-per-task=1)" in out


def test_dry_run_script_with_gpu_binding_is_the_script_submitit_writes(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """submitit takes gpus_per_task as its own parameter and --gpu-bind/--ntasks as additional ones."""
    monkeypatch.setattr(submitit.SlurmExecutor, "affinity", classmethod(lambda cls: 2))
    c = ClusterConfig(nodes=2, gpus_per_node=4, slurm_args={"gpus-per-task": 1, "gpu-bind": "single:1"})
    params = slurm_parameters(c, REPO)
    assert params["gpus_per_task"] == 1 and "gpus_per_node" not in params
    assert params["additional_parameters"] == {"gpu-bind": "single:1", "ntasks": 8}
    folder = tmp_path / "%j"
    executor = submitit.SlurmExecutor(folder=folder)
    executor.update_parameters(**params)
    submitted = executor._make_submission_file_text(executor._submitit_command_str, "uid")
    assert render_sbatch(params, folder) == submitted
    assert "#SBATCH --gpus-per-task=1\n" in submitted and "--gpu-bind=single:1 " in submitted


# ------------------------------------------------------------------------------ refusals


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--nodes", "0"], "--nodes 0: Input should be greater than or equal to 1"),
        (["--partition", "nope"], "unknown partition 'nope' (available: cpu, gpu)"),
        (
            ["--gpus-per-node", "8", "--tasks-per-node", "2"],
            "--tasks-per-node 2 conflicts with --gpus-per-node 8",
        ),
        (["--slurm-arg", "output=x.log"], "slurm arg 'output' is set by submitit"),
        (["--slurm-arg", "ntasks-per-node=4"], "use --tasks-per-node"),
        (["--time", "soon"], "--time 'soon'"),
        (["--cpus-per-task", "0"], "--cpus-per-task 0"),
        (["train.lr=-1"], "quickstart.yaml: train.lr: Input should be greater than 0 (got -1)"),
        (["model.nonsense=1"], "model.nonsense: unknown key"),
        (["--local", "--nodes", "2"], "--local runs on this machine only"),
        (["--resume", "/no/such/ckpt"], "--resume /no/such/ckpt: no such checkpoint"),
        (["--gpus-per-node", "8", "--gpus-per-task", "2"], "--gpus-per-task 2: the trainer runs one process per GPU"),
        (["--gpus-per-node", "8", "--gpu-bind", "single:2"], "--gpu-bind single:2: puts 2 tasks on each GPU"),
        (["--gpus-per-node", "8", "--gpu-bind", "per_task:2"], "--gpu-bind per_task:2: gives each task 2 GPUs"),
        (["--gpus-per-task", "1"], "--gpus-per-task needs --gpus-per-node"),
        (["--tasks-per-node", "2", "--gpu-bind", "single:1"], "--gpu-bind needs --gpus-per-node"),
    ],
)
def test_bad_input_fails_in_one_line_before_submitting(
    args: list[str],
    message: str,
    tmp_path: Path,
    partitions: list[str],
    data_root: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    def no_submission(*a: object, **k: object) -> None:
        raise AssertionError("must not reach submission")

    monkeypatch.setattr(submit, "submit", no_submission)
    folder = tmp_path / "jobs" / "%j"
    code, out, err = run_main(
        ["--config", str(QUICKSTART), "--folder", str(folder), f"data.root={data_root}", *args], capsys
    )
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("error: "), err
    assert message in err
    assert not (tmp_path / "jobs").exists()


def test_missing_data_and_missing_config_are_refused(
    tmp_path: Path, partitions: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err = run_main(["--config", str(QUICKSTART), f"data.root={tmp_path}/none", "--dry-run"], capsys)
    assert code == 2 and f"no manifest.json in {tmp_path}/none" in err
    code, _, err = run_main(["--config", str(tmp_path / "absent.yaml"), "--dry-run"], capsys)
    assert code == 2 and "config file not found" in err


def test_the_mission_command_without_slurm_names_local_and_dry_run(tmp_path: Path) -> None:
    """``python cluster/submit.py --nodes 4`` as typed: the default config (as trainer/main.py), and on a machine
    without SLURM one line pointing to --local and --dry-run, before anything is written."""
    bin_dir = tmp_path / "bin"  # a PATH with python but no sbatch, whatever this machine has
    bin_dir.mkdir()
    (bin_dir / "python").symlink_to(sys.executable)
    proc = run_cmd([sys.executable, "cluster/submit.py", "--nodes", "4"], timeout=120, PATH=str(bin_dir))
    assert proc.returncode == 2, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert lines == [
        "error: no SLURM on this machine (sbatch not found on PATH): run on this machine with --local (one node), "
        "or see the job script with --dry-run"
    ], proc.stderr
    proc = run_cmd([sys.executable, "cluster/submit.py", "--nodes", "4", "--dry-run", "--skip-data-check"], timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert (
        "#SBATCH --nodes=4" in proc.stdout and "--config', '" + str(REPO / "configs" / "quickstart.yaml") in proc.stdout
    )


# ------------------------------------------------------------------------------ the callable


def test_checkpoint_resubmits_the_same_job_resuming_auto() -> None:
    job = TrainJob(config="/abs/c.yaml", overrides=["train.total_steps=5"], resume="none", omp_threads=3)
    delayed = job.checkpoint()
    assert isinstance(delayed, submitit.helpers.DelayedSubmission)
    assert delayed.function.resume == "auto" and delayed.args == () and delayed.kwargs == {}
    assert delayed.function.argv() == ["--config", "/abs/c.yaml", "--resume", "auto", "train.total_steps=5"]
    assert job.resume == "none", "the running job's own state is not mutated"
    # Pickled by reference to cluster.job (importable in the job), as submitit does.
    blob = cloudpickle.dumps(delayed)
    assert b"cluster.job" in blob
    assert pickle.loads(blob).function == delayed.function


def test_master_port_is_a_pure_function_of_the_job_id_outside_the_ephemeral_range() -> None:
    low, high = MASTER_PORT_RANGE
    assert (low, high) == (20000, 32767)  # Linux's ephemeral range starts at 32768
    ids = [str(i) for i in (1, 2, 99, 12767, 12768, 41_000_123, 2**40)] + ["123_4", "123_5", "abc"]
    ports = [master_port_for_job(i) for i in ids]
    assert all(low <= p <= high for p in ports)
    assert ports == [master_port_for_job(i) for i in ids], "same id, same port (every task, every requeue)"
    # Ids that are close (jobs that may share a first node) never collide; the range wraps after 12768.
    consecutive = {master_port_for_job(str(i)) for i in range(5000, 5000 + 12768)}
    assert len(consecutive) == 12768
    assert master_port_for_job("1") == 20001 and master_port_for_job("12769") == 20001
    assert master_port_for_job("123_4") != master_port_for_job("123_5")


def test_exported_master_port_ignores_one_inherited_from_the_submitting_shell(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    slurm_env = {
        "SUBMITIT_EXECUTOR": "slurm", "SLURM_JOB_ID": "4242", "SLURM_NTASKS": "4", "SLURM_JOB_NUM_NODES": "2",
        "SLURM_NODEID": "1", "SLURM_PROCID": "3", "SLURM_LOCALID": "1", "SLURM_JOB_NODELIST": "node[1-2]",
        "MASTER_PORT": "29500",  # sbatch copied it from the shell that submitted
    }  # fmt: skip
    for key, value in slurm_env.items():
        monkeypatch.setenv(key, value)
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "SLURM_ARRAY_JOB_ID"):
        monkeypatch.delenv(key, raising=False)
    dist_env = export_torch_env()
    port = master_port_for_job("4242")
    assert dist_env.master_port == port and os.environ["MASTER_PORT"] == str(port) != "29500"
    assert (os.environ["MASTER_ADDR"], os.environ["RANK"], os.environ["WORLD_SIZE"]) == ("node1", "3", "4")
    assert (os.environ["LOCAL_RANK"], os.environ["LOCAL_WORLD_SIZE"]) == ("1", "2")


# ------------------------------------------------------------------------------ monitoring


def test_folder_root() -> None:
    assert monitor.folder_root("runs/slurm/%j") == Path("runs/slurm")
    assert monitor.folder_root("/scratch/x/%u_%j/logs") == Path("/scratch/x")
    assert monitor.folder_root("jobs") == Path("jobs")


def test_log_tail_prints_whole_lines_only(tmp_path: Path) -> None:
    log = tmp_path / "a.log"
    out = StringIO()
    tail = monitor.LogTail([log, tmp_path / "never.log"], out)
    tail.poll()
    log.write_text("one\ntw")
    tail.poll()
    assert out.getvalue() == "one\n"
    with log.open("a") as f:
        f.write("o\nthree\n")
    tail.poll()
    assert out.getvalue() == "one\ntwo\nthree\n"


def test_follow_tails_until_final_state_and_announces_the_run(tmp_path: Path) -> None:
    log, out_dir = tmp_path / "0_log.out", tmp_path / "out"
    out_dir.mkdir()
    states = iter(["PENDING", "RUNNING", "RUNNING", "RUNNING", "COMPLETED"])

    def writer() -> None:
        time.sleep(0.05)
        log.write_text("step 1/2\n")
        (out_dir / monitor.RUN_INFO).write_text('{"mlflow_run_id": "abc123", "restarts": 0}')
        with log.open("a") as f:
            f.write("step 2/2\n")

    thread = threading.Thread(target=writer)
    thread.start()
    out = StringIO()
    final = monitor.follow(
        lambda: next(states), [log], out_dir, "http://mlflow:5000", out=out, poll_s=0.02, state_every_s=0.05
    )
    thread.join()
    assert final == "COMPLETED"
    text = out.getvalue()
    assert "step 1/2\n" in text and "step 2/2\n" in text
    assert "MLflow run abc123  (http://mlflow:5000/#/runs/abc123)" in text


def test_status_lists_recorded_jobs_with_state_and_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = tmp_path / "slurm"
    for job_id, outcome in (("101", "success"), ("102", "error")):
        folder = root / job_id
        out_dir = tmp_path / f"out{job_id}"
        out_dir.mkdir()
        (out_dir / monitor.RUN_INFO).write_text(f'{{"mlflow_run_id": "run{job_id}", "restarts": 2}}')
        monitor.SubmissionRecord(
            job_id=job_id, executor="local", job_name="q", config="c.yaml", overrides=[],
            output_dir=str(out_dir), folder=str(folder), folder_template=str(root / "%j"),
            stdout="o", stderr="e", nodes=1, tasks_per_node=2,
            submitted_at=1.0e9 + int(job_id), tracking_uri="sqlite:///m.db", experiment="x",
        ).write()  # fmt: skip
        with (folder / f"{job_id}_0_result.pkl").open("wb") as f:
            pickle.dump((outcome, None), f)
    rows = status.collect(root)
    assert [(r.job_id, r.state, r.restarts, r.mlflow_run_id, r.tasks) for r in rows] == [
        ("101", "COMPLETED", 2, "run101", "1x2"),
        ("102", "FAILED", 2, "run102", "1x2"),
    ]
    assert status.main(["--folder", str(root / "%j")]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split()[:4] == ["JOB", "NAME", "EXEC", "STATE"]
    assert table[1].split()[:4] == ["101", "q", "local", "COMPLETED"]


def test_dry_run_sampling_entry(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    argv = ["--config", str(QUICKSTART), f"data.root={tmp_path}/none", "--dry-run", "--entry", "sample"]
    code, out, err = run_main([*argv, "--entry-args", "runs/x --num-samples 50000 --method ddim --steps 50"], capsys)
    assert code == 0, err  # no data check: the sampler reads nothing but the run's export
    assert "# trainer.sample.main(['runs/x', '--num-samples', '50000', '--method', 'ddim', '--steps', '50'])" in out
    code, _, err = run_main(argv, capsys)
    assert code == 2 and err.strip() == "error: --entry sample needs --entry-args (at least the run or export to use)"
    code, _, err = run_main(["--config", str(QUICKSTART), "--dry-run", "--entry-args", "x"], capsys)
    assert code == 2 and err.strip().startswith("error: --entry-args goes with --entry sample or evaluate")
