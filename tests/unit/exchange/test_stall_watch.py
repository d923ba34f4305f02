"""The stall watch names a rank whose status record stopped changing.

Real TCPStore and StatusBoard; the stopped rank is a record written by hand that never
changes again (what a SIGSTOPped rank's board looks like), and the watch's clock is
driven by the test, so nothing here waits for real time.
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections import Counter
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import pytest
import torch.distributed as dist
from test_store_load import CountingStore

from dynamo_dist.exchange.status import StatusBoard
from dynamo_dist.exchange.watch import Stale, StallWatch


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def store() -> Any:
    return dist.TCPStore("127.0.0.1", 0, 1, True, timeout=timedelta(seconds=30))


def _record(stamp: float, state: str = "running") -> str:
    return json.dumps(
        {
            "seq": 7,
            "frame": "step (train.py:12)",
            "group": "world",
            "state": state,
            "time": stamp,
            "host": "node-b",
            "pid": 4242,
        }
    )


#: The boards' write period here, as if configured.
_PERIOD = 1.0


@contextlib.contextmanager
def _watching(
    store: Any, rank: int, world: int, clock: Clock, aborts: list | None = None
) -> Iterator[StallWatch]:
    """A rank's stall watch on a board whose own thread never ticks (an hour): the test
    calls tick() itself. The board is closed on the way out."""
    board = StatusBoard(store, rank, world, 3600.0, str)
    board.interval = board.tick_interval = _PERIOD
    on_abort = aborts.append if aborts is not None else None
    try:
        yield StallWatch(board, rank, world, 2.0, 10.0, on_abort, clock=clock)
    finally:
        board.close()


def _advance(clock: Clock, seconds: float, *watches: StallWatch) -> None:
    """Let ``seconds`` pass as the board thread does: a tick every write period."""
    end = clock.now + seconds
    while clock.now < end:
        clock.now = min(clock.now + _PERIOD, end)
        for w in watches:
            w.tick()


def _warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]


def test_a_stopped_rank_is_named_once_then_every_wait_log_interval(
    store: Any, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="dynamo_dist")
    clock = Clock()
    with _watching(store, 0, 2, clock) as watch:
        assert watch.reader and watch.stale_after == pytest.approx(2.0 + 2 * 3.0)
        store.set("dynamo_dist/status/1", _record(1.0))
        watch.tick()
        _advance(clock, watch.stale_after - 1, watch)
        assert not _warnings(caplog)  # silent, but not for long enough yet
        _advance(clock, 2, watch)
        (line,) = _warnings(caplog)
        assert "rank 1 (host node-b, pid 4242) has not published its status" in line
        assert "exchange #7 of group world at step (train.py:12)" in line
        assert "kill -CONT 4242" in line and "stall_abort" in line
        _advance(clock, 5, watch)
        assert len(_warnings(caplog)) == 1  # not before wait_log_interval (10 s)
        _advance(clock, 5, watch)
        assert len(_warnings(caplog)) == 2
        # It resumes: one line says so, and no more warnings.
        store.set("dynamo_dist/status/1", _record(2.0))
        _advance(clock, 1, watch)
        assert "rank 1 publishes its status again" in _warnings(caplog)[-1]
        for step in range(30):  # publishing again: named no more
            store.set("dynamo_dist/status/1", _record(3.0 + step))
            _advance(clock, 1, watch)
        assert len(_warnings(caplog)) == 3


def test_ranks_that_exited_or_keep_publishing_are_never_named(
    store: Any, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="dynamo_dist")
    clock = Clock()
    with _watching(store, 0, 3, clock) as watch:
        store.set("dynamo_dist/status/1", _record(1.0, state="exited"))
        for step in range(20):
            store.set("dynamo_dist/status/2", _record(float(step)))  # a live rank
            _advance(clock, 2, watch)
        assert not _warnings(caplog)


def test_stall_abort_hands_the_stopped_ranks_over(store: Any) -> None:
    clock = Clock()
    aborts: list[list[Stale]] = []
    with _watching(store, 0, 2, clock, aborts) as watch:
        store.set("dynamo_dist/status/1", _record(1.0))
        watch.tick()
        _advance(clock, watch.stale_after + 1, watch)
        ((stale,),) = aborts
        assert stale.rank == 1 and stale.record["pid"] == 4242


def test_ranks_that_do_not_read_the_board_name_their_reader(
    store: Any, caplog: pytest.LogCaptureFixture
) -> None:
    # 130 ranks: every 3rd reads the board. Rank 1 reads one counter a write period.
    caplog.set_level(logging.WARNING, logger="dynamo_dist")
    clock = Clock()
    counts: Counter[str] = Counter()
    with (
        _watching(store, 0, 130, clock) as reader,
        _watching(CountingStore(store, counts), 1, 130, clock) as other,
    ):
        assert reader.reader and not other.reader
        for r in range(1, 130):
            store.set(f"dynamo_dist/status/{r}", _record(1.0))
        other.tick()  # the first look only learns how many notices are old
        reader.tick()
        counts.clear()
        _advance(clock, reader.stale_after + 1, reader)
        other.tick()
        assert counts == Counter({"add": 1, "get": 1})
        lines = [w for w in _warnings(caplog) if "board reader rank 0 has the details" in w]
        assert len(lines) == 1 and "rank 1 (host node-b" in lines[0]
        clock.now += 1
        counts.clear()
        other.tick()
        assert counts == Counter({"add": 1})  # nothing new: one operation, no line
        assert len([w for w in _warnings(caplog) if "board reader" in w]) == 1


def test_the_watch_reads_the_store_once_a_write_period(store: Any) -> None:
    # What benchmarks/scale_model.py multiplies out: a reader's look is check + multi_get,
    # another rank's one add, each at most once per board write period.
    clock = Clock()
    counts: Counter[str] = Counter()
    with _watching(CountingStore(store, counts), 0, 2, clock) as watch:
        store.set("dynamo_dist/status/1", _record(1.0))
        counts.clear()
        for _ in range(5):
            watch.tick()
            clock.now += _PERIOD / 5
        assert counts == Counter({"check": 1, "multi_get": 1})
        watch.tick()
        assert counts == Counter({"check": 2, "multi_get": 2})


def test_a_job_suspended_and_resumed_names_nobody(
    store: Any, caplog: pytest.LogCaptureFixture
) -> None:
    # Every rank stopped for 40 s (SLURM's suspend, docker pause, Ctrl-Z): the reader
    # resumes first and reads rank 1's record unchanged. That is not rank 1's silence.
    caplog.set_level(logging.WARNING, logger="dynamo_dist")
    clock = Clock()
    aborts: list[list[Stale]] = []
    with _watching(store, 0, 2, clock, aborts) as watch:
        store.set("dynamo_dist/status/1", _record(1.0))
        watch.tick()
        clock.now += 40
        watch.tick()
        clock.now += _PERIOD
        store.set("dynamo_dist/status/1", _record(2.0))  # rank 1 resumes a moment later
        watch.tick()
        assert not _warnings(caplog) and not aborts
        # A rank that really stays stopped after the resume is still named.
        _advance(clock, watch.stale_after + 1, watch)
        assert len(_warnings(caplog)) == 1 and len(aborts) == 1
