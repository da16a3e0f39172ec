"""The hang watchdog's rule (who is behind) and its hand-over through a real c10d store, two ranks as two
watchdogs in one process on a HashStore with a hand-driven clock; the loop pauses it around saves, snapshots
and evaluation."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pytest
import torch.distributed as dist

from trainer.config import ConfigError, load_config
from trainer.watchdog import EXIT_HUNG, Hang, Progress, Watchdog, find_hang, hang_line

T = 60.0


def _p(step: int, age: float, waiting: bool = False, armed: bool = True, paused: bool = False) -> Progress:
    return Progress(step=step, age_s=age, armed=armed, paused=paused, waiting=waiting)


def test_the_rank_not_waiting_in_a_collective_is_named() -> None:
    # Rank 1 stopped inside step 8; rank 0 waits for it in the step's all-reduce. Rank 1's last record is a
    # poll older, under the timeout: still named once rank 0 crossed it.
    hang = find_hang({0: _p(7, 61.0, waiting=True), 1: _p(7, 59.5)}, T)
    assert hang == Hang(ranks=(1,), step=8, age_s=61.0)
    assert hang_line(hang, Path("runs/x/hangs/t")) == (
        "error: rank(s) 1 made no progress for 61 s at step 8; stacks in runs/x/hangs/t/"
    )


def test_lowest_step_is_behind_and_a_collective_deadlock_names_all() -> None:
    assert find_hang({0: _p(9, 70.0, waiting=True), 1: _p(8, 70.0, waiting=True)}, T) == Hang((1,), 9, 70.0)
    assert find_hang({0: _p(5, 70.0, waiting=True), 1: _p(5, 70.0, waiting=True)}, T) == Hang((0, 1), 6, 70.0)
    assert find_hang({0: _p(5, 70.0), 1: _p(5, 70.0), 2: _p(5, 1.0, waiting=True)}, T) == Hang((0, 1), 6, 70.0)


def test_no_hang_before_the_timeout_before_arming_or_while_paused() -> None:
    assert find_hang({0: _p(5, 59.9), 1: _p(5, 59.9)}, T) is None
    # Nobody finished a first step in this process (start-up, compile): not judged.
    assert find_hang({0: _p(-1, 0.0, armed=False), 1: _p(-1, 0.0, armed=False)}, T) is None
    # Evaluation or a sample grid: paused ranks are not judged.
    assert find_hang({0: _p(5, 600.0, paused=True), 1: _p(5, 600.0, paused=True)}, T) is None
    # Rank 0 alone in a long phase (a grid): rank 1 waits for it in a collective, and is not named.
    assert find_hang({0: _p(5, 600.0, paused=True), 1: _p(5, 600.0, waiting=True)}, T) is None


def test_a_longer_first_step_on_one_rank_is_not_a_hang() -> None:
    dog = Watchdog(T, 0, 1, Path("unused"), clock=lambda: 1000.0)
    assert dog.mine().age_s == 0.0 and not dog.mine().armed  # before the first beat: no age to judge


class _Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_two_watchdogs_claim_once_dump_both_report_once_and_exit_4(
    tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    store = dist.HashStore()
    clock = _Clock()
    exits: list[tuple[int, int]] = []
    reported: list[Path] = []
    dogs = [
        Watchdog(T, r, 2, tmp_path / "hangs", poll_s=0.02, exit=lambda c, r=r: exits.append((r, c)), clock=clock)
        for r in range(2)
    ]
    for dog in dogs:
        dog.start(None)  # no store: not started (a run without a process group)
        dog._store = store  # driven by hand below: no thread
    dogs[0]._on_hang = reported.append
    dogs[0].beat(7)
    dogs[1].beat(7)
    for dog in dogs:
        dog.tick()
    assert not exits and dogs[0].handled is None
    clock.now = T + 5  # neither finished a step since
    threads = [threading.Thread(target=dog.tick) for dog in dogs]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert sorted(exits) == [(0, EXIT_HUNG), (1, EXIT_HUNG)]
    assert dogs[0].handled == dogs[1].handled  # one claim, seen by both
    where = Path(dogs[0].handled["dir"])
    assert reported == [where] and where.parent == tmp_path / "hangs"
    assert sorted(p.name for p in where.iterdir()) == ["rank_0.txt", "rank_1.txt"]
    dump = (where / "rank_1.txt").read_text()
    assert "rank 1 of 2" in dump and "test_two_watchdogs_claim_once" in dump  # this test's own frame
    lines = [ln for ln in capfd.readouterr().err.splitlines() if ln.startswith("error:")]
    assert lines == [f"error: rank(s) 0,1 made no progress for 65 s at step 8; stacks in {where}/"]


def test_pausing_restarts_the_clock() -> None:
    clock = _Clock()
    dog = Watchdog(T, 0, 1, Path("unused"), clock=clock)
    dog.beat(3)
    with dog.paused():
        clock.now = 10 * T
        assert dog.mine().paused
    assert not dog.mine().paused and dog.mine().age_s == 0.0


def test_hang_timeout_must_be_below_the_collective_timeout() -> None:
    with pytest.raises(ConfigError) as err:
        load_config("configs/quickstart.yaml", ["train.hang_timeout_min=30", "train.collective_timeout_min=30"])
    assert str(err.value) == (
        "configs/quickstart.yaml: train: hang_timeout_min 30 must be below collective_timeout_min 30 "
        "(else the collective timeout ends a hung run undiagnosed)"
    )
    assert load_config("configs/quickstart.yaml", ["train.hang_timeout_min=0.1"]).train.hang_timeout_min == 0.1


def test_the_loop_pauses_the_watchdog_around_saves_snapshots_and_evaluation() -> None:
    """A synchronous save, the wait for the previous background write or a snapshot can outlast
    train.hang_timeout_min: trainer/main.py's _do_due runs them with the watchdog paused; logging is judged."""
    from types import SimpleNamespace

    from trainer.cadence import Due
    from trainer.main import Trainer

    dog = Watchdog(T, 0, 1, Path("unused"))
    seen: dict[str, bool] = {}

    def rec(name: str) -> Any:
        return lambda *a, **k: seen.__setitem__(name, dog.mine().paused)

    fake = SimpleNamespace(
        state=SimpleNamespace(step=8, samples_seen=64),
        identity=SimpleNamespace(tracker=None),
        log=SimpleNamespace(write=rec("log"), exclude=lambda s: None),
        saver=SimpleNamespace(save=rec("save")),
        parts=SimpleNamespace(
            snapshots=SimpleNamespace(write=rec("snapshot")), evaluator=SimpleNamespace(run=rec("eval")), ema=None
        ),
        pictures=SimpleNamespace(importance=rec("plot"), grid=rec("grid")),
        watchdog=dog,
        after_step=None,
    )
    Trainer._do_due(fake, Due(log=True, save=True, plot=True, grid=True, eval=True, snapshot=True))  # type: ignore[arg-type]
    assert seen == {"log": False, "save": True, "snapshot": True, "plot": True, "grid": True, "eval": True}
    assert not dog.mine().paused


def test_waits_behind_a_paused_rank_are_not_a_hang(tmp_path: Path) -> None:
    """Rank 0 samples a grid alone (paused) for 10 timeouts while rank 1 waits for it in a collective; when
    rank 0 is back, rank 1's long wait, still in its last record, is no hang. A real stall after that is."""
    store, clock, exits = dist.HashStore(), _Clock(), []
    dogs = [Watchdog(T, r, 2, tmp_path, poll_s=0.02, exit=exits.append, clock=clock) for r in range(2)]
    for dog in dogs:
        dog._store = store
        dog.beat(4)
    with dogs[0].paused():
        for dog in dogs:
            dog.tick()
        clock.now = 10 * T
        for dog in dogs:
            dog.tick()
    dogs[0].tick()  # rank 0 is back; rank 1 has not ticked since (its record says 10 T without progress)
    assert not exits and dogs[0].handled is None
    clock.now = 11 * T + 1  # a timeout after the pause, and nobody finished a step
    threads = [threading.Thread(target=dog.tick) for dog in dogs]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert exits == [EXIT_HUNG, EXIT_HUNG]
