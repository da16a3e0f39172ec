"""Hang diagnosis: a watchdog thread on every rank notices a rank that stopped making progress, writes every
rank's Python stacks, and fails the run with one line naming the rank(s) and the step.

The loop calls :meth:`Watchdog.beat` after every step it finished: two attribute writes (no host sync, no
collective, no I/O). A daemon thread on every rank wakes every ``poll_s``, publishes its rank's progress in
the process group's TCPStore (:func:`trainer.distributed.store`): seconds since its last beat, its step, and
whether its main thread is waiting inside a torch.distributed call; then it reads every rank's. When a rank
has not finished a step for ``train.hang_timeout_min``:

1. the first rank to notice claims the hang in the store (``compare_set``: one record, one directory);
2. every live rank writes the Python stacks of all its threads (:mod:`faulthandler`) to
   ``<output_dir>/hangs/<UTC time>/rank_<r>.txt``. The watchdog is a thread of its own, so a rank whose main
   thread is stuck still dumps where it is stuck. On CUDA, NCCL's flight recorder (the rank's last
   collectives, enabled in :func:`trainer.distributed.init_distributed`) goes next to it;
3. rank 0 prints ``error: rank(s) 1 made no progress for N s at step S; stacks in <dir>/``, logs the
   directory to MLflow and ends the run FAILED (``on_hang``); then every rank exits with :data:`EXIT_HUNG`.

Which rank is behind: a rank stuck inside a step soon stops its peers too (they wait for it in the step's
collective), so all ranks stop beating within a step of each other. The rank(s) with the lowest step are
behind; among them, those whose main thread is *not* inside a torch.distributed call are the ones the others
wait for. When all of them wait in a collective (a mismatched or deadlocked collective) all are named. On
CUDA the host seldom waits inside the collective itself (NCCL queues it), so there every rank of the lowest
step is named and the flight recorder says which collective each rank reached.

Arming: nothing is judged before this process finished its first step (start-up, checkpoint loading and the
first step's compilation can take long; ``train.collective_timeout_min`` covers them). Checkpoint saves (a
synchronous one, or waiting for the previous background write), post-hoc EMA snapshots, evaluation, sample
grids and the end of the run can take far longer than a step: the loop pauses the watchdog around them, and
nothing is judged while any rank is paused (the others may wait for it in a collective; a collective that never
completes there is ended by ``train.collective_timeout_min``).
"""

from __future__ import annotations

import contextlib
import faulthandler
import json
import os
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch

EXIT_HUNG = 4
"""Exit status of every rank of a run stopped by the hang watchdog."""

_PREFIX = "watchdog"
_HANG_KEY = f"{_PREFIX}/hang"
_DONE_KEY = f"{_PREFIX}/reported"


@dataclass(frozen=True)
class Progress:
    """What one rank published about itself."""

    step: int
    """The last step it finished in this process (-1: none yet)."""
    age_s: float
    """Seconds since it finished that step (0 before its first: a first step may take long on one rank)."""
    armed: bool
    """It finished a step in this process."""
    paused: bool
    """It is in a phase not judged (evaluation, grids, the end of the run)."""
    waiting: bool
    """Its main thread is inside a torch.distributed call (waiting for its peers)."""


@dataclass(frozen=True)
class Hang:
    ranks: tuple[int, ...]
    """The ranks that are behind (the others wait for them)."""
    step: int
    """The step they did not finish."""
    age_s: float
    """How long they have made no progress."""


def find_hang(progress: Mapping[int, Progress], timeout_s: float) -> Hang | None:
    """The hang in a set of published progress records, or None (see the module docstring for the rule)."""
    if not any(p.armed for p in progress.values()) or any(p.paused for p in progress.values()):
        return None  # a paused rank (a grid on rank 0, say) may hold the others in a collective for long
    judged = dict(progress)
    if not any(p.age_s >= timeout_s for p in judged.values()):
        return None
    # Ranks publish a poll apart, so a peer stuck at the same step may not have crossed the timeout yet in
    # its last record: once one rank did, every judged rank counts.
    low = min(p.step for p in judged.values())
    lowest = sorted(r for r, p in judged.items() if p.step == low)
    behind = [r for r in lowest if not judged[r].waiting] or lowest
    return Hang(tuple(behind), low + 1, max(p.age_s for p in judged.values()))


def hang_line(hang: Hang, where: Path) -> str:
    ranks = ",".join(str(r) for r in hang.ranks)
    return f"error: rank(s) {ranks} made no progress for {hang.age_s:.0f} s at step {hang.step}; stacks in {where}/"


def _in_torch_distributed(frame: Any) -> bool:
    while frame is not None:
        name = frame.f_code.co_filename.replace("\\", "/")
        if "/torch/distributed/" in name or "/deepspeed/comm/" in name:
            return True
        frame = frame.f_back
    return False


def _exit(code: int) -> None:
    # The main thread is stuck (that is why we are here): end the process from this thread.
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(code)


class Watchdog:
    """One rank's watchdog. ``timeout_s`` 0 turns it off (:meth:`beat` and :meth:`paused` still work).

    ``store``: the process group's store; ``hangs_dir``: where dumps go (``<output_dir>/hangs``);
    ``on_hang(dump_dir)``: rank 0's reporting (MLflow) before the exit; ``exit``: how the process ends
    and ``clock`` (seconds, monotonic) can be replaced by tests."""

    def __init__(
        self,
        timeout_s: float,
        rank: int,
        world_size: int,
        hangs_dir: Path,
        poll_s: float | None = None,
        exit: Callable[[int], None] = _exit,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.timeout_s, self.rank, self.world_size, self.hangs_dir = timeout_s, rank, world_size, hangs_dir
        self.poll_s = poll_s if poll_s is not None else min(max(timeout_s / 10, 0.2), 30.0)
        self._exit, self._clock = exit, clock
        self._step = -1
        self._last: float | None = None  # monotonic time of the last beat
        self._loop_thread: int | None = None
        self._paused = 0
        self._store: Any = None
        self._on_hang: Callable[[Path], None] | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._pause_seen: float | None = None  # when a paused rank was last seen
        self._seen: dict[int, tuple[str, float]] = {}  # rank -> (last record, when it last changed here)
        self.handled: dict[str, Any] | None = None

    # ------------------------------------------------------------------ the loop's side (cheap)
    def beat(self, step: int) -> None:
        """Step ``step`` finished on this rank."""
        self._step, self._last = step, self._clock()
        if self._loop_thread is None:
            self._loop_thread = threading.get_ident()

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Not judged inside (evaluation, grids); the clock restarts when it ends."""
        self._paused += 1
        try:
            yield
        finally:
            self._paused -= 1
            if self._last is not None:
                self._last = self._clock()

    # ------------------------------------------------------------------ thread
    def start(self, store: Any, on_hang: Callable[[Path], None] | None = None) -> None:
        if self.timeout_s <= 0 or store is None or self._thread is not None:
            return
        self._store, self._on_hang = store, on_hang
        self._thread = threading.Thread(target=self._run, name="hang-watchdog", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            # Long enough for a store call in flight on a loaded machine to return: the process group (and the
            # store it uses) is destroyed right after, and a thread still inside it aborts the process at exit.
            self._thread.join(timeout=max(10.0, 2 * self.poll_s))
        self._thread = None

    def _run(self) -> None:
        while not self._stop.wait(self.poll_s):
            try:
                self.tick()
            except Exception as err:  # noqa: BLE001 - the store went away: the run is ending anyway
                if self.handled is not None:
                    self._exit(EXIT_HUNG)
                if not self._stop.is_set():
                    print(f"warning: hang watchdog stopped on rank {self.rank}: {err}", file=sys.stderr, flush=True)
                return

    def mine(self) -> Progress:
        now = self._clock()
        frame = sys._current_frames().get(self._loop_thread) if self._loop_thread is not None else None
        return Progress(
            step=self._step,
            age_s=now - self._last if self._last is not None else 0.0,
            armed=self._last is not None,
            paused=self._paused > 0,
            waiting=_in_torch_distributed(frame),
        )

    def tick(self) -> None:
        """Publish, then look: a hang claimed by anyone is handled; one seen here is claimed."""
        st = self._store
        st.set(f"{_PREFIX}/rank/{self.rank}", json.dumps(asdict(self.mine())))
        if st.check([_HANG_KEY]):
            self._handle(json.loads(st.get(_HANG_KEY)))
            return
        progress, now = self._read_all(), self._clock()
        if any(p.paused for p in progress.values()):
            self._pause_seen = now
        if self._pause_seen is not None:
            # Peers held by a paused rank recorded long waits that were no hang: nobody can have been stuck for
            # longer than since a pause was last seen.
            cap = now - self._pause_seen
            progress = {r: replace(p, age_s=min(p.age_s, cap)) for r, p in progress.items()}
        hang = find_hang(progress, self.timeout_s)
        if hang is None:
            return
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        record = {"dir": str(self.hangs_dir / stamp), "by": self.rank, **asdict(hang)}
        self._handle(json.loads(st.compare_set(_HANG_KEY, "", json.dumps(record))))

    def _read_all(self) -> dict[int, Progress]:
        """Every rank's record. One whose record has not changed for ``timeout_s`` has a stuck process (its
        watchdog cannot run either): it counts as stalled for that long and not waiting."""
        keys = [f"{_PREFIX}/rank/{r}" for r in range(self.world_size)]
        if self._store.check(keys):
            values = dict(enumerate(self._store.multi_get(keys)))
        else:
            values = {r: self._store.get(k) for r, k in enumerate(keys) if self._store.check([k])}
        now, out = self._clock(), {}
        for r, raw in values.items():
            text = raw.decode() if isinstance(raw, bytes) else str(raw)
            record, since = self._seen.get(r, (None, now))
            if record != text:
                self._seen[r] = (text, now)
                since = now
            p = Progress(**json.loads(text))
            stale = now - since
            if stale >= self.timeout_s:
                p = Progress(p.step, p.age_s + stale, p.armed, False, False)
            out[r] = p
        return out

    # ------------------------------------------------------------------ a hang
    def _handle(self, record: dict[str, Any]) -> None:
        if self.handled is not None:
            return
        self.handled = record
        where = Path(record["dir"])
        hang = Hang(tuple(record["ranks"]), int(record["step"]), float(record["age_s"]))
        self.dump(where, hang, by=int(record["by"]))
        st = self._store
        st.set(f"{_PREFIX}/dumped/{self.rank}", "1")
        line = hang_line(hang, where)
        if self.rank == 0:
            # Every rank whose watchdog runs dumps within a poll of seeing the record; a stuck process never does.
            deadline = time.monotonic() + 3 * self.poll_s + 10.0
            dumped = [f"{_PREFIX}/dumped/{r}" for r in range(self.world_size)]
            while not st.check(dumped) and time.monotonic() < deadline:
                time.sleep(self.poll_s / 4)
            print(line, file=sys.stderr, flush=True)
            if self._on_hang is not None:
                try:
                    self._on_hang(where)
                except Exception as err:  # noqa: BLE001 - the exit status and the line still say it
                    print(f"warning: reporting the hang to MLflow failed: {err}", file=sys.stderr, flush=True)
            st.set(_DONE_KEY, "1")
        else:
            # Rank 0 reports (it owns the MLflow run); leaving first would break its collectives and let the
            # launcher kill it mid-report. A rank 0 that cannot report leaves the line to the rank that claimed.
            deadline = time.monotonic() + 3 * self.poll_s + 60.0
            while not st.check([_DONE_KEY]) and time.monotonic() < deadline:
                time.sleep(self.poll_s / 4)
            if not st.check([_DONE_KEY]) and int(record["by"]) == self.rank:
                print(line, file=sys.stderr, flush=True)
        self._exit(EXIT_HUNG)

    def dump(self, where: Path, hang: Hang, by: int) -> Path:
        """Write this rank's stacks (all threads) and, on CUDA, NCCL's flight recorder into ``where``."""
        where.mkdir(parents=True, exist_ok=True)
        mine = self.mine()
        path = where / f"rank_{self.rank}.txt"
        with path.open("w") as f:
            f.write(
                f"rank {self.rank} of {self.world_size}, pid {os.getpid()}, host {socket.gethostname()}\n"
                f"hang (claimed by rank {by}): rank(s) {list(hang.ranks)} made no progress for "
                f"{hang.age_s:.1f} s at step {hang.step}\n"
                f"this rank: last finished step {mine.step}, {mine.age_s:.1f} s ago; main thread waiting in "
                f"torch.distributed: {'yes' if mine.waiting else 'no'}\n\n"
            )
            f.flush()
            faulthandler.dump_traceback(file=f, all_threads=True)
        trace = getattr(torch._C._distributed_c10d, "_dump_nccl_trace", None)
        if trace is not None and torch.cuda.is_available():
            with contextlib.suppress(Exception):  # absent or disabled recorder: the stacks still stand
                (where / f"rank_{self.rank}_nccl_trace.pkl").write_bytes(trace())
        return path
