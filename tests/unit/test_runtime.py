"""trainer.runtime: precision, batch split and loader defaults as pure decisions over the hardware facts."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from trainer.config import ConfigError, load_config
from trainer.distributed import DistEnv
from trainer.engine import deepspeed_config
from trainer.runtime import LoaderSettings, choose_precision, cpu_flags, loader_defaults, plan_batch, resolve

AVX2_EPYC = "processor\t: 0\nvendor_id\t: AuthenticAMD\nflags\t\t: fpu sse sse2 avx avx2 fma\n"
SAPPHIRE = "processor\t: 0\nflags\t\t: fpu avx2 avx512f avx512_bf16 amx_bf16 amx_tile\n"


def test_cpu_flags_parse() -> None:
    assert "avx2" in cpu_flags(AVX2_EPYC) and "avx512_bf16" not in cpu_flags(AVX2_EPYC)
    assert {"avx512_bf16", "amx_bf16"} <= cpu_flags(SAPPHIRE)
    assert cpu_flags("") == set()


def test_auto_precision_follows_native_bf16() -> None:
    assert choose_precision("auto", "cpu", False, cpu_flags(AVX2_EPYC))[:2] == (
        "fp32",
        "this CPU has no native bf16 (no avx512_bf16/amx_bf16): bf16 would be emulated, ~10x slower",
    )
    assert choose_precision("auto", "cpu", False, cpu_flags(SAPPHIRE))[0] == "bf16"
    assert choose_precision("auto", "cuda", True, set())[0] == "bf16"
    assert choose_precision("auto", "cuda", False, set())[0] == "fp32"  # e.g. a V100
    assert choose_precision("auto", "cpu", False, set(), user_bf16=True)[0] == "bf16"  # the user's JSON decides


def test_explicit_bf16_without_hardware_warns_and_is_kept() -> None:
    precision, _, warn = choose_precision("bf16", "cpu", False, cpu_flags(AVX2_EPYC))
    assert precision == "bf16" and warn
    assert not choose_precision("bf16", "cpu", False, cpu_flags(SAPPHIRE))[2]
    assert not choose_precision("fp32", "cpu", False, set())[2]


@pytest.mark.parametrize(
    ("global_batch", "max_micro", "min_accum", "world", "expected"),
    [
        (128, 128, 1, 1, (128, 1)),
        (128, 64, 1, 1, (64, 2)),
        (128, 128, 1, 32, (4, 1)),
        (128, 3, 1, 4, (2, 16)),  # 32 per rank, micro <= 3: 16 x 2
        (2048, 32, 1, 8, (32, 8)),
        (128, 128, 4, 2, (16, 4)),  # accumulation at least train.grad_accum
        (None, 16, 2, 8, (16, 2)),  # no global batch: per-rank settings stand
    ],
)
def test_batch_plan(global_batch, max_micro, min_accum, world, expected) -> None:  # noqa: ANN001
    plan = plan_batch(global_batch, max_micro, min_accum, world)
    assert (plan.micro_batch, plan.grad_accum) == expected
    if global_batch is not None:
        assert plan.global_batch == global_batch


def test_impossible_batch_split_is_one_line() -> None:
    with pytest.raises(ConfigError, match=r"^data.global_batch_size=128 does not split evenly over 3 ranks"):
        plan_batch(128, 64, 1, 3)
    with pytest.raises(ConfigError, match="8 per rank, which no accumulation >= train.grad_accum=9"):
        plan_batch(8, 8, 9, 1)
    assert plan_batch(8, 8, 3, 1).grad_accum == 4  # 3 does not divide 8: the next that does


def test_loader_defaults_per_device() -> None:
    assert loader_defaults(None, None, "cuda") == (4, True)
    assert loader_defaults(None, None, "cpu") == (0, False)
    assert loader_defaults(2, False, "cuda") == (2, False)


def test_resolve_decides_once_and_leaves_the_config_alone() -> None:
    cfg = load_config("configs/cifar10_hybrid.yaml", ["data.batch_size=16"])
    env = DistEnv(rank=0, local_rank=0, world_size=4, local_world_size=4, device=torch.device("cpu"), backend="gloo")
    rt = resolve(cfg, env)
    assert rt.precision in ("bf16", "fp32") and rt.zero_stage == 2
    assert rt.batch.global_batch == 128
    assert (rt.batch.micro_batch, rt.batch.grad_accum) == (16, 2)
    assert rt.loader == LoaderSettings(batch_size=16, num_workers=0, pin_memory=False, partitions=64)
    assert any(line.startswith("batch 128 per step = 4 ranks x 2 accumulation x 16") for line in rt.lines())
    assert cfg.data.batch_size == 16 and cfg.train.precision == "auto"  # the config keeps the user's requests
    ds = deepspeed_config(cfg, rt, n_params=1000)
    assert ds["train_micro_batch_size_per_gpu"] == 16 and ds["gradient_accumulation_steps"] == 2
    assert ds["bf16"] == {"enabled": rt.precision == "bf16"} and ds["zero_optimization"]["stage"] == 2


def test_explicit_settings_that_contradict_the_deepspeed_json_are_refused(tmp_path: Path) -> None:
    user = tmp_path / "ds.json"
    user.write_text('{"zero_optimization": {"stage": 3}, "bf16": {"enabled": false}}')
    env = DistEnv(rank=0, local_rank=0, world_size=1, local_world_size=1, device=torch.device("cpu"), backend="gloo")
    with pytest.raises(ConfigError, match=r"^train.zero_stage=1 contradicts zero_optimization.stage=3"):
        resolve(load_config(None, [f"train.deepspeed_config={user}", "train.zero_stage=1"]), env)
    with pytest.raises(ConfigError, match=r"^train.precision=bf16 contradicts bf16.enabled=false"):
        resolve(load_config(None, [f"train.deepspeed_config={user}", "train.precision=bf16"]), env)
    rt = resolve(load_config(None, [f"train.deepspeed_config={user}", "train.zero_stage=3"]), env)
    assert (rt.zero_stage, rt.precision) == (3, "fp32")
