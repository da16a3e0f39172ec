"""Test harness (not part of the product): trains a few steps in one process and records every read of a
tensor's value by the host (``.item()``, ``bool()``, ``float()``, ``.tolist()``) made by the trainer.

    python tests/integration/host_reads.py OUT.json <trainer overrides...>

On a GPU such a read waits for all work queued before it. The trainer may read only values copied
to the host a step earlier (:class:`trainer.distributed.HostCopy`, read during a later
``TrainStep.run``), or anything at a step whose number is a log/checkpoint/stop step. A CPU run cannot
time a GPU stall, but it can see every read and where it came from: that is what this records.

Reads made by the data pipeline (host-side images, never on the device) and by libraries (DeepSpeed,
torch) are attributed to them and reported apart.
"""

from __future__ import annotations

import json
import os
import sys
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

from trainer import distributed  # noqa: E402
from trainer.config import load_config  # noqa: E402
from trainer.main import Trainer  # noqa: E402

REPO = Path(__file__).resolve().parents[2]

launch = [0]  # TrainStep.run calls so far
records: list[dict] = []
allowed = [0]  # > 0 while a HostCopy is being read


def _origin() -> str:
    """Where the read was made: the innermost frame outside this harness (``trainer/...`` for ours,
    ``deepspeed/...`` or ``torch/...`` for a library's own reads)."""
    for frame in reversed(traceback.extract_stack()):
        name = frame.filename
        if name == __file__ or any(part in name for part in ("torch/_dynamo/", "torch/utils/", "torch/_compile.py")):
            continue  # this harness, and torch's decorator and dispatch plumbing around the caller
        if "site-packages/" in name:
            return name.split("site-packages/")[1] + f":{frame.lineno}"
        if name.startswith(str(REPO)):
            return f"{Path(name).relative_to(REPO)}:{frame.lineno}"
        return f"{name}:{frame.lineno}"
    return "?"


def _record(kind: str) -> None:
    if allowed[0]:
        return
    origin = _origin()
    records.append({"launch": launch[0], "kind": kind, "origin": origin, "data": origin.startswith("trainer/data/")})


class Reads(TorchDispatchMode):
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        if func is torch.ops.aten._local_scalar_dense.default:
            _record("item")
        return func(*args, **(kwargs or {}))


_tolist = torch.Tensor.tolist


def _counted_tolist(self: torch.Tensor):  # noqa: ANN202
    if id(self) not in delivered:  # reading what a HostCopy delivered is reading host memory
        _record("tolist")
    return _tolist(self)


copies: list[dict] = []
delivered: dict[int, torch.Tensor] = {}  # by id, kept alive so that ids are not reused
_init, _get = distributed.HostCopy.__init__, distributed.HostCopy.get


def _copy_init(self: distributed.HostCopy, tensor: torch.Tensor) -> None:
    _init(self, tensor)
    self._made_at = launch[0]  # type: ignore[attr-defined]


def _copy_get(self: distributed.HostCopy) -> torch.Tensor:
    copies.append({"made": self._made_at, "read": launch[0], "in_step": in_step[0]})  # type: ignore[attr-defined]
    allowed[0] += 1
    try:
        host = _get(self).clone()
        delivered[id(host)] = host
        return host
    finally:
        allowed[0] -= 1


class _Allowed:
    def __enter__(self) -> None:
        allowed[0] += 1

    def __exit__(self, *exc: object) -> None:
        allowed[0] -= 1


in_step = [False]


def main() -> None:
    out, overrides = Path(sys.argv[1]), sys.argv[2:]
    distributed.HostCopy.__init__ = _copy_init  # type: ignore[method-assign]
    distributed.HostCopy.get = _copy_get  # type: ignore[method-assign]
    cfg = load_config(REPO / "configs" / "quickstart.yaml", overrides)
    env = distributed.init_distributed()
    trainer = Trainer(cfg, env)
    trainer.resume("none")
    step, state = trainer.step, trainer.state
    run, settle = step.run, step.settle
    per_launch: list[dict] = []

    def counted_run(batch):  # noqa: ANN001, ANN202
        launch[0] += 1
        per_launch.append({"launch": launch[0], "settled": False, "step": None})
        in_step[0] = True
        try:
            return run(batch)
        finally:
            in_step[0] = False

    def counted_settle():  # noqa: ANN202
        outcome = settle()
        if not in_step[0]:  # the loop settled the step it just launched: a log/checkpoint/stop step
            per_launch[-1].update(settled=True, step=state.step + int(outcome.kept))
        return outcome

    step.run, step.settle = counted_run, counted_settle  # type: ignore[method-assign]
    torch.Tensor.tolist = _counted_tolist  # type: ignore[method-assign]
    try:
        with Reads():
            trainer.fit()
    finally:
        torch.Tensor.tolist = _tolist  # type: ignore[method-assign]
    with _Allowed():
        trainer.identity.tracker.close(status="FINISHED")
    distributed.shutdown()
    out.write_text(json.dumps({"reads": records, "copies": copies, "launches": per_launch}, indent=1))


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
