"""The gloo transport: the decision on a reduced word, and what the ranks are told.

:class:`Transport` is what every transport shares: the verdict on a reduced word (a
frame mismatch raises, a mixed hit/miss goes to the group's :class:`MixedSlot` for the
policy layer), the progress
lines and the one stall warning per exchange, and the errors naming who did not
arrive and why. :class:`GlooTransport` reduces each word with gloo's allreduce on its
own group; ``exchange/shm.py`` combines a host's words in shared memory first. The
word's format is ``exchange/record.py``; the network step is ``exchange/allreduce.py``.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch.distributed as dist

from dynamo_dist._errors import CollectiveTimeoutError, RankDivergenceError
from dynamo_dist._log import get_logger
from dynamo_dist.dist.group import all_gather_objects
from dynamo_dist.dynamo import events
from dynamo_dist.dynamo import hook as dynamo_hook
from dynamo_dist.dynamo.hook import _C
from dynamo_dist.exchange.allreduce import BandAllreduce, LeaderExchange
from dynamo_dist.exchange.record import MixedSlot, Outcome, pack, unpack
from dynamo_dist.exchange.status import StatusBoard, board_reader_stride, describe_missing

log = get_logger("collective")


class Transport:
    """What every transport shares: the decision on a reduced word and the error reports.

    The sibling transports, :class:`GlooTransport` here and ``_shm.ShmTransport``, differ
    only in how the word is reduced; ``name`` is what the stats and logs report.
    """

    name = "base"

    def __init__(
        self,
        *,
        group: Any,
        ranks: Sequence[int],
        group_name: str,
        timeout: float,
        wait_log_interval: float,
        stall_warning: float,
        board: StatusBoard | None,
        describe: Callable[[int], str],
        mixed_slot: MixedSlot | None = None,
    ) -> None:
        self.ranks = list(ranks)  # the group's global ranks, ascending
        self.rank = dist.get_rank()
        self.world_size = len(self.ranks)
        self.group_name = group_name  # the group's name in logs, stats and the status board
        self.group = group  # the group's own CPU gloo group: rare, richer collectives
        self.timeout = timeout
        self.board = board
        self.describe = describe
        self.divergences = 0
        self.mixed = 0
        #: Where a mixed outcome goes for the policy layer: the group's (None: a slot of
        #: this transport's own, for a transport used without a group).
        self.mixed_slot = mixed_slot if mixed_slot is not None else MixedSlot()
        self.broken: BaseException | None = None
        self.wait_log_interval = wait_log_interval
        self.stall_warning = stall_warning
        self.waiters: list[LeaderExchange] = []
        self._last_wait_log = 0.0
        self._stall_warned_seq = -1
        #: Why the exchange in progress may legitimately wait long (set by the caller):
        #: ranks that are compiling what this one already has. No stall warning then.
        self.expected_wait: str | None = None

    def position(self) -> tuple[int, int]:
        """(last exchange number, its frame identity) on this rank."""
        raise NotImplementedError

    def board_reader(self) -> int:
        """The rank of this group whose stall warnings and errors list every member's status.

        Readers are every k-th member of the group (k = ceil(size / 64)), chosen within
        the group: a pipeline stage must have its own, not rank 0 of another stage.
        """
        i = self.ranks.index(self.rank)
        return self.ranks[i - i % board_reader_stride(len(self.ranks))]

    def reads_board(self) -> bool:
        return self.board_reader() == self.rank

    def stall_after(self) -> float:
        """Seconds before the stall warning: ``stall_warning``, or longer in a large job.

        The board is only as fresh as its publish interval (longer at scale), so a
        warning before two intervals would list ranks that did arrive as missing.
        """
        if self.board is None or self.board.interval <= self.board.tick_interval:
            return self.stall_warning  # published every tick: as fresh as before
        return max(self.stall_warning, 2 * self.board.interval + self.board.tick_interval)

    def last_epoch(self) -> int:
        """Process-wide order of this group's last exchange among all groups' exchanges."""
        return 0

    def waited(self) -> float | None:
        """Seconds the exchange in progress has waited so far (None: not waiting)."""
        now = time.monotonic()
        waits = [now - w.waiting_since for w in self.waiters if w.waiting_since is not None]
        return max(waits) if waits else None

    def make_hook(self) -> _C.GuardHook:
        """The C++ guard hook driving this transport."""
        raise NotImplementedError

    def close(self) -> None:
        """Release what the transport holds outside Python's reach (sockets, C++ callbacks)."""

    def watch(self) -> None:
        """Called periodically off the hot path: progress lines, and one stall warning.

        The progress line (``waiting Ns``) repeats every ``wait_log_interval`` while an
        exchange waits on the network (the shared-memory exchange logs its own from C++).
        The stall warning comes once per exchange, after ``stall_warning`` seconds, and
        only when the status board shows the missing ranks alive but elsewhere: the
        pattern of compiled code that only some ranks run, which the frame identity
        cannot always tell apart.
        """
        waited = self.waited()
        if waited is None:
            return
        seq, ident = self.position()
        now = time.monotonic()
        if (
            waited >= self.wait_log_interval
            and self.waiters
            and any(w.waiting_since is not None for w in self.waiters)
            and now - self._last_wait_log >= self.wait_log_interval
        ):
            self._last_wait_log = now
            self.log_wait(seq, ident, waited)
        if waited >= self.stall_after() and self._stall_warned_seq != seq:
            self._stall_warned_seq = seq
            self.warn_stall(seq, ident, waited)

    def warn_stall(self, seq: int, ident: int, waited: float) -> None:
        """One WARNING naming the frame, the exchange, where the missing ranks are, the fix."""
        if self.expected_wait is not None:
            log.info(
                "waiting %.0fs at guard exchange #%d for %s (group %s): %s",
                waited,
                seq,
                self.describe(ident),
                self.group_name,
                self.expected_wait,
            )
            return
        if self.board is None:
            return
        if not self.reads_board():
            log.warning(
                "stalled at guard exchange #%d for %s (group %s): waited %.0fs; rank %d's log "
                "says where the missing ranks are (in a job this large only some ranks read "
                "every rank's status)",
                seq,
                self.describe(ident),
                self.group_name,
                waited,
                self.board_reader(),
            )
            return
        board = {r: st for r, st in self.board.snapshot().items() if r in self.ranks}
        missing, lines = describe_missing(board, self.group_name, seq, self.board.stale_after)
        now = time.time()
        alive_elsewhere = [
            r
            for r in missing
            if r != self.rank
            and board.get(r, {}).get("state", "running") == "running"
            and board.get(r, {}).get("channels") is not None
            and now - float(board[r].get("time", now)) <= self.board.stale_after
        ]
        in_local = [r for r in alive_elsewhere if board[r].get("local")]
        if in_local and len(in_local) == len(alive_elsewhere):
            # Rank-local work, marked as such (rank-0 evaluation): waiting is expected.
            log.info(
                "waiting %.0fs at guard exchange #%d for %s (group %s): ranks %s are running "
                "code inside dynamo_dist.local() (rank-local work, such as evaluation)",
                waited,
                seq,
                self.describe(ident),
                self.group_name,
                in_local,
            )
            return
        if not alive_elsewhere:
            return
        where = "\n".join(f"  {line}" for line in lines)
        log.warning(
            "stalled at guard exchange #%d for %s (group %s): waited %.0fs; ranks %s are "
            "alive but elsewhere:\n%s\nEither they are busy with slow work outside compiled "
            "code (a checkpoint, evaluation not marked with local()), or they called compiled "
            "code fewer times (or in another order) than this rank and will never arrive. If "
            "only some ranks run this code (rank-0 evaluation, sampling, logging), wrap it in "
            "`dynamo_dist.local()`; if different ranks run different code (pipeline stages), "
            "compile each part with `group=` its ranks. Waiting goes on until the timeout "
            "(%.0fs).",
            seq,
            self.describe(ident),
            self.group_name,
            waited,
            alive_elsewhere,
            where,
            self.timeout,
        )
        events.emit(
            "stall_warning",
            seq=seq,
            rank=self.rank,
            group=self.group_name,
            frame=self.describe(ident),
            waited_s=round(waited, 3),
            missing=alive_elsewhere,
        )

    def decide(self, seq: int, ident: int, hit: bool, word: int) -> bool:
        """The verdict for a reduced word; raises RankDivergenceError on a frame mismatch.

        The C++ hook passes the bool on to Dynamo; a mixed outcome goes to
        ``mixed_slot``, for the policy's later call (why: :class:`MixedSlot`).
        """
        all_hit, any_hit, agree = unpack(word)
        if not agree:
            self.divergences += 1
            err = self.divergence_error(seq, ident, hit)
            events.emit(
                "divergence", kind="frame_mismatch", seq=seq, rank=self.rank, frames=err.ranks
            )
            self.broken = err
            raise err
        if any_hit and not all_hit:
            self.mixed += 1
            self.mixed_slot.put(Outcome(seq, ident, hit))
        return all_hit

    def gather_objects(self, obj: Any) -> list[Any]:
        """Every member's ``obj``, in group order (index i is global rank ``ranks[i]``)."""
        return all_gather_objects(self.group, obj)

    def divergence_error(self, seq: int, ident: int, hit: bool) -> RankDivergenceError:
        records = self.gather_objects(
            {
                "seq": seq,
                "ident": ident,
                "frame": self.describe(ident),
                "grad": dynamo_hook.identity_grad(ident),
                "hit": hit,
            }
        )
        by_rank = dict(zip(self.ranks, records, strict=True))
        frames = {int(rec["ident"]) for rec in records}
        grads = {rec["grad"] for rec in records if rec["grad"] is not None}

        def mode(rec: dict[str, Any]) -> str:
            if rec["grad"] is None:
                return ""
            return ", grad enabled" if rec["grad"] else ", grad disabled"

        lines = [
            f"  rank {r}: guard exchange #{rec['seq']} for {rec['frame']} "
            f"({'hit' if rec['hit'] else 'miss'}{mode(rec)})"
            for r, rec in by_rank.items()
        ]
        cause = (
            "Some ranks run it with grad disabled and others with grad enabled: typically "
            "evaluation (torch.no_grad(), model.eval()) on some ranks only while the others train. "
            if len(grads) > 1
            else "The ranks called compiled code in a different order or a different number of "
            "times (an SPMD violation). "
        )
        msg = (
            f"ranks of group {self.group_name} are guarding different frames at the same exchange "
            f"({len(frames)} distinct frames):\n" + "\n".join(lines) + "\n" + cause + "Fix: run "
            "compiled code that only some ranks run (rank-0 evaluation, sampling, logging) inside "
            "`dynamo_dist.local()` (a context manager or a decorator); compile code that different "
            "groups of ranks run (pipeline stages) with `group=` those ranks; otherwise make every "
            "rank call compiled functions in the same order."
        )
        return RankDivergenceError(msg, by_rank)

    def timeout_error(
        self, seq: int, ident: int, waited: float, cause: str | None, suspects: Iterable[int] = ()
    ) -> CollectiveTimeoutError:
        reads = self.board is not None and self.reads_board()
        board = (
            {r: st for r, st in self.board.snapshot().items() if r in self.ranks}
            if self.board is not None and reads
            else {}
        )
        stale = self.board.stale_after if self.board is not None else 10.0
        missing, lines = (
            describe_missing(board, self.group_name, seq, stale) if board else (list(suspects), [])
        )
        missing = [r for r in missing if r != self.rank]
        what = f"guard exchange #{seq} of group {self.group_name} for {self.describe(ident)}"
        if cause and cause != "timeout":
            head = (
                f"{what} failed after {waited:.1f}s: {cause}. "
                f"Ranks that did not arrive: {missing or 'unknown'}."
            )
        else:
            head = (
                f"{what} timed out after {waited:.1f}s (timeout {self.timeout:.0f}s). "
                f"Ranks that did not arrive: {missing or 'unknown'}."
            )
        hint = (
            "A rank that exited, crashed or hangs elsewhere, or that entered compiled code fewer "
            "times than this rank (an SPMD violation), never reaches this exchange: run code only "
            "some ranks run inside `dynamo_dist.local()`, and compile code that different groups "
            "of ranks run (pipeline stages) with `group=` those ranks. Check that rank's log; "
            "raise `timeout` if it was only slow (e.g. rank 0 writing a checkpoint)."
        )
        if self.board is not None and not reads:
            head += (
                f" Rank {self.board_reader()}'s error lists where each rank was "
                "(in a job this large only some ranks read every rank's status)."
            )
        body = "\n".join(f"  {line}" for line in lines)
        err = CollectiveTimeoutError(
            f"{head}\n{body}\n{hint}" if body else f"{head}\n{hint}",
            missing=missing,
            last_seen=board,
        )
        self.broken = err
        events.emit(
            "stall",
            seq=seq,
            rank=self.rank,
            frame=self.describe(ident),
            waited_s=round(waited, 3),
            cause=cause or "timeout",
            missing=missing,
        )
        return err

    def log_wait(self, seq: int, ident: int, waited: float) -> None:
        log.warning(
            "waiting %.0fs for the other ranks at guard exchange #%d (%s); timeout %.0fs",
            waited,
            seq,
            self.describe(ident),
            self.timeout,
        )


class GlooTransport(Transport):
    """Guard exchange over its own gloo group, created collectively on every rank.

    Guard traffic gets its own gloo group even when the job runs NCCL: a guard
    collective on the NCCL group would serialize with the model's gradient
    collectives on GPU streams, and a CPU-only group never touches a device.
    """

    name = "gloo"

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._allreduce = BandAllreduce(self.group)
        self.waiters.append(self._allreduce)
        self.seq = 0
        self.last_ident = 0
        self.epoch = 0

    def exchange(self, hit: bool, ident: int) -> bool:
        """Agree on one guard result; returns True only if every rank hit."""
        return self.exchange_timed(hit, ident)[0]

    def exchange_timed(self, hit: bool, ident: int) -> tuple[bool, int]:
        """:meth:`exchange`, and the nanoseconds this rank waited for the others.

        The wait is the whole all-reduce call: gloo's own sends and receives happen inside
        it and cannot be timed apart from the slowest rank's lateness. The hook counts the
        rest of the exchange (packing, the verdict, its own work) as the exchange's cost.
        """
        if self.broken is not None:
            raise self.broken
        self.seq += 1
        seq = self.seq
        self.last_ident = ident
        self.epoch = _next_epoch()
        t0 = time.perf_counter_ns()
        word, failure = self._allreduce(pack(hit, ident))
        waited_ns = time.perf_counter_ns() - t0
        if failure is not None:
            raise self.timeout_error(seq, ident, waited_ns / 1e9, failure)
        return self.decide(seq, ident, hit, word), waited_ns

    def make_hook(self) -> _C.GuardHook:
        return _C.GuardHook(self.exchange_timed)

    def position(self) -> tuple[int, int]:
        return self.seq, self.last_ident

    def last_epoch(self) -> int:
        return self.epoch


_epoch = 0


def _next_epoch() -> int:
    """Order of gloo exchanges across groups (the C++ hook counts its own)."""
    global _epoch
    _epoch += 1
    return _epoch


def percentiles(samples_ns: Iterable[int], name: str) -> dict[str, float]:
    """``{name}_p50_us`` and ``{name}_p99_us`` of nanosecond samples (0.0 without any)."""
    xs = sorted(samples_ns)

    def pick(q: float) -> float:
        return round(xs[min(len(xs) - 1, int(q * len(xs)))] / 1e3, 2) if xs else 0.0

    return {f"{name}_p50_us": pick(0.50), f"{name}_p99_us": pick(0.99)}
