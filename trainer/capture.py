"""What a checkpoint writes, captured instead of written: host copies of state, and DeepSpeed's saves.

DeepSpeed writes its files through the engine's ``checkpoint_engine`` (``create``/``makedirs``/``save``/
``commit``; DeepSpeed 0.19's hook for Nebula, FastPersist and its decoupled engine). :class:`CaptureEngine`
is one of those that writes nothing: every ``makedirs`` and ``save(state_dict, path)`` goes to a sink (a
:class:`trainer.ckpt_writer.SaveJob`), which either writes it at once (synchronous checkpoints) or keeps a
host copy and writes it later on its own thread. ``engine.save_checkpoint`` then does no I/O at all, so an
I/O error can no longer strike one rank inside DeepSpeed's collective save and leave the others waiting at its
barrier. DeepSpeed's ``_copy_recovery_script`` (rank 0 copies ``zero_to_fp32.py`` into the checkpoints
directory, beside the tags, outside the checkpoint engine) is deferred to the sink too, so that copy happens
with the save's other files.
Loading goes through the engine's own checkpoint engine, which is put back after each save.

We chose this over DeepSpeed's decoupled/FastPersist engines (GPU-direct writers tied to CUDA and their own
commit protocol) and torch.distributed.checkpoint's ``async_save`` (another file layout, which DeepSpeed's
universal conversion, our elastic resume, cannot read): the files stay exactly DeepSpeed's.
"""

from __future__ import annotations

import copy
import functools
from collections import defaultdict
from pathlib import Path
from typing import Any, Protocol

import torch


class Sink(Protocol):
    def add(self, path: Path, obj: Any, zipfile: bool = True, owned: bool = False) -> None: ...

    def makedirs(self, path: Path) -> None: ...

    def defer(self, what: str, fn: Any) -> None: ...


class HostBuffers:
    """Host buffers for the copies, reused from one checkpoint to the next: pinned for device tensors (a fresh
    pinned allocation per save would cost more than the copy) and plain for CPU tensors (a fresh allocation
    is paid in page faults: cloning 624 MB took 1.6-2.0 s here, copying into a reused buffer 0.16-0.19 s).
    The price: one host copy of this rank's part of the state stays allocated between saves."""

    def __init__(self) -> None:
        self._free: dict[tuple[torch.dtype, int, bool], list[torch.Tensor]] = defaultdict(list)
        self._used: list[torch.Tensor] = []

    def copy(self, t: torch.Tensor) -> torch.Tensor:
        t = t.detach()
        pinned = t.device.type == "cuda"  # pinned memory for device copies only (they are asynchronous then)
        free = self._free[(t.dtype, t.numel(), pinned)]
        buf = free.pop() if free else torch.empty(t.numel(), dtype=t.dtype, pin_memory=pinned)
        self._used.append(buf)
        out = buf.view(t.shape)
        out.copy_(t, non_blocking=True)
        return out

    def wait(self) -> None:
        """The copies queued on the device are in host memory once this returns."""
        if self._used and torch.cuda.is_available():
            torch.cuda.synchronize()

    def release(self) -> None:
        """The writer is done with every buffer handed out: they may be reused."""
        for buf in self._used:
            self._free[(buf.dtype, buf.numel(), buf.is_pinned())].append(buf)
        self._used = []


def host_copy(obj: Any, buffers: HostBuffers, memo: dict[int, Any] | None = None) -> Any:
    """A copy of ``obj`` that training cannot change any more: tensors copied to host memory (a tensor
    referenced twice stays one tensor, as ``torch.save`` would store it), containers rebuilt, other values
    deep-copied (an object that refuses to be copied is kept as is)."""
    memo = {} if memo is None else memo
    if isinstance(obj, torch.Tensor):
        if id(obj) not in memo:
            memo[id(obj)] = buffers.copy(obj)
        return memo[id(obj)]
    if isinstance(obj, dict):
        out = copy.copy(obj)  # keeps the mapping's type (OrderedDict, defaultdict and its factory)
        for k, v in obj.items():
            out[k] = host_copy(v, buffers, memo)
        return out
    if isinstance(obj, list):
        return [host_copy(v, buffers, memo) for v in obj]
    if isinstance(obj, tuple):
        items = [host_copy(v, buffers, memo) for v in obj]
        return type(obj)(*items) if hasattr(obj, "_fields") else type(obj)(items)
    try:
        return copy.deepcopy(obj)
    except Exception:  # noqa: BLE001 - e.g. a handle that cannot be copied; torch.save pickles it as it is
        return obj


def tensor_bytes(obj: Any) -> int:
    """Bytes of the tensors in ``obj`` (each counted once): about what ``torch.save`` writes."""
    seen: set[int] = set()

    def walk(o: Any) -> int:
        if isinstance(o, torch.Tensor):
            if id(o) in seen:
                return 0
            seen.add(id(o))
            return o.numel() * o.element_size()
        if isinstance(o, dict):
            return sum(walk(v) for v in o.values())
        if isinstance(o, list | tuple):
            return sum(walk(v) for v in o)
        return 0

    return walk(obj)


class CaptureEngine:
    """A DeepSpeed checkpoint engine that hands every save to ``sink`` (see the module docstring)."""

    def __init__(self, original: Any, sink: Sink) -> None:
        self.original, self.sink = original, sink
        self.name = "CaptureEngine"
        self.zipfile = bool(getattr(original, "zipfile_serialization", True))

    def create(self, info: Any) -> None:
        return None

    def makedirs(self, path: str, exist_ok: bool = False) -> None:
        self.sink.makedirs(Path(path))

    def save(self, state_dict: Any, path: str) -> None:
        self.sink.add(Path(path), state_dict, zipfile=self.zipfile)

    def load(self, path: str, map_location: Any = None) -> Any:
        return self.original.load(path, map_location=map_location)

    def commit(self, info: Any) -> bool:
        return True

    def is_data_parallel_writer(self, dp_rank: int) -> bool:
        return self.original.is_data_parallel_writer(dp_rank)

    def is_decoupled(self) -> bool:
        return False

    def set_commit_info(self, info: Any) -> None:
        return None

    def get_commit_info(self) -> None:
        return None

    def cleanup(self) -> None:
        return None

    def preserves_storage_sharing(self) -> bool:
        return self.original.preserves_storage_sharing()


def capture_deepspeed_save(engine: Any, save_dir: Path, tag: str, sink: Sink) -> None:
    """``engine.save_checkpoint(save_dir, tag)`` with every file it writes handed to ``sink``. Collective."""
    original = engine.checkpoint_engine
    engine.checkpoint_engine = CaptureEngine(original, sink)
    recovery = functools.partial(type(engine)._copy_recovery_script, engine)
    engine._copy_recovery_script = lambda path: sink.defer("recovery script", functools.partial(recovery, path))
    try:
        engine.save_checkpoint(str(save_dir), tag=tag, save_latest=False)
    finally:
        engine.checkpoint_engine = original
        del engine._copy_recovery_script
