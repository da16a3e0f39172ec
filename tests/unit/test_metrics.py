"""LossWindow: on-device accumulation, importance-weighted means, fixed-shape quartiles."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from trainer.metrics import LossWindow


def test_window_means_match_a_float64_recount() -> None:
    T = 8
    w = LossWindow(T, torch.device("cpu"))
    rng = np.random.default_rng(0)
    all_t, all_loss, all_mse, all_vb, all_w, scalars = [], [], [], [], [], []
    for _ in range(3):
        t = rng.integers(0, 4, size=5)  # only the first two quarters of [0, 8) are drawn
        loss, mse, vb, wt = (rng.random(5) for _ in range(4))
        scalar = float((loss * wt).mean())
        w.begin_step()
        w.add(
            torch.tensor(scalar),
            {"loss": torch.tensor(loss), "mse": torch.tensor(mse), "vb": torch.tensor(vb)},
            torch.tensor(t),
            torch.tensor(wt),
        )
        w.settle(keep=True)
        for lst, v in zip((all_t, all_loss, all_mse, all_vb, all_w), (t, loss, mse, vb, wt), strict=True):
            lst.append(v)
        scalars.append(scalar)
    t, loss, mse, vb, wt = (np.concatenate(v) for v in (all_t, all_loss, all_mse, all_vb, all_w))
    assert w.steps == 3
    out = w.reduce()
    assert out["loss"] == pytest.approx(np.mean(scalars))
    assert out["mse"] == pytest.approx(np.mean(mse * wt))
    assert out["vb"] == pytest.approx(np.mean(vb * wt))
    assert out["loss_q0"] == pytest.approx(loss[t < 2].mean())
    assert out["loss_q1"] == pytest.approx(loss[(t >= 2) & (t < 4)].mean())
    assert "loss_q2" not in out and "loss_q3" not in out  # no sample there: left out, not zero
    assert w.steps == 0 and w.reduce()["loss"] == 0.0  # reset after reduce


def test_discarded_step_leaves_no_trace_and_extras_are_summed() -> None:
    w = LossWindow(4, torch.device("cpu"))
    terms = {k: torch.tensor([1.0, 3.0]) for k in ("loss", "mse", "vb")}
    w.begin_step()
    w.add(torch.tensor(2.0), terms, torch.tensor([0, 3]), torch.ones(2))
    w.settle(keep=True)
    w.begin_step()
    w.add(
        torch.tensor(float("nan")), {k: v * float("nan") for k, v in terms.items()}, torch.tensor([1, 2]), torch.ones(2)
    )
    w.settle(keep=False)
    state = w.state_dict()
    out = w.reduce(extra={"data/skipped": 5.0})
    assert out["loss"] == 2.0 and out["mse"] == 2.0 and out["data/skipped"] == 5.0
    assert "loss_q1" not in out and w.steps == 0
    w.load_state_dict(state)
    assert w.steps == 1 and w.reduce()["loss_q3"] == 3.0
