"""The job's key-value store at scale: what dynamo_dist asks of it, counted per operation.

One TCPStore serves every rank of a job, so dynamo_dist's traffic to it must stay
bounded job-wide (issue 17: at most about 1,000 operations a second at 4,096 ranks).
These tests count the operations each mechanism makes on a real TCPStore in one
process (ranks are threads here: what is counted is store traffic, not collectives):
the status board's writes and reads, and the per-compile cache agreement. The
cost model in ``benchmarks/scale_model.py`` multiplies these counts out.
"""

from __future__ import annotations

import threading
from collections import Counter
from datetime import timedelta
from typing import Any

import pytest
import torch.distributed as dist

from dynamo_dist.cache.agree import Agreement
from dynamo_dist.dist.local import GroupInfo
from dynamo_dist.exchange.collective import Transport
from dynamo_dist.exchange.status import StatusBoard, board_reader_stride, publish_interval


class CountingStore:
    """A client of a real TCPStore that counts the operations sent to the server."""

    def __init__(self, store: Any, counts: Counter[str]) -> None:
        self._store = store
        self.counts = counts

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._store, name)
        if name in ("set", "get", "add", "check", "wait", "multi_get", "multi_set"):

            def counted(*args: Any, **kwargs: Any) -> Any:
                self.counts[name] += 1
                return attr(*args, **kwargs)

            return counted
        return attr


@pytest.fixture
def server() -> Any:
    store = dist.TCPStore("127.0.0.1", 0, 1, True, timeout=timedelta(seconds=30))
    yield store


def _client(server: Any, counts: Counter[str]) -> CountingStore:
    return CountingStore(dist.TCPStore("127.0.0.1", server.port, 1, False), counts)


def test_publishing_slows_down_as_the_job_grows() -> None:
    assert publish_interval(2.0, 8) == 2.0
    assert publish_interval(2.0, 500) == 2.0
    # 4,096 ranks each writing every ~16 s: about 250 writes a second in all.
    assert 4096 / publish_interval(2.0, 4096) == pytest.approx(250.0)
    assert board_reader_stride(2) == 1
    assert board_reader_stride(64) == 1
    assert board_reader_stride(65) == 2
    assert board_reader_stride(4096) == 64  # 64 readers


def test_board_read_is_two_operations_whatever_the_world(server: Any) -> None:
    world = 5
    counts: Counter[str] = Counter()
    boards = [
        StatusBoard(_client(server, counts), r, world, 60.0, lambda ident: f"f{ident}")
        for r in range(world)
    ]
    try:
        assert counts["set"] == world  # each board published once at start
        counts.clear()
        board = boards[0].snapshot()
        assert sorted(board) == list(range(world))
        assert all(rec.get("state") == "running" for rec in board.values())
        assert counts == Counter({"check": 1, "multi_get": 1})
    finally:
        for b in boards:
            b.close()


def test_board_readers_at_scale(server: Any) -> None:
    counts: Counter[str] = Counter()
    board = StatusBoard(_client(server, counts), 130, 4096, 2.0, str)
    try:
        assert board.interval == pytest.approx(4096 / 250)
        assert board.stale_after >= 5 * board.interval
        # Readers are chosen within each group (a transport's members), not by global rank.
        t = Transport.__new__(Transport)  # the reader logic only: no process group
        t.board, t.stall_warning = board, 10.0
        t.ranks, t.rank = list(range(4096)), 130
        assert t.board_reader() == 128 and not t.reads_board()
        t.ranks, t.rank = list(range(32, 64)), 40  # a pipeline stage of 32: all read
        assert t.reads_board()
        t.ranks, t.rank = list(range(1000, 1100)), 1001  # 100 ranks: every 2nd reads
        assert t.board_reader() == 1000
        # The board is only as fresh as its slower writes: the warning waits for them.
        assert t.stall_after() >= 2 * board.interval
    finally:
        board.close()


def _agree_all(server: Any, oks: list[bool], timeout: float = 30.0) -> tuple[list[bool], Counter]:
    counts: Counter[str] = Counter()
    group = GroupInfo(name="world", key="w", size=len(oks))
    out: list[bool | None] = [None] * len(oks)

    def rank(r: int) -> None:
        agreement = Agreement(timeout, True)
        agreement._store_client = _client(server, counts)
        agreement._store_opened = True
        out[r] = agreement.agree("k" * 12, 1, oks[r], group)

    threads = [threading.Thread(target=rank, args=(r,)) for r in range(len(oks))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert all(v is not None for v in out)
    return [bool(v) for v in out], counts


def test_agreement_is_three_operations_per_rank_and_no_polling(server: Any) -> None:
    verdicts, counts = _agree_all(server, [True, True, True, True])
    assert verdicts == [True] * 4
    # add + wait + get per rank, and one set by the last reporter.
    assert counts == Counter({"add": 4, "wait": 4, "get": 4, "set": 1})


def test_one_no_makes_every_rank_compile_locally(server: Any) -> None:
    verdicts, _ = _agree_all(server, [True, False, True])
    assert verdicts == [False, False, False]


def _agreement(server: Any, timeout: float, counts: Counter[str]) -> Agreement:
    agreement = Agreement(timeout, True)
    agreement._store_client = _client(server, counts)
    agreement._store_opened = True
    return agreement


def test_missing_report_times_out_and_a_late_rank_follows(server: Any, monkeypatch: Any) -> None:
    counts: Counter[str] = Counter()
    # The veto opens a fresh client of the job's store: this test's server.
    monkeypatch.setattr(
        "dynamo_dist.cache.agree.open_store", lambda timeout: _client(server, counts)
    )
    early = _agreement(server, 0.5, counts)
    first = early._store_client
    group = GroupInfo(name="world", key="t", size=2)
    assert early.agree("k" * 12, 1, True, group) is False  # the other rank is late
    assert early._store_client is not first  # the timed-out wait's client is dropped
    # The late rank reports "ok" and finds the early one's veto: it compiles too.
    late = _agreement(server, 5.0, counts)
    assert late.agree("k" * 12, 1, True, group) is False


def test_peeking_for_a_no_is_rate_limited(server: Any) -> None:
    counts: Counter[str] = Counter()
    agreement = Agreement(30.0, True)
    agreement._store_client = _client(server, counts)
    agreement._store_opened = True
    group = GroupInfo(name="world", key="p", size=4096)
    for _ in range(100):
        agreement.decided_no(1, group)
    assert counts["add"] == 1  # at most one look every 4096/250 s per rank
