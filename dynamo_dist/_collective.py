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
from collections.abc import Callable, Iterable
from datetime import timedelta
from typing import Any, cast

import torch
import torch.distributed as dist

from . import _events
from ._errors import CollectiveTimeoutError, RankDivergenceError
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

    def __init__(self, group: dist.ProcessGroup) -> None:
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
        group: dist.ProcessGroup,
        timeout: float,
        wait_log_interval: float,
        board: StatusBoard | None,
        describe: Callable[[int], str],
    ) -> None:
        self.rank = dist.get_rank()
        self.world_size = dist.get_world_size()
        self.group = group  # the full CPU gloo group: rare, richer collectives
        self.timeout = timeout
        self.board = board
        self.describe = describe
        self.divergences = 0
        self.mixed = 0
        self.last_mixed: Outcome | None = None
        self.broken: BaseException | None = None
        self.wait_log_interval = wait_log_interval
        self.waiters: list[BandAllreduce] = []
        self._last_wait_log = 0.0

    def position(self) -> tuple[int, int]:
        """(last exchange number, its frame identity) on this rank."""
        raise NotImplementedError

    def make_hook(self) -> _C.GuardHook:
        """The C++ guard hook driving this transport."""
        raise NotImplementedError

    def latencies(self) -> list[int]:
        """Recent exchange latencies in nanoseconds."""
        raise NotImplementedError

    def watch(self) -> None:
        """Called periodically off the hot path: log while an exchange waits on the network."""
        now = time.monotonic()
        for w in self.waiters:
            since = w.waiting_since
            if since is None or now - since < self.wait_log_interval:
                continue
            if now - self._last_wait_log >= self.wait_log_interval:
                self._last_wait_log = now
                seq, ident = self.position()
                self.log_wait(seq, ident, now - since)

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
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj, group=self.group)
        return out

    def divergence_error(self, seq: int, ident: int, hit: bool) -> RankDivergenceError:
        records = self.gather_objects(
            {"seq": seq, "ident": ident, "frame": self.describe(ident), "hit": hit}
        )
        ranks = dict(enumerate(records))
        frames = {int(rec["ident"]) for rec in records}
        lines = [
            f"  rank {r}: guard exchange #{rec['seq']} for {rec['frame']} "
            f"({'hit' if rec['hit'] else 'miss'})"
            for r, rec in ranks.items()
        ]
        msg = (
            f"ranks are guarding different frames at the same exchange "
            f"({len(frames)} distinct frames):\n" + "\n".join(lines) + "\n"
            "The ranks called compiled code in a different order or a different number of times "
            "(an SPMD violation). Make every rank call compiled functions in the same order, or "
            "run this code outside dynamo_dist (policy='off')."
        )
        return RankDivergenceError(msg, ranks)

    def timeout_error(
        self, seq: int, ident: int, waited: float, cause: str | None, suspects: Iterable[int] = ()
    ) -> CollectiveTimeoutError:
        board = self.board.snapshot() if self.board is not None else {}
        stale = max(10.0, 5 * (self.board.interval if self.board else 2.0))
        missing, lines = describe_missing(board, seq, stale) if board else (list(suspects), [])
        missing = [r for r in missing if r != self.rank]
        what = f"guard exchange #{seq} for {self.describe(ident)}"
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
            "times than this rank (an SPMD violation), never reaches this exchange. Check that "
            "rank's log; raise `timeout` if it was only slow (e.g. rank 0 writing a checkpoint)."
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

    def __init__(
        self,
        *,
        group: dist.ProcessGroup,
        timeout: float,
        wait_log_interval: float,
        board: StatusBoard | None,
        describe: Callable[[int], str],
    ) -> None:
        super().__init__(
            group=group,
            timeout=timeout,
            wait_log_interval=wait_log_interval,
            board=board,
            describe=describe,
        )
        self._allreduce = BandAllreduce(group)
        self.waiters.append(self._allreduce)
        self.seq = 0
        self.last_ident = 0
        self.latencies_ns: deque[int] = deque(maxlen=_LATENCY_SAMPLES)

    def exchange(self, hit: bool, ident: int) -> bool:
        """Agree on one guard result; returns True only if every rank hit."""
        if self.broken is not None:
            raise self.broken
        self.seq += 1
        seq = self.seq
        self.last_ident = ident
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

    def latencies(self) -> list[int]:
        return list(self.latencies_ns)


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


def new_gloo_group(timeout: float, ranks: list[int] | None = None) -> dist.ProcessGroup:
    """A CPU-only gloo group. Collective: every rank must call it, in the same order."""
    group = dist.new_group(ranks=ranks, backend="cpu:gloo", timeout=timedelta(seconds=timeout))
    return cast(dist.ProcessGroup, group)
