"""AND of one int64 over a gloo group, bounded by the timeout: the exchange's network step.

Two ways, giving the same words (the record format composes under AND,
``exchange/record.py``): gloo's own single-element allreduce (:class:`BandAllreduce`,
a ring), and recursive doubling among the host leaders (:class:`DoublingExchange`,
ceil(log2 H) rounds of point-to-point swaps, with failure notices passed on so every
leader learns of a failure within a few hops). Each returns (reduced word, None) or
(0, reason); the transports (``exchange/collective.py``, ``exchange/shm.py``) turn
that into a verdict or an error.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Sequence
from datetime import timedelta
from typing import Any, Protocol

import torch
import torch.distributed as dist

from dynamo_dist._log import get_logger
from dynamo_dist.exchange.record import M32, POISON, POISON_TIMEOUT, SUSPECT

log = get_logger("collective")


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

    @property
    def waiting_since(self) -> float | None: ...

    def __call__(self, word: int) -> tuple[int, str | None]: ...


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
        self._sbuf = torch.zeros(1, dtype=torch.int64)
        self._rbuf = torch.zeros(1, dtype=torch.int64)
        self._send_list = [self._sbuf]
        self._recv_list = [self._rbuf]
        self._s = self._sbuf.numpy()
        self._r = self._rbuf.numpy()
        self._tag = 0
        self.waiting_since: float | None = None
        # Failure notices sent from the main thread while the waiter runs an exchange.
        self._notice_list = [torch.zeros(1, dtype=torch.int64)]
        self._waiter: _Waiter | None = None

    def __call__(self, word: int) -> tuple[int, str | None]:
        """(AND of every leader's word, None) or (0, reason): 'timeout' or a peer failure.

        gloo's waits block in C++, where Python cannot run signal handlers: on the main
        thread Ctrl-C would take effect only when the exchange ends, at the timeout if a
        partner hangs. So there the exchange runs on a waiter thread, while the main thread
        blocks on a lock, which Python interrupts for signals. An interrupted leader sends
        its failure notice to every partner, so they fail at once naming it, and the
        exception propagates. (A wait cannot be cut into slices instead: a gloo recv that
        times out fails the whole group.) The handoff costs two thread wake-ups per
        exchange; elsewhere than on the main thread there is none.
        """
        if threading.current_thread() is not threading.main_thread():
            return self._exchange(word)
        if self._waiter is None:
            self._waiter = _Waiter(self._exchange)
        try:
            return self._waiter.run(word)
        except BaseException:
            self._waiter = None  # it is still in the exchange; the group is failed
            with contextlib.suppress(BaseException):
                self._tell_all(POISON | self.group.rank())
            raise

    def close(self) -> None:
        """End the waiter thread (the group is being closed)."""
        if self._waiter is not None:
            self._waiter.stop()
            self._waiter = None

    def _tell_all(self, code: int) -> None:
        """Send failure notice ``code`` to every partner, fold partners included, from the
        notice buffer: the waiter may still use the others."""
        targets = sorted({*self._partners, self._fold_from, self._fold_to} - {-1})
        self._send_notice(code, targets, time.monotonic(), self._notice_list)

    def _exchange(self, word: int) -> tuple[int, str | None]:
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
            return 0, describe_notice(p.code, self.ranks)
        except RuntimeError as e:
            text = str(e)
            timed_out = "timed out" in text.lower()
            code = POISON | (POISON_TIMEOUT if timed_out else 0) | peer
            self._pass_on(code, peer, deadline)
            if timed_out:
                return 0, "timeout"
            short = _short(text)
            if short == _PEER_EXITED:
                return 0, peer_exited(self.ranks[peer])
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
        if (got >> 32) & got & POISON:
            raise _Poisoned(got & M32)
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
        self._send_notice(code, targets, deadline, self._send_list)

    def _send_notice(
        self, code: int, targets: list[int], deadline: float, buffer: list[torch.Tensor]
    ) -> None:
        if not targets:
            return
        word = (code << 32) | code
        buffer[0][0] = word - (1 << 64) if word >= (1 << 63) else word
        works = []
        for p in targets:
            with contextlib.suppress(RuntimeError):  # a dead partner: nothing to tell
                works.append(self.group.send(buffer, p, self._tag))
        # Past the deadline (this leader timed out) the notice still gets a moment: a
        # leader that exits at once turns it into a bare closed connection.
        until = max(deadline, time.monotonic() + _NOTICE_GRACE_S)
        for w in works:
            with contextlib.suppress(RuntimeError):
                w.wait(self._left(until))


class _Waiter:
    """A thread that runs one exchange at a time for the main thread.

    Two plain locks hand the word over and the result back: the main thread's
    ``acquire`` is where Python runs signal handlers (KeyboardInterrupt ends it there).
    """

    def __init__(self, exchange: Callable[[int], tuple[int, str | None]]) -> None:
        self._exchange = exchange
        self._go = threading.Lock()
        self._done = threading.Lock()
        self._go.acquire()
        self._done.acquire()
        self._word = 0
        self._result: tuple[int, str | None] | BaseException = (0, None)
        self._stopping = False
        threading.Thread(target=self._loop, name="dynamo_dist-doubling", daemon=True).start()

    def run(self, word: int) -> tuple[int, str | None]:
        self._word = word
        self._go.release()
        self._done.acquire()
        if isinstance(self._result, BaseException):
            raise self._result
        return self._result

    def stop(self) -> None:
        self._stopping = True
        with contextlib.suppress(RuntimeError):  # it is in an exchange: it ends with it
            self._go.release()

    def _loop(self) -> None:
        while True:
            self._go.acquire()
            if self._stopping:
                return
            try:
                self._result = self._exchange(self._word)
            except BaseException as e:  # raised to the main thread, not lost here
                self._result = e
            self._done.release()


def describe_notice(code: int, ranks: Sequence[int]) -> str:
    """The text of a failure notice's code (``exchange/record.py``: POISON, SUSPECT)."""
    suspect = ranks[code & SUSPECT] if (code & SUSPECT) < len(ranks) else "?"
    if code & POISON_TIMEOUT:
        return (
            f"another host leader timed out waiting for host leader rank {suspect} "
            "(or for a leader that one waits on)"
        )
    return f"host leader rank {suspect} exited or crashed (reported by another host leader)"


def peer_exited(rank: object) -> str:
    """A partner's connection closed. A leader that timed out on its own partner exits
    too, so this is not proof of a crash."""
    return f"host leader rank {rank} exited, crashed, or gave up on the exchange (its own timeout)"


class _Poisoned(Exception):
    """A failure notice arrived in place of a partner's word."""

    def __init__(self, code: int) -> None:
        super().__init__(code)
        self.code = code


_PEER_EXITED = "a peer process exited or crashed"
# Seconds a leader that failed still waits for its failure notices to be taken.
_NOTICE_GRACE_S = 1.0


def _short(gloo_error: str) -> str:
    text = gloo_error.splitlines()[0] if gloo_error else ""
    if "closed by peer" in text.lower() or "connection reset" in text.lower():
        return _PEER_EXITED
    return text[:200]
