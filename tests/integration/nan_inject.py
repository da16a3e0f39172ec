"""Test harness (not part of the product): runs ``trainer/main.py`` with NaN injected on one rank.

    NAN_ATTEMPTS="3,8-10" NAN_RANK=1 NAN_MODE=loss|grad python tests/integration/nan_inject.py <trainer args>

An "attempt" is one optimizer-step attempt (a skipped step does not advance the trainer's step but
counts as an attempt). ``loss`` multiplies that micro-batch's loss by NaN; ``grad`` leaves the loss
finite and turns one parameter's gradient into NaN, which only a gradient check can see.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402

import trainer.main as trainer_main  # noqa: E402
from trainer.builders import Builders  # noqa: E402
from trainer.diffusion.gaussian import GaussianDiffusion  # noqa: E402
from trainer.engine import build_engine  # noqa: E402


def _attempts(spec: str) -> set[int]:
    out: set[int] = set()
    for part in spec.split(","):
        lo, _, hi = part.partition("-")
        out.update(range(int(lo), int(hi or lo) + 1))
    return out


ATTEMPTS = _attempts(os.environ["NAN_ATTEMPTS"])
ON_RANK = int(os.environ.get("NAN_RANK", "0")) == int(os.environ.get("RANK", "0"))
MODE = os.environ.get("NAN_MODE", "loss")
_calls = [0]  # micro-batches seen (grad_accum = 1 in the tests: one per attempt)


def _now_bad() -> bool:
    return ON_RANK and _calls[0] in ATTEMPTS


_original_losses = GaussianDiffusion.training_losses


def _losses(self, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
    _calls[0] += 1
    terms = _original_losses(self, *args, **kwargs)
    if MODE == "loss" and _now_bad():
        terms = dict(terms, loss=terms["loss"] * float("nan"))
    return terms


def _build(cfg, rt, model, gate):  # noqa: ANN001, ANN202
    engine = build_engine(cfg, rt, model, gate)
    first = next(p for p in engine.module.parameters() if p.requires_grad)
    # Registered before the trainer's own checks, so they see the poisoned gradient.
    first.register_hook(lambda g: g * float("nan") if MODE == "grad" and _now_bad() else None)
    return engine


GaussianDiffusion.training_losses = _losses
torch.manual_seed(0)  # (the trainer seeds itself; this only fixes the import-time state)

if __name__ == "__main__":
    sys.argv[0] = "trainer/main.py"
    sys.exit(trainer_main.main(sys.argv[1:], builders=Builders(engine=_build)))
