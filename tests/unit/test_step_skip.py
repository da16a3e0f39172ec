"""Skipping a step on the device: the pieces the trainer composes when it reads a step's verdict late.

A skipped step must leave weights, Adam moments and step count, the EMA, the timestep history and the
LR schedule exactly as if it had never been attempted, although the host learns of it only after the
optimizer ran (on a GPU it must not wait for the verdict).
"""

from __future__ import annotations

import math

import pytest
import torch

from trainer.distributed import HostCopy
from trainer.ema import EMA
from trainer.engine import RewindableLambdaLR, StepGate, gate_optimizer, lr_lambda
from trainer.metrics import LossWindow
from trainer.timesteps import LossSecondMomentSampler


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 2))


def _grads(model: torch.nn.Module, scale: float = 1.0) -> None:
    for p in model.parameters():
        p.grad = torch.full_like(p, 0.5 * scale)


def test_found_inf_skips_the_fused_adamw_step_and_the_rewind_restores_the_lr() -> None:
    model, gate = _model(), StepGate()
    opt = gate_optimizer(torch.optim.AdamW(model.parameters(), lr=1e-2, fused=True), gate)
    sched = RewindableLambdaLR(opt, lr_lambda(warmup_steps=4, total_steps=10, schedule="cosine"))
    _grads(model)
    opt.step()
    sched.step()
    params = [p.detach().clone() for p in model.parameters()]
    state = {k: v.clone() for k, v in opt.state[next(model.parameters())].items()}
    lr = opt.param_groups[0]["lr"]

    _grads(model, scale=math.nan)  # a NaN gradient reached every rank through the all-reduce
    gate.found_inf = torch.ones(())
    opt.step()
    sched.step()  # the host did not know yet: the schedule advanced
    gate.found_inf = None
    assert all(torch.equal(a, b) for a, b in zip(params, model.parameters(), strict=True))
    after = opt.state[next(model.parameters())]
    assert all(torch.equal(state[k], after[k]) for k in state), "moments or step count changed"
    assert opt.param_groups[0]["lr"] != lr
    sched.rewind()  # the verdict arrives
    assert opt.param_groups[0]["lr"] == lr and sched.get_last_lr() == [lr] and sched.last_epoch == 1

    # The next kept step is the one a run without the bad step would have taken.
    twin = _model()
    twin_opt = torch.optim.AdamW(twin.parameters(), lr=1e-2, fused=True)
    twin_sched = torch.optim.lr_scheduler.LambdaLR(twin_opt, lr_lambda(4, 10, "cosine"))
    for _ in range(2):
        _grads(twin)
        twin_opt.step()
        twin_sched.step()
    gate.found_inf = torch.zeros(())
    _grads(model)
    opt.step()
    sched.step()
    assert all(torch.equal(a, b) for a, b in zip(twin.parameters(), model.parameters(), strict=True))
    assert sched.state_dict()["last_epoch"] == twin_sched.state_dict()["last_epoch"] == 2


def test_an_unfused_optimizer_reads_the_verdict_instead() -> None:
    model, gate = _model(), StepGate()
    opt = gate_optimizer(torch.optim.AdamW(model.parameters(), lr=1e-2, foreach=False), gate)
    before = [p.detach().clone() for p in model.parameters()]
    _grads(model)
    gate.found_inf = torch.ones(())
    opt.step()
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
    gate.found_inf = torch.zeros(())
    opt.step()
    assert not torch.equal(before[0], next(model.parameters()))


def test_ema_keep_zero_leaves_the_shadows_and_keep_one_is_the_plain_update() -> None:
    model = _model()
    ema, plain = EMA(model, [0.9, 0.999]), EMA(model, [0.9, 0.999])
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    shadows = {r: [s.clone() for s in ema.shadows[r]] for r in ema.rates}
    ema.update(keep=torch.zeros(()))
    assert all(torch.equal(a, b) for r in ema.rates for a, b in zip(shadows[r], ema.shadows[r], strict=True))
    ema.update(keep=torch.ones(()))
    plain.update()
    assert all(torch.equal(a, b) for r in ema.rates for a, b in zip(plain.shadows[r], ema.shadows[r], strict=True))


def test_a_rejected_exchange_never_reaches_the_history() -> None:
    sampler = LossSecondMomentSampler(4, history_per_term=2)
    sampler.record(torch.tensor([0, 1]), torch.tensor([1.0, 2.0]))
    sampler.start_sync()
    sampler.finish_sync()
    sampler.record(torch.tensor([2, 3]), torch.tensor([3.0, 4.0]))
    sampler.start_sync()
    sampler.reject_inflight()  # that step turned out non-finite somewhere
    sampler.record(torch.tensor([3]), torch.tensor([5.0]))
    sampler.start_sync()
    assert sampler.finish_sync() == 1
    assert sampler.history_stats()["count"].tolist() == [1, 1, 0, 1]
    assert sampler.state_dict()["writes"].tolist() == [1, 1, 0, 1]


def test_the_loss_window_counts_only_settled_kept_steps() -> None:
    w = LossWindow(4, torch.device("cpu"))
    ones = torch.ones(2)

    def stage(loss: float) -> None:
        w.begin_step()
        w.add(torch.tensor(loss), {"loss": ones * loss, "mse": ones, "vb": ones}, torch.tensor([0, 3]), ones)

    # A step's verdict is read while the next step is already staged: settle() takes the oldest.
    stage(1.0)
    stage(100.0)
    w.settle(keep=True)  # the step of loss 1
    stage(3.0)
    w.settle(keep=False)  # the step of loss 100 was skipped
    w.settle(keep=True)  # the step of loss 3
    assert w.steps == 2
    assert w.reduce()["loss"] == 2.0


def test_host_copy_keeps_the_value_it_was_given() -> None:
    t = torch.tensor([0.0, 1.0])
    copy = HostCopy(t)
    t.add_(5.0)  # later work on the device tensor does not reach the copy
    assert copy.get().tolist() == [0.0, 1.0]


@pytest.mark.parametrize("hooks", [True, False], ids=["hooks", "after-backward"])
def test_the_guard_sees_one_non_finite_gradient_among_many(hooks: bool) -> None:
    from trainer.nonfinite import NonFiniteGuard

    model = _model()
    guard = NonFiniteGuard(model, torch.device("cpu"), hooks=hooks)
    x = torch.ones(3, 4)

    def verdict(poison: float | None) -> float:
        guard.reset()
        model.zero_grad(set_to_none=True)
        for micro in range(2):  # two accumulated micro-batches; the bad value in the first only
            out = model(x)
            if poison is not None and micro == 0:
                out = out * torch.tensor([1.0, poison])  # one output channel, hence some gradients, poisoned
            out.sum().backward()
        guard.check_grads()
        return float(guard.flag)

    assert verdict(None) == 0.0
    assert verdict(math.nan) > 0
    assert verdict(math.inf) > 0
    grads = [p.grad.clone() for p in model.parameters()]
    assert verdict(None) == 0.0
    assert all(torch.isfinite(g).all() for g in grads) is False  # the poisoned step's gradients were bad
    if not hooks:  # the fused check multiplies by 1: the gradients are left exactly as they were
        before = [p.grad.clone() for p in model.parameters()]
        guard.check_grads()
        assert all(torch.equal(a, p.grad) for a, p in zip(before, model.parameters(), strict=True))
