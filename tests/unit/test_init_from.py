"""``train.init_from`` (trainer/builders.py): the export's EMA at its ``sample.ema_rate`` goes into the model; an
export whose EMAs do not include that rate is a one-line ConfigError naming the rates it has."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from tests.conftest import TINY_MODEL
from trainer.builders import load_initial_weights
from trainer.config import ConfigError, load_config
from trainer.export import export_weights
from trainer.models import build_model

INFO: Any = SimpleNamespace(image_size=16, channels=1)  # what load_initial_weights reads of a DatasetInfo


def _export(path: Path, ema_rates: list[float], rates_in_file: list[str]) -> dict[str, torch.Tensor]:
    cfg = load_config("configs/quickstart.yaml", [*TINY_MODEL, f"train.ema_rates={ema_rates}".replace(" ", "")])
    torch.manual_seed(1)
    source = build_model(cfg, 16, 1, None).state_dict()
    emas = {r: {k: v + float(i + 1) for k, v in source.items()} for i, r in enumerate(rates_in_file)}
    export_weights(path, cfg.model_dump(mode="json"), 10, source, emas, {"image_size": 16, "channels": 1})
    return emas[rates_in_file[0]] if rates_in_file else source


def test_the_ema_at_the_sample_rate_starts_the_model(tmp_path: Path) -> None:
    want = _export(tmp_path / "export.pt", [0.9], ["0.9", "0.5"])
    cfg = load_config("configs/quickstart.yaml", [*TINY_MODEL, f"train.init_from={tmp_path / 'export.pt'}"])
    model = build_model(cfg, 16, 1, None)
    load_initial_weights(cfg, model, INFO)
    assert all(torch.equal(model.state_dict()[k], want[k]) for k in want)


def test_an_export_without_that_ema_is_a_one_line_error(tmp_path: Path) -> None:
    _export(tmp_path / "export.pt", [0.9], ["0.5"])  # its config samples from 0.9, but only 0.5 is stored
    cfg = load_config("configs/quickstart.yaml", [*TINY_MODEL, f"train.init_from={tmp_path / 'export.pt'}"])
    with pytest.raises(ConfigError, match=r"has no EMA at its sample.ema_rate 0.9 \(it has 0.5\)") as err:
        load_initial_weights(cfg, build_model(cfg, 16, 1, None), INFO)
    assert "\n" not in str(err.value)
