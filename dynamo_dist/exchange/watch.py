"""Names a rank that has stopped: its status board record went stale while others live.

A rank stopped by SIGSTOP, paused in a debugger, swapping, or holding the GIL in C++
stops publishing its status (the board's thread needs the GIL and a running process).
The others then wait for it, in dynamo_dist's exchange or in torch's own collectives
(DDP's gradient all-reduce, FSDP's all-gather), and torch's collectives say nothing
until their own timeout, half an hour for gloo. This watch runs on the board's thread,
which keeps running while the main thread is blocked in a collective, so it can name
the stale rank wherever the others wait.

Who reads: only the board readers (``status.board_reader_stride``: every rank up to 64
ranks, 64 ranks in a larger job) read the whole board, every board write period (which
grows with the job: ``status.publish_interval``). When one finds a rank stale, it logs
one WARNING with the rank's host, pid, last exchange and frame, and repeats it every
``wait_log_interval``; it also bumps a job-wide counter, which every other rank reads
once a write period (one store operation) to log one line naming that reader.

A record is stale when it has not changed for ``stall_warning`` plus two heartbeat
periods. It is judged by when this reader last saw it change, on this reader's
monotonic clock, never by the timestamp inside it: hosts' clocks differ. Only time
the reader itself ran counts: a reader that missed its reads (the whole job suspended
and resumed, its own GIL held) starts counting again.

With ``stall_abort``, the reader that finds a stale rank calls ``on_abort`` (the runtime
writes the job report and ends the process with :data:`STALL_EXIT_CODE`): the main
thread may be blocked inside torch's C++, where no exception can reach it, and the
launcher then ends the job instead of letting it hang.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from dynamo_dist._log import get_logger
from dynamo_dist.dynamo import events
from dynamo_dist.exchange import status

log = get_logger("watch")

#: The exit status of a process ended by ``stall_abort`` (EX_TEMPFAIL: a restart may work).
STALL_EXIT_CODE = 75

_NOTICE_COUNT = "dynamo_dist/stalled/count"
_NOTICE = "dynamo_dist/stalled/last"


@dataclass
class Stale:
    """A rank found stale: what the warning says about it."""

    rank: int
    silent_s: float
    record: dict[str, Any]

    def describe(self) -> str:
        rec = self.record
        where = f"exchange #{rec.get('seq', 0)}"
        if rec.get("group"):
            where += f" of group {rec['group']}"
        where += f" at {rec.get('frame') or 'no frame yet'}"
        return (
            f"rank {self.rank} (host {rec.get('host', '?')}, pid {rec.get('pid', '?')}) has not "
            f"published its status for {self.silent_s:.0f}s: stopped (SIGSTOP, a debugger), "
            f"swapping, or holding the GIL; its last guard exchange was {where}"
        )


class StallWatch:
    """Watches the board for ranks whose records stop changing (one per runtime)."""

    def __init__(
        self,
        board: status.StatusBoard,
        rank: int,
        world_size: int,
        stall_warning: float,
        wait_log_interval: float,
        on_abort: Callable[[list[Stale]], None] | None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._board = board
        self._rank = rank
        self._world = world_size
        stride = status.board_reader_stride(world_size)
        self.reader = rank % stride == 0
        self._my_reader = rank - rank % stride
        # A live rank's record changes at least every heartbeat (2 write periods) plus
        # a tick of slack.
        heartbeat = 2 * board.interval + board.tick_interval
        self.stale_after = stall_warning + 2 * heartbeat
        self.read_every = board.interval
        # A reader that itself did not run for this long (stopped with the whole job,
        # suspended, its GIL held) saw nothing meanwhile: that time is not silence.
        self._blind_after = board.interval + heartbeat
        self._repeat = wait_log_interval
        self._on_abort = on_abort
        self._clock = clock
        self._next_read = clock()
        self._last_read: float | None = None
        self._ages = status.RecordAges()
        self._warned: dict[int, float] = {}
        self._notices_seen: int | None = None

    def tick(self) -> None:
        """One look, at most once a write period (called on every board tick)."""
        now = self._clock()
        if now < self._next_read:
            return
        self._next_read = now + self.read_every
        if self.reader:
            self._read_board(now)
        else:
            self._read_notice()

    def _read_board(self, now: float) -> None:
        if self._last_read is not None and now - self._last_read > self._blind_after:
            # This reader was not running (a job suspended and resumed, SLURM's suspend,
            # docker pause, Ctrl-Z): every rank's silence counts from now, or the first
            # rank resumed would name the others, stopped exactly as long as itself.
            self._ages.restart(now)
        self._last_read = now
        board = self._board.snapshot()
        stale: list[Stale] = []
        for r, rec in board.items():
            if r == self._rank or not rec or "time" not in rec:
                self._ages.forget(r)
                continue
            if rec.get("state", "running") != "running":
                self._ages.forget(r)  # exited or finished: it says so itself
                self._warned.pop(r, None)
                continue
            silent = self._ages.age(r, rec.get("time"), now)
            if silent is None:
                if self._warned.pop(r, None) is not None:
                    log.warning("rank %d publishes its status again", r)
                continue
            if silent >= self.stale_after:
                stale.append(Stale(r, silent + self._board.interval, rec))
        due = [s for s in stale if now - self._warned.get(s.rank, -1e18) >= self._repeat]
        if not due:
            return
        new = [s for s in due if s.rank not in self._warned]
        for s in due:
            self._warned[s.rank] = now
            log.warning(
                "%s. The other ranks wait for it, in dynamo_dist's exchange or in torch's "
                "own collectives (DDP, FSDP), until a timeout (gloo's: 30 minutes). Fix: "
                "resume it (kill -CONT %s) or end the job; set stall_abort = true "
                "(DYNAMO_DIST_STALL_ABORT=1) to end it here, with the job report.",
                s.describe(),
                s.record.get("pid", "<pid>"),
            )
            events.emit(
                "rank_stalled",
                rank=s.rank,
                host=s.record.get("host"),
                pid=s.record.get("pid"),
                silent_s=round(s.silent_s, 1),
                seq=s.record.get("seq"),
                frame=s.record.get("frame"),
                reader=self._rank,
            )
        if new:
            self._announce(new)
        if self._on_abort is not None:
            self._on_abort(due)

    def _announce(self, new: list[Stale]) -> None:
        """Tell the ranks that do not read the board (one counter they poll)."""
        try:
            text = "; ".join(s.describe() for s in new)
            self._board.store.set(_NOTICE, json.dumps({"reader": self._rank, "text": text}))
            self._board.store.add(_NOTICE_COUNT, 1)
        except Exception as e:  # the store going away must never break training
            log.debug("could not announce a stalled rank: %s", e)

    def _read_notice(self) -> None:
        try:
            count = int(self._board.store.add(_NOTICE_COUNT, 0))
            if self._notices_seen is None:
                self._notices_seen = count  # what was announced before we started is old
                return
            if count <= self._notices_seen:
                return
            self._notices_seen = count
            notice = json.loads(self._board.store.get(_NOTICE))
            log.warning(
                "a rank has stopped publishing its status; board reader rank %s has the "
                "details: %s",
                notice.get("reader", self._my_reader),
                str(notice.get("text", ""))[:500],
            )
        except Exception as e:
            log.debug("could not read the stalled-rank notice: %s", e)
