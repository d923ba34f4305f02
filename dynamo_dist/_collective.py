"""Cross-rank guard exchange: the record format, the decision, and the gloo transport.

One exchange is one ``all_reduce(BAND)`` of a single int64. The word holds a
32-bit record ``x = (identity << 1) | hit`` in its low half and ``~x`` in its
high half. After a bitwise AND over ranks, a bit that was 1 everywhere is 1 in
the low half, a bit that was 0 everywhere is 1 in the high half, and a bit on
which ranks disagree is 0 in both. So a single-element collective gives the AND
of the hits and detects any disagreement about which frame is being guarded.
Gloo's single-element allreduce is its cheapest collective (measured here:
about 2-4x cheaper than 3 to 5 elements). The AND composes, so the shared-memory
transport combines a host's records the same way before its leader goes to
the network (``_shm.py``). Only when something is off (a frame mismatch, or
some ranks hit while others miss) do the ranks run a second, richer collective
to learn who reported what; they all take that branch together because they
all see the same reduced word.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
import torch.distributed as dist

from . import _events, _hook
from ._errors import CollectiveTimeoutError, RankDivergenceError
from ._group import all_gather_objects
from ._hook import _C
from ._log import get_logger
from ._status import StatusBoard, describe_missing

log = get_logger("collective")

_M32 = 0xFFFFFFFF
_M64 = 0xFFFFFFFFFFFFFFFF
_IDENT_BITS = 31
_LATENCY_SAMPLES = 8192


def pack(hit: bool, ident: int) -> int:
    """The int64 a rank contributes: (x, ~x) halves, as a signed value for torch."""
    x = (((ident & ((1 << _IDENT_BITS) - 1)) << 1) | int(bool(hit))) & _M32
    word = ((~x & _M32) << 32) | x
    return word - (1 << 64) if word >= (1 << 63) else word


def unpack(word: int) -> tuple[bool, bool, bool]:
    """(all_hit, any_hit, identities_agree) from the AND-reduced word."""
    w = word & _M64
    low, high = w & _M32, w >> 32
    disagree = ~(low | high) & _M32
    return bool(low & 1), not (high & 1), (disagree & ~1) == 0


class Outcome:
    """An exchange where some ranks hit and others missed, kept for the policy layer."""

    __slots__ = ("hit", "ident", "seq")

    def __init__(self, seq: int, ident: int, hit: bool) -> None:
        self.seq = seq
        self.ident = ident
        self.hit = hit


class BandAllreduce:
    """A bounded ``all_reduce(BAND)`` of one int64 on a gloo group.

    The bound is the group's own timeout (created with the configured one), so
    the hot path is a plain ``wait()``: waiting in slices to log progress cost
    about 35 us per exchange here. Progress lines come from the status board's
    thread instead, which watches ``waiting_since``.
    """

    def __init__(self, group: Any) -> None:
        self.group = group
        self._buf = torch.zeros(1, dtype=torch.int64)
        self._arr = self._buf.numpy()  # numpy item access is ~20x cheaper than tensor indexing
        self._opts = dist.AllreduceOptions()
        self._opts.reduceOp = dist.ReduceOp(dist.ReduceOp.BAND)
        self.waiting_since: float | None = None

    def __call__(self, word: int) -> tuple[int, str | None]:
        """(reduced word, None) or (0, reason) where reason is 'timeout' or a peer failure."""
        self._arr[0] = word
        self.waiting_since = time.monotonic()
        try:
            self.group.allreduce([self._buf], self._opts).wait()
        except RuntimeError as e:
            return 0, "timeout" if "timed out" in str(e).lower() else _short(str(e))
        finally:
            self.waiting_since = None
        return int(self._arr[0]), None


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
        channel: str,
        timeout: float,
        wait_log_interval: float,
        stall_warning: float,
        board: StatusBoard | None,
        describe: Callable[[int], str],
    ) -> None:
        self.ranks = list(ranks)  # the group's global ranks, ascending
        self.rank = dist.get_rank()
        self.world_size = len(self.ranks)
        self.channel = channel  # the group's name in logs, stats and the status board
        self.group = group  # the group's own CPU gloo group: rare, richer collectives
        self.timeout = timeout
        self.board = board
        self.describe = describe
        self.divergences = 0
        self.mixed = 0
        self.last_mixed: Outcome | None = None
        self.broken: BaseException | None = None
        self.wait_log_interval = wait_log_interval
        self.stall_warning = stall_warning
        self.waiters: list[BandAllreduce] = []
        self._last_wait_log = 0.0
        self._stall_warned_seq = -1

    def position(self) -> tuple[int, int]:
        """(last exchange number, its frame identity) on this rank."""
        raise NotImplementedError

    def last_epoch(self) -> int:
        """Process-wide order of this channel's last exchange among all channels' exchanges."""
        return 0

    def waited(self) -> float | None:
        """Seconds the exchange in progress has waited so far (None: not waiting)."""
        now = time.monotonic()
        waits = [now - w.waiting_since for w in self.waiters if w.waiting_since is not None]
        return max(waits) if waits else None

    def make_hook(self) -> _C.GuardHook:
        """The C++ guard hook driving this transport."""
        raise NotImplementedError

    def latencies(self) -> list[int]:
        """Recent exchange latencies in nanoseconds."""
        raise NotImplementedError

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
        if waited >= self.stall_warning and self._stall_warned_seq != seq:
            self._stall_warned_seq = seq
            self.warn_stall(seq, ident, waited)

    def warn_stall(self, seq: int, ident: int, waited: float) -> None:
        """One WARNING naming the frame, the exchange, where the missing ranks are, the fix."""
        if self.board is None:
            return
        if not self.board.reads_board:
            log.warning(
                "stalled at guard exchange #%d for %s (group %s): waited %.0fs; rank %d's log "
                "says where the missing ranks are (in a job this large only some ranks read "
                "every rank's status)",
                seq,
                self.describe(ident),
                self.channel,
                waited,
                self.board.reader_for(self.rank),
            )
            return
        board = {r: st for r, st in self.board.snapshot().items() if r in self.ranks}
        missing, lines = describe_missing(board, self.channel, seq, self.board.stale_after)
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
                self.channel,
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
            self.channel,
            waited,
            alive_elsewhere,
            where,
            self.timeout,
        )
        _events.emit(
            "stall_warning",
            seq=seq,
            rank=self.rank,
            group=self.channel,
            frame=self.describe(ident),
            waited_s=round(waited, 3),
            missing=alive_elsewhere,
        )

    def decide(self, seq: int, ident: int, hit: bool, word: int) -> bool:
        """The verdict for a reduced word; raises RankDivergenceError on a frame mismatch."""
        all_hit, any_hit, agree = unpack(word)
        if not agree:
            self.divergences += 1
            err = self.divergence_error(seq, ident, hit)
            _events.emit(
                "divergence", kind="frame_mismatch", seq=seq, rank=self.rank, frames=err.ranks
            )
            self.broken = err
            raise err
        if any_hit and not all_hit:
            self.mixed += 1
            self.last_mixed = Outcome(seq, ident, hit)
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
                "grad": _hook.identity_grad(ident),
                "hit": hit,
            }
        )
        ranks = dict(zip(self.ranks, records, strict=True))
        frames = {int(rec["ident"]) for rec in records}
        grads = {rec["grad"] for rec in records if rec["grad"] is not None}

        def mode(rec: dict[str, Any]) -> str:
            if rec["grad"] is None:
                return ""
            return ", grad enabled" if rec["grad"] else ", grad disabled"

        lines = [
            f"  rank {r}: guard exchange #{rec['seq']} for {rec['frame']} "
            f"({'hit' if rec['hit'] else 'miss'}{mode(rec)})"
            for r, rec in ranks.items()
        ]
        cause = (
            "Some ranks run it with grad disabled and others with grad enabled: typically "
            "evaluation (torch.no_grad(), model.eval()) on some ranks only while the others train. "
            if len(grads) > 1
            else "The ranks called compiled code in a different order or a different number of "
            "times (an SPMD violation). "
        )
        msg = (
            f"ranks of group {self.channel} are guarding different frames at the same exchange "
            f"({len(frames)} distinct frames):\n" + "\n".join(lines) + "\n" + cause + "Fix: run "
            "compiled code that only some ranks run (rank-0 evaluation, sampling, logging) inside "
            "`dynamo_dist.local()` (a context manager or a decorator); compile code that different "
            "groups of ranks run (pipeline stages) with `group=` those ranks; otherwise make every "
            "rank call compiled functions in the same order."
        )
        return RankDivergenceError(msg, ranks)

    def timeout_error(
        self, seq: int, ident: int, waited: float, cause: str | None, suspects: Iterable[int] = ()
    ) -> CollectiveTimeoutError:
        reads = self.board is not None and self.board.reads_board
        board = (
            {r: st for r, st in self.board.snapshot().items() if r in self.ranks}
            if self.board is not None and reads
            else {}
        )
        stale = self.board.stale_after if self.board is not None else 10.0
        missing, lines = (
            describe_missing(board, self.channel, seq, stale) if board else (list(suspects), [])
        )
        missing = [r for r in missing if r != self.rank]
        what = f"guard exchange #{seq} of group {self.channel} for {self.describe(ident)}"
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
                f" Rank {self.board.reader_for(self.rank)}'s error lists where each rank was "
                "(in a job this large only some ranks read every rank's status)."
            )
        body = "\n".join(f"  {line}" for line in lines)
        err = CollectiveTimeoutError(
            f"{head}\n{body}\n{hint}" if body else f"{head}\n{hint}",
            missing=missing,
            last_seen=board,
        )
        self.broken = err
        _events.emit(
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
        self.latencies_ns: deque[int] = deque(maxlen=_LATENCY_SAMPLES)
        self.epoch = 0

    def exchange(self, hit: bool, ident: int) -> bool:
        """Agree on one guard result; returns True only if every rank hit."""
        if self.broken is not None:
            raise self.broken
        self.seq += 1
        seq = self.seq
        self.last_ident = ident
        self.epoch = _next_epoch()
        t0 = time.perf_counter_ns()
        word, failure = self._allreduce(pack(hit, ident))
        if failure is not None:
            raise self.timeout_error(seq, ident, (time.perf_counter_ns() - t0) / 1e9, failure)
        self.latencies_ns.append(time.perf_counter_ns() - t0)
        return self.decide(seq, ident, hit, word)

    def make_hook(self) -> _C.GuardHook:
        return _C.GuardHook(self.exchange)

    def position(self) -> tuple[int, int]:
        return self.seq, self.last_ident

    def last_epoch(self) -> int:
        return self.epoch

    def latencies(self) -> list[int]:
        return list(self.latencies_ns)


_epoch = 0


def _next_epoch() -> int:
    """Order of gloo exchanges across channels (the C++ hook counts its own)."""
    global _epoch
    _epoch += 1
    return _epoch


def _short(gloo_error: str) -> str:
    text = gloo_error.splitlines()[0] if gloo_error else ""
    if "closed by peer" in text.lower() or "connection reset" in text.lower():
        return "a peer process exited or crashed"
    return text[:200]


def percentiles(samples_ns: Iterable[int]) -> dict[str, float]:
    xs = sorted(samples_ns)
    if not xs:
        return {"p50_us": 0.0, "p99_us": 0.0}

    def pick(q: float) -> float:
        return xs[min(len(xs) - 1, int(q * len(xs)))] / 1e3

    return {"p50_us": round(pick(0.50), 2), "p99_us": round(pick(0.99), 2)}
