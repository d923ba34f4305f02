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

import contextlib
import os
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from datetime import timedelta
from typing import Any, Protocol

import torch
import torch.distributed as dist

from dynamo_dist._config import EMULATE_HOP_DELAY_ENV
from dynamo_dist._errors import CollectiveTimeoutError, ConfigError, RankDivergenceError
from dynamo_dist._log import get_logger
from dynamo_dist.dist.group import all_gather_objects
from dynamo_dist.dynamo import events
from dynamo_dist.dynamo import hook as dynamo_hook
from dynamo_dist.dynamo.hook import _C
from dynamo_dist.exchange.status import StatusBoard, board_reader_stride, describe_missing

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


class LeaderExchange(Protocol):
    """The host leaders' step: AND one word over the leaders, bounded by the timeout.

    ``__call__`` returns (reduced word, None), or (0, reason) where reason is
    ``'timeout'`` or a short text naming a peer's failure. ``waiting_since`` is
    what the status thread reads to log progress (None: not waiting).
    """

    waiting_since: float | None

    def __call__(self, word: int) -> tuple[int, str | None]: ...


# Recursive doubling's failure notice: a word whose low and high halves share a bit,
# which no AND of packed records can be (each record's halves are x and ~x). Bit 31
# of each half marks it; bit 30 says the suspect timed out (clear: it died); the
# low 30 bits are the suspect's index in the leaders' group.
_POISON = 1 << 31
_POISON_TIMEOUT = 1 << 30
_SUSPECT = (1 << 30) - 1
# The emulated delay's last stretch is spun: a sleep overshoots by 50-100 us.
_SPIN_NS = 50_000


def hold_until(t_ns: int) -> None:
    """Return once ``time.perf_counter_ns() >= t_ns``: sleep most of the way, spin the rest."""
    rest = t_ns - time.perf_counter_ns()
    if rest > _SPIN_NS:
        time.sleep((rest - _SPIN_NS) / 1e9)
    while time.perf_counter_ns() < t_ns:
        pass


def emulated_hop_delay_ns() -> int:
    """The test-only per-hop delay (``_DYNAMO_DIST_EMULATE_HOP_DELAY_US``), in ns; 0 unset.

    Emulation only (benchmarks/scale_emulation.py): this kernel has no netem, so a
    receiver holds each message for this long after it arrived over loopback, as a
    relay holding it for the one-way latency would: the delay adds to the hop's own
    cost. (Holding it until its send time plus the delay would not: the hop's
    software cost would hide in the delay.) Not a Config key: no job sets it.
    """
    raw = os.environ.get(EMULATE_HOP_DELAY_ENV, "")
    if raw == "":
        return 0
    try:
        us = float(raw)
    except ValueError:
        us = -1.0
    if not us >= 0:
        raise ConfigError(
            f"environment variable {EMULATE_HOP_DELAY_ENV} = {raw!r} is invalid; allowed: "
            "microseconds >= 0 (emulation only)"
        )
    return int(us * 1000)


def doubling_plan(n: int, me: int) -> tuple[int, int, list[int]]:
    """Leader ``me``'s part in recursive doubling over ``n``: (fold_to, fold_from, partners).

    P is the largest power of two <= n. A leader i >= P folds its word into
    ``fold_to`` = i - P and receives the result from it at the end; a leader i < P
    receives ``fold_from`` = i + P's word first (-1: none) and sends it the result,
    and in between swaps words with ``partners`` (i ^ 1, i ^ 2, ..., one per round).
    """
    core = 1 << (n.bit_length() - 1)
    if me >= core:
        return me - core, -1, []
    fold_from = me + core if me + core < n else -1
    return -1, fold_from, [me ^ (1 << k) for k in range(core.bit_length() - 1)]


class DoublingExchange:
    """Recursive doubling among the host leaders: AND of one int64 in ceil(log2 H) rounds.

    Gloo's allreduce is a ring, 2(H-1) sequential hops for one word; here round k
    pairs leader i with i ^ 2**k and both keep the AND of their words, so after
    log2(P) rounds every leader of the power-of-two core P holds the AND over all.
    With H not a power of two, leaders i >= P first fold their word into i - P and
    get the result back at the end (two more hops). Only point-to-point send/recv
    on the leaders' gloo group: each round posts its recv before its send, so two
    partners never wait on each other's send.

    The whole exchange is bounded by ``timeout`` (each wait gets what remains of
    it; gloo's recv honours the group's timeout too, but per recv, and the rounds
    would add up). A leader whose exchange fails (its partner died, or timed out)
    sends a failure notice to the partners still waiting on it, which pass it on,
    so every leader learns of the failure within a few hops instead of each
    waiting out the timeout; the notice names the suspect leader.

    ``ranks`` are the leaders' global ranks, for the error text. The record
    format is AND-composable, so this gives exactly ``BandAllreduce``'s words.
    """

    def __init__(
        self,
        group: Any,
        timeout: float,
        ranks: Sequence[int] | None = None,
    ) -> None:
        self.group = group
        self.timeout = timeout
        n, me = group.size(), group.rank()
        self.ranks = list(ranks) if ranks is not None else list(range(n))
        self._fold_to, self._fold_from, self._partners = doubling_plan(n, me)
        self._delay_ns = emulated_hop_delay_ns()
        if self._delay_ns:
            log.warning(
                "emulating a %d us delay per cross-host hop (%s): for benchmarks only",
                self._delay_ns // 1000,
                EMULATE_HOP_DELAY_ENV,
            )
        self._sbuf = torch.zeros(1, dtype=torch.int64)
        self._rbuf = torch.zeros(1, dtype=torch.int64)
        self._send_list = [self._sbuf]
        self._recv_list = [self._rbuf]
        self._s = self._sbuf.numpy()
        self._r = self._rbuf.numpy()
        self._tag = 0
        self.waiting_since: float | None = None

    def __call__(self, word: int) -> tuple[int, str | None]:
        """(AND of every leader's word, None) or (0, reason): 'timeout' or a peer failure."""
        start = time.monotonic()
        self.waiting_since = start
        deadline = start + self.timeout
        peer = -1
        try:
            if self._fold_to >= 0:
                peer = self._fold_to
                return self._swap(word, peer, deadline), None  # the result for the word
            if self._fold_from >= 0:
                peer = self._fold_from
                word &= self._take(self.group.recv(self._recv_list, peer, self._tag), deadline)
            for peer in self._partners:
                word &= self._swap(word, peer, deadline)
            if self._fold_from >= 0:
                peer = self._fold_from
                self._post_send(word, peer).wait(self._left(deadline))
            return word, None
        except _Poisoned as p:
            self._pass_on(p.code, peer, deadline)
            return 0, self._describe(p.code)
        except RuntimeError as e:
            text = str(e)
            timed_out = "timed out" in text.lower()
            code = _POISON | (_POISON_TIMEOUT if timed_out else 0) | peer
            self._pass_on(code, peer, deadline)
            if timed_out:
                return 0, "timeout"
            short = _short(text)
            if short == _PEER_EXITED:
                # A leader that timed out on its own partner exits too: not proof of a crash.
                return 0, (
                    f"host leader rank {self.ranks[peer]} exited, crashed, or gave up on "
                    "the exchange (its own timeout)"
                )
            return 0, short
        finally:
            self.waiting_since = None

    @staticmethod
    def _left(deadline: float) -> timedelta:
        return timedelta(seconds=max(deadline - time.monotonic(), 0.001))

    def _post_send(self, word: int, peer: int) -> Any:
        self._s[0] = word
        return self.group.send(self._send_list, peer, self._tag)

    def _swap(self, word: int, peer: int, deadline: float) -> int:
        """Send ``word`` to ``peer`` and return its word: recv posted first, waited first.

        A gloo send completes only once the peer has posted the matching recv, so
        the recv is waited for first: a peer that gave up sends a failure notice
        instead of posting its recv, and waiting on the send would miss it.
        """
        recv = self.group.recv(self._recv_list, peer, self._tag)
        send = self._post_send(word, peer)
        got = self._take(recv, deadline)
        send.wait(self._left(deadline))  # the peer's word came after its recv was posted
        return got

    def _take(self, work: Any, deadline: float) -> int:
        work.wait(self._left(deadline))
        got = int(self._r[0])
        if self._delay_ns:
            hold_until(time.perf_counter_ns() + self._delay_ns)
        if (got >> 32) & got & _POISON:
            raise _Poisoned(got & _M32)
        return got

    def _pass_on(self, code: int, failed_peer: int, deadline: float) -> None:
        """Send the failure notice to every partner that may still wait on this leader.

        A send completes once its partner has posted the matching recv, i.e. once it
        reaches that round (or it fails on its own and closes the connection), so
        each is waited for until the exchange's deadline: leaving earlier, and
        exiting, would turn the notice into a bare closed connection.
        """
        if self._fold_to >= 0:
            return  # only this leader's fold partner, the failed one, ever waits on it
        if failed_peer in self._partners:
            waiting = self._partners[self._partners.index(failed_peer) + 1 :]
        else:
            waiting = list(self._partners)  # the fold partner failed, before or after the rounds
        targets = [p for p in [*waiting, self._fold_from] if p >= 0 and p != failed_peer]
        if not targets:
            return
        word = (code << 32) | code
        word = word - (1 << 64) if word >= (1 << 63) else word
        self._s[0] = word
        works = []
        for p in targets:
            with contextlib.suppress(RuntimeError):  # a dead partner: nothing to tell
                works.append(self.group.send(self._send_list, p, self._tag))
        # Past the deadline (this leader timed out) the notice still gets a moment: a
        # leader that exits at once turns it into a bare closed connection.
        until = max(deadline, time.monotonic() + _NOTICE_GRACE_S)
        for w in works:
            with contextlib.suppress(RuntimeError):
                w.wait(self._left(until))

    def _describe(self, code: int) -> str:
        suspect = self.ranks[code & _SUSPECT] if (code & _SUSPECT) < len(self.ranks) else "?"
        if code & _POISON_TIMEOUT:
            return (
                f"another host leader timed out waiting for host leader rank {suspect} "
                "(or for a leader that one waits on)"
            )
        return f"host leader rank {suspect} exited or crashed (reported by another host leader)"


class _Poisoned(Exception):
    """A failure notice arrived in place of a partner's word."""

    def __init__(self, code: int) -> None:
        super().__init__(code)
        self.code = code


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
                self.channel,
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
                self.channel,
                waited,
                self.board_reader(),
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
        events.emit(
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
            events.emit(
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
                "grad": dynamo_hook.identity_grad(ident),
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
        reads = self.board is not None and self.reads_board()
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


_PEER_EXITED = "a peer process exited or crashed"
# Seconds a leader that failed still waits for its failure notices to be taken.
_NOTICE_GRACE_S = 1.0


def _short(gloo_error: str) -> str:
    text = gloo_error.splitlines()[0] if gloo_error else ""
    if "closed by peer" in text.lower() or "connection reset" in text.lower():
        return _PEER_EXITED
    return text[:200]


def percentiles(samples_ns: Iterable[int]) -> dict[str, float]:
    xs = sorted(samples_ns)
    if not xs:
        return {"p50_us": 0.0, "p99_us": 0.0}

    def pick(q: float) -> float:
        return xs[min(len(xs) - 1, int(q * len(xs)))] / 1e3

    return {"p50_us": round(pick(0.50), 2), "p99_us": round(pick(0.99), 2)}
