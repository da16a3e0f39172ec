"""Writing one checkpoint's files, in the background or at once, and agreeing across ranks on how it went.

A :class:`SaveJob` receives what every part of the checkpoint writes (DeepSpeed's files via
:mod:`trainer.capture`, our per-rank and shared states, the export) as ``add(path, obj)``. Synchronous: each
file is written at once. Asynchronous: each object is copied to host memory (pinned on CUDA) and the
:class:`Writer` writes them on a thread while training goes on; the loop pays only for the copy.

Every file goes to a temporary name, is fsynced and renamed; after its files each rank other than 0 leaves an
empty mark in the tag directory (``.done_rank<r>`` or ``.failed_rank<r>``). Rank 0's writer waits for the
marks of every rank and then finalizes on its own (``finalize``: the directory is fsynced, ``COMPLETE`` and
``latest`` written, old checkpoints pruned) or, when one failed, removes the partial directory. So a
checkpoint becomes ``latest`` as soon as every rank's files are on disk, without a collective on the thread,
and a kill -9 at any moment leaves ``latest`` on the previous complete checkpoint.

:meth:`Writer.settle` is the agreement (collective, on the main thread): every rank waits for its own files,
then the ranks exchange a small status (ok or the one-line error, bytes planned) with one
``all_gather_object``, so all learn whether any failed even when a mark could not be written (a full disk);
rank 0 finishes the decision there if its thread had not. The loop settles before the next save (at most one
in flight), at a stop signal and at the end of the run.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from trainer.capture import HostBuffers, host_copy, tensor_bytes
from trainer.storage import describe

POLL_S = 0.05
"""How often rank 0's writer looks for the other ranks' marks."""
GRACE_S = 10.0
"""A run ending on an error: how long rank 0 waits at least for the other ranks' marks (see :meth:`Writer.close`)."""


def fsync_dir(path: Path) -> None:
    """The directory's entries (names of files fsynced as they were written) reach the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_file(path: Path, writer: Callable[[Any], None]) -> None:
    """Write through ``writer(file)`` to a temporary name, fsync, rename: never a half file under ``path``."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with open(tmp, "wb") as f:
            writer(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def mark_name(rank: int, ok: bool) -> str:
    return f".{'done' if ok else 'failed'}_rank{rank}"


@dataclass(frozen=True)
class SaveResult:
    """How a save went, the same on every rank after :meth:`Writer.settle`."""

    step: int
    tag_dir: Path
    ok: bool
    error: str | None
    """``rank R: OSError: [Errno 28] No space left on device`` for the first rank that failed."""
    planned_bytes: int
    """What all ranks together set out to write (tensor bytes)."""


class SaveJob:
    """The files of one checkpoint on this rank (see the module docstring)."""

    def __init__(self, tag_dir: Path, step: int, rank: int, world: int, background: bool, buffers: HostBuffers) -> None:
        self.tag_dir, self.step, self.rank, self.world = tag_dir, step, rank, world
        self.background, self.buffers = background, buffers
        self.items: list[tuple[str, Path | None, Any]] = []
        self.error: str | None = None
        self.planned = 0
        self.written = threading.Event()
        """This rank's files are written (or failed)."""
        self.agreed = threading.Event()
        """Rank 0: the main thread has the statuses and decides; the writer stops waiting for marks."""
        self.lock = threading.Lock()
        self.outcome: str | None = None
        """Rank 0: "complete" or "removed" once decided."""
        self.hook: Callable[[SaveJob, str, Path | None], None] | None = None
        self.write_s: float | None = None
        """How long this rank's files took to write (background jobs)."""

    # -- what the parts hand over (the main thread)
    def add(self, path: Path, obj: Any, zipfile: bool = True, owned: bool = False) -> None:
        """Write ``obj`` to ``path``. ``owned``: ``obj`` is already a host copy nothing else changes (the export's
        gathered weights), so a background save need not copy it again."""
        self.planned += tensor_bytes(obj)
        if self.background and not owned:
            obj = host_copy(obj, self.buffers)
        self._item(("save", path, (obj, zipfile)))

    def makedirs(self, path: Path) -> None:
        self._item(("mkdir", path, None))

    def defer(self, what: str, fn: Callable[[], None]) -> None:
        self._item(("call", None, (what, fn)))

    def _item(self, item: tuple[str, Path | None, Any]) -> None:
        if self.background:
            self.items.append(item)
        else:
            self._run(item)

    # -- the writing (the writer thread, or the main thread when synchronous)
    def _run(self, item: tuple[str, Path | None, Any]) -> None:
        if self.error is not None:
            return  # the first failure ends this rank's part of the save
        kind, path, payload = item
        try:
            if self.hook is not None:
                self.hook(self, kind, path)
            if kind == "mkdir":
                assert path is not None
                path.mkdir(parents=True, exist_ok=True)
            elif kind == "save":
                assert path is not None
                obj, zipfile = payload
                path.parent.mkdir(parents=True, exist_ok=True)
                write_file(path, lambda f: torch.save(obj, f, _use_new_zipfile_serialization=zipfile))
            else:
                payload[1]()
        except Exception as err:  # noqa: BLE001 - any failure of a write is this save's failure, reported in one line
            self.error = f"rank {self.rank}: {describe(err)}"

    def run_all(self) -> None:
        for item in self.items:
            self._run(item)
        self.items = []

    def leave_mark(self) -> None:
        """Ranks other than 0 say they are done (an empty file: it needs no room on a full tmpfs)."""
        if self.rank == 0:
            return
        with contextlib.suppress(OSError):  # then rank 0 learns the outcome at the agreement instead
            (self.tag_dir / mark_name(self.rank, self.error is None)).touch()

    def marks(self) -> tuple[bool, bool]:
        """Rank 0: (every other rank left a mark, all of them say done)."""
        done = failed = 0
        for r in range(1, self.world):
            if (self.tag_dir / mark_name(r, True)).exists():
                done += 1
            elif (self.tag_dir / mark_name(r, False)).exists():
                failed += 1
        return done + failed == self.world - 1, failed == 0


class Writer:
    """At most one :class:`SaveJob` in flight, its thread, and the agreement (see the module docstring).

    ``finalize(job)`` and ``discard(job)`` are rank 0's: make the checkpoint complete, or remove it."""

    def __init__(
        self,
        rank: int,
        world: int,
        finalize: Callable[[SaveJob], None],
        discard: Callable[[SaveJob], None],
        gather: Callable[[Any], list[Any]],
        broadcast: Callable[[Any], Any],
    ) -> None:
        self.rank, self.world = rank, world
        self.finalize_cb, self.discard_cb = finalize, discard
        self.gather, self.broadcast = gather, broadcast
        self.buffers = HostBuffers()
        self.job: SaveJob | None = None
        self.thread: threading.Thread | None = None
        self.hook: Callable[[SaveJob, str, Path | None], None] | None = None
        """Tests: called on the writing thread before each item (to hold a write at a known point)."""

    def new_job(self, tag_dir: Path, step: int, background: bool) -> SaveJob:
        if self.job is not None:
            raise RuntimeError("a checkpoint save is still in flight: settle() it first")
        job = SaveJob(tag_dir, step, self.rank, self.world, background, self.buffers)
        job.hook = self.hook
        return job

    def submit(self, job: SaveJob) -> None:
        """Start writing ``job`` (its snapshot is complete on this rank)."""
        self.job = job
        if job.background:
            self.buffers.wait()  # the host copies must have landed before the thread reads them
            self.thread = threading.Thread(target=self._work, args=(job,), name="checkpoint-writer", daemon=True)
            self.thread.start()
        else:
            job.leave_mark()
            job.written.set()

    def _work(self, job: SaveJob) -> None:
        t0 = time.perf_counter()
        job.run_all()
        job.write_s = time.perf_counter() - t0
        job.leave_mark()
        job.written.set()
        if self.rank != 0:
            return
        while not job.agreed.wait(POLL_S):
            all_marked, all_done = job.marks()
            if all_marked:
                self._decide(job, ok=all_done and job.error is None)
                return

    def _decide(self, job: SaveJob, ok: bool) -> None:
        with job.lock:
            if job.outcome is not None:
                return
            if ok:
                try:
                    self.finalize_cb(job)
                    job.outcome = "complete"
                    return
                except OSError as err:
                    job.error = job.error or f"rank 0: {describe(err)}"
            self.discard_cb(job)
            job.outcome = "removed"

    def settle(self) -> SaveResult | None:
        """Wait for the save in flight and agree on its outcome. Collective (every rank, same point)."""
        job, self.job = self.job, None
        if job is None:
            return None
        if self.rank != 0 and self.thread is not None:
            self.thread.join()
        job.written.wait()
        statuses = self.gather((job.error, job.planned))
        planned = sum(b for _, b in statuses)
        errors = [err for err, _ in statuses if err is not None]
        verdict: tuple[str | None, int] = (errors[0] if errors else None, planned)
        if self.rank == 0:
            job.agreed.set()
            if self.thread is not None:
                self.thread.join()
            if job.outcome is None:
                self._decide(job, ok=not errors)
            if job.outcome == "removed" and not errors:  # every file was written, the finalization failed
                verdict = (job.error or "rank 0: the checkpoint could not be marked complete", planned)
        # Rank 0 alone finalizes: its verdict is the one every rank acts on.
        error, planned = self.broadcast(verdict)
        self.thread = None
        self.buffers.release()
        return SaveResult(job.step, job.tag_dir, error is None, error, planned)

    def close(self, timeout_s: float = 300.0) -> None:
        """Not collective: let the save in flight finish if it can (a run ending on an error). Rank 0's writer
        still finalizes once every rank's mark is there; a rank whose mark does not come in time (see the code)
        leaves it incomplete. ``timeout_s`` bounds the wait for this rank's own files."""
        job, thread = self.job, self.thread
        self.job = self.thread = None
        if job is None or thread is None:
            return
        if self.rank == 0:
            job.written.wait(timeout_s)
            # The other ranks write parts of about the same size: one that has not left its mark within twice
            # rank 0's own time (at least GRACE_S) is presumed gone, killed or in the error that ends this run,
            # and waiting longer would only hold the allocation (the checkpoint stays incomplete, never half).
            thread.join(max(GRACE_S, 2.0 * (job.write_s or 0.0)))
        else:
            thread.join(timeout_s)
        job.agreed.set()
        thread.join(1.0)
