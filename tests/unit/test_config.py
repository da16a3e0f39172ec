"""Config loading: YAML + base chain + dotted overrides, and one-line errors naming file, key and value."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from tests.conftest import REPO, run_cmd
from trainer.config import ConfigError, load_config, parse_override
from trainer.engine import deepspeed_config, lr_lambda


def write(tmp_path: Path, name: str, text: str) -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


def test_shipped_configs_load() -> None:
    for path in sorted((REPO / "configs").glob("*.yaml")):
        cfg = load_config(path)
        assert cfg.train.total_steps > 0, path


def test_base_chain_and_overrides(tmp_path: Path) -> None:
    write(tmp_path, "base.yaml", "model:\n  channels: 64\ntrain:\n  lr: 0.5\n")
    child = write(tmp_path, "child.yaml", "base: base.yaml\ntrain:\n  lr: 0.25\n")
    cfg = load_config(child, ["model.channel_mult=[1,2]", "train.lr=2e-4", "sample.steps=ddim25"])
    assert cfg.model.channels == 64  # from base
    assert cfg.model.channel_mult == [1, 2]
    assert cfg.train.lr == pytest.approx(2e-4)  # "2e-4" is a string to YAML 1.1; we read it as a number
    assert cfg.sample.steps == "ddim25"


def test_flat_params_cover_every_leaf() -> None:
    flat = load_config(None).to_flat_dict()
    assert flat["train.lr"] == 1e-4
    assert flat["model.channel_mult"] == [1, 2, 2, 2]
    assert all(not isinstance(v, dict) or not v for v in flat.values())


@pytest.mark.parametrize(
    ("yaml_text", "overrides", "expected"),
    [
        ("model:\n  chanels: 3\n", [], "model.chanels: unknown key"),
        ("", ["train.lr=-1"], "train.lr: Input should be greater than 0 (got -1)"),
        ("diffusion:\n  schedule: cosinus\n", [], "diffusion.schedule: Input should be 'cosine' or 'linear'"),
        (
            "train:\n  zero_stage: 4\n",
            [],
            "train.zero_stage: Input should be less than or equal to 3 (got 4)",
        ),
        ("data:\n  batch_size: many\n", [], "data.batch_size: Input should be a valid integer"),
        ("train:\n  ema_rates: [1.5]\n", [], "train.ema_rates: every EMA rate must lie in (0, 1)"),
        (
            "diffusion:\n  var_type: fixed_small\n",
            [],
            "diffusion: loss 'hybrid' needs var_type 'learned_range'",
        ),
        ("diffusion:\n  loss: mse\n", [], "diffusion: loss 'mse' with var_type 'learned_range' never trains"),
        ("sample:\n  ema_rate: 0.5\n", [], "sample.ema_rate 0.5 is not one of train.ema_rates"),
        (
            "",
            ["sample.steps=abc"],
            "sample.steps: 'abc' is not a step count (expected '', 'K', 'a,b,c' or 'ddimK') (got 'abc')",
        ),
        ("", ["sample.steps=0"], "sample.steps: step counts must be >= 1, got 0 (got '0')"),
        ("", ["sample.steps=ddim"], "sample.steps: '' is not a step count"),
        # Respacings that only fail against T = diffusion.steps (here 100).
        (
            "diffusion:\n  steps: 100\n",
            ["sample.steps=200"],
            "sample.steps: section 0 has 100 steps, cannot keep 200 (T = 100) (got '200')",
        ),
        ("diffusion:\n  steps: 100\n", ["sample.steps=10,60"], "sample.steps: section 1 has 50 steps, cannot keep 60"),
        (
            "diffusion:\n  steps: 100\nsample:\n  steps: ddim40\n",
            [],
            "sample.steps: no integer stride gives exactly 40 of 100 steps (got 'ddim40')",
        ),
        ("", ["train.lr"], "override 'train.lr': expected key.path=value"),
        ("", ["train.lr.x=1"], "train.lr: Input should be a valid number"),
        ("train: [1, 2\n", [], "invalid YAML"),
        ("- a\n- b\n", [], "top level must be a mapping"),
    ],
)
def test_bad_config_is_one_line_naming_the_key(
    tmp_path: Path, yaml_text: str, overrides: list[str], expected: str
) -> None:
    path = write(tmp_path, "bad.yaml", yaml_text)
    with pytest.raises(ConfigError) as info:
        load_config(path, overrides)
    msg = str(info.value)
    assert expected in msg
    assert "\n" not in msg


@pytest.mark.parametrize("spec", ["", "50", "100", "10,15,20", "ddim50", "ddim25", "ddim7", " 5 "])
def test_valid_respacings_load(spec: str) -> None:
    cfg = load_config(None, ["diffusion.steps=100", f"sample.steps={spec}"])
    assert cfg.sample.steps.strip() == spec.strip()


def test_respacing_error_names_the_file(tmp_path: Path) -> None:
    path = write(tmp_path, "run.yaml", "diffusion:\n  steps: 100\nsample:\n  steps: 5\n")
    assert load_config(path).sample.steps == "5"  # an int in YAML is kept as its text
    with pytest.raises(ConfigError) as info:
        load_config(path, ["sample.steps=abc"])
    assert str(info.value) == (
        f"{path}: sample.steps: 'abc' is not a step count (expected '', 'K', 'a,b,c' or 'ddimK') (got 'abc')"
    )


def test_missing_file_and_cycle(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="config file not found: .*nope.yaml"):
        load_config(tmp_path / "nope.yaml")
    write(tmp_path, "a.yaml", "base: b.yaml\n")
    write(tmp_path, "b.yaml", "base: a.yaml\n")
    with pytest.raises(ConfigError, match="circular"):
        load_config(tmp_path / "a.yaml")


def test_override_value_types() -> None:
    assert parse_override("a.b=3") == (["a", "b"], 3)
    assert parse_override("a.b=true") == (["a", "b"], True)
    assert parse_override("a.b=[16, 8]") == (["a", "b"], [16, 8])
    assert parse_override("a=x=y") == (["a"], "x=y")


def test_cli_prints_one_line_and_exits_2(tmp_path: Path) -> None:
    bad = write(tmp_path, "bad.yaml", "model:\n  channels: -4\n")
    proc = run_cmd([sys.executable, "trainer/main.py", "--config", str(bad)], timeout=120)
    assert proc.returncode == 2
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip() and "WARNING" not in ln]
    assert lines == [f"error: {bad}: model.channels: Input should be greater than 0 (got -4)"]


def test_deepspeed_config_layers(tmp_path: Path) -> None:
    import torch

    from trainer.distributed import DistEnv
    from trainer.runtime import resolve

    env = DistEnv(rank=0, local_rank=0, world_size=1, local_world_size=1, device=torch.device("cpu"), backend="gloo")

    def ds_for(overrides: list[str]) -> dict:
        cfg = load_config(None, overrides)
        return deepspeed_config(cfg, resolve(cfg, env))

    user = write(
        tmp_path,
        "ds.json",
        '{"zero_optimization": {"stage": 3, "overlap_comm": true}, "bf16": {"enabled": false}}',
    )
    ds = ds_for([f"train.deepspeed_config={user}", "data.batch_size=8", "train.grad_accum=2"])
    # Unset YAML stage/precision fall back to the JSON's; derived batch settings are ours.
    assert ds["zero_optimization"] == {"stage": 3, "overlap_comm": True}
    assert ds["bf16"] == {"enabled": False}
    assert ds["train_micro_batch_size_per_gpu"] == 8 and ds["gradient_accumulation_steps"] == 2
    # train.deepspeed wins over the JSON file.
    ds = ds_for(
        [f"train.deepspeed_config={user}", "train.deepspeed={bf16: {enabled: true}, zero_optimization: {stage: 1}}"]
    )
    assert ds["zero_optimization"]["stage"] == 1 and ds["bf16"]["enabled"] is True
    bad = write(tmp_path, "opt.json", '{"optimizer": {"type": "AdamW"}}')
    with pytest.raises(ConfigError, match="remove 'optimizer'"):
        ds_for([f"train.deepspeed_config={bad}"])
    with pytest.raises(ConfigError, match="file not found"):
        ds_for([f"train.deepspeed_config={tmp_path / 'missing.json'}"])


def test_lr_schedule_matches_closed_form() -> None:
    import math

    f = lr_lambda(warmup_steps=10, total_steps=110, schedule="cosine")
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0)
    assert f(60) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.5)))
    assert f(110) == pytest.approx(0.0, abs=1e-12)
    assert lr_lambda(0, 100, "constant")(57) == 1.0


def test_history_term_key_and_validator() -> None:
    from trainer.config import DiffusionConfig

    assert DiffusionConfig().history_term == "loss"  # experiment 4's winner (docs/RESULTS.md)
    is_mse = {"timestep_sampler": "loss-second-moment", "loss": "mse", "var_type": "fixed_small"}
    # Importance sampling of L_simple from a history of L_simple itself is allowed ...
    assert DiffusionConfig(**is_mse, history_term="loss").history_term == "loss"
    # ... from a history of the L_vlb term, which mse only monitors, it is not.
    with pytest.raises(ValueError, match="with history_term 'vb' needs loss 'hybrid' or 'kl'"):
        DiffusionConfig(**is_mse, history_term="vb")
    for loss in ("hybrid", "kl"):
        for term in ("vb", "loss"):
            cfg = load_config(None, [f"diffusion.loss={loss}", "diffusion.timestep_sampler=loss-second-moment",
                                     f"diffusion.history_term={term}"])  # fmt: skip
            assert cfg.diffusion.history_term == term
    with pytest.raises(ConfigError, match="diffusion.history_term: Input should be 'vb' or 'loss'"):
        load_config(None, ["diffusion.history_term=mse"])


def test_experiment_configs_load() -> None:
    """configs/experiments/: every arm of bench/experiments/run.py loads and is what its name says."""
    expected = {
        "hybrid_cosine": ("hybrid", "learned_range", "cosine", "uniform", "loss"),
        "mse_fixed": ("mse", "fixed_large", "cosine", "uniform", "loss"),
        "hybrid_linear": ("hybrid", "learned_range", "linear", "uniform", "loss"),
        "kl_uniform": ("kl", "learned_range", "cosine", "uniform", "loss"),
        "kl_importance": ("kl", "learned_range", "cosine", "loss-second-moment", "vb"),
        "hybrid_importance_vb": ("hybrid", "learned_range", "cosine", "loss-second-moment", "vb"),
        "hybrid_importance_loss": ("hybrid", "learned_range", "cosine", "loss-second-moment", "loss"),
    }
    folder = REPO / "configs" / "experiments"
    assert {p.stem for p in folder.glob("*.yaml")} == {*expected, "small"}
    for arm, want in expected.items():
        cfg = load_config(folder / f"{arm}.yaml")
        d = cfg.diffusion
        assert (d.loss, d.var_type, d.schedule, d.timestep_sampler, d.history_term) == want, arm
        assert (d.steps, cfg.train.total_steps, cfg.train.precision) == (1000, 1000, "fp32"), arm
