"""The host leaders' native rounds (``_C.LeaderRounds``, csrc/leader_rounds.cpp).

Each emulated host is one ``LeaderRounds`` on a thread of this process, joined to
the others by real TCP connections on 127.0.0.1; the exchange releases the GIL,
so the hosts run side by side. The round plan is k-ary dissemination, computed
here (the production plan is Python's, elsewhere). Verdicts are checked against
the AND computed here; failures (a peer that closes, one that hangs, a frame of
the wrong exchange, a forwarded notice, Ctrl-C on the main thread) against the
status, peer and notice code each leader reports.
"""

from __future__ import annotations

import os
import random
import signal
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pytest

from dynamo_dist import _C
from dynamo_dist.exchange import record as R

M64 = (1 << 64) - 1
OK, TIMEOUT, CLOSED, POISONED, MALFORMED = range(5)
Plan = list[tuple[list[int], list[int]]]
# An ordinary record: -1 would not do (its halves share bit 31: a failure notice).
W = R.pack(True, 5)


def dissemination(hosts: int, k: int, me: int) -> Plan:
    """k-ary dissemination: in round r (distance d = k**r) send to me + j*d, receive from
    me - j*d, j = 1..k-1 with j*d < hosts."""
    rounds: Plan = []
    d = 1
    while d < hosts:
        steps = [j * d for j in range(1, k) if j * d < hosts]
        send = sorted({(me + s) % hosts for s in steps} - {me})
        recv = sorted({(me - s) % hosts for s in steps} - {me})
        rounds.append((send, recv))
        d *= k
    return rounds


def signed(w: int) -> int:
    w &= M64
    return w - (1 << 64) if w >> 63 else w


def notice(code: int) -> int:
    return signed((code << 32) | code)


def frame(seq: int, word: int) -> bytes:
    return struct.pack("<Qq", seq, signed(word))


@contextmanager
def mesh(hosts: int, plans: list[Plan]) -> Iterator[list[dict[int, socket.socket]]]:
    """A TCP connection for every pair of hosts a plan joins: socks[i][j] is i's end."""
    socks: list[dict[int, socket.socket]] = [{} for _ in range(hosts)]
    pairs = {
        (min(i, j), max(i, j))
        for i, plan in enumerate(plans)
        for send, recv in plan
        for j in send + recv
    }
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(len(pairs) + 1)
        try:
            for i, j in sorted(pairs):
                socks[i][j] = socket.create_connection(listener.getsockname())
                socks[j][i], _ = listener.accept()
            yield socks
        finally:
            for ends in socks:
                for s in ends.values():
                    s.close()


def leaders(hosts: int, k: int, socks: list[dict[int, socket.socket]], busy: float = 0.0) -> Any:
    return [
        _C.LeaderRounds(
            me,
            hosts,
            dissemination(hosts, k, me),
            {j: s.fileno() for j, s in socks[me].items()},
            busy,
        )
        for me in range(hosts)
    ]


def run_hosts(bodies: dict[int, Callable[[], Any]], timeout: float = 30) -> dict[int, Any]:
    """Each body on a thread of its own; their results (or exceptions) by host."""
    out: dict[int, Any] = {}

    def run(h: int, fn: Callable[[], Any]) -> None:
        try:
            out[h] = fn()
        except BaseException as e:  # reported to the test, KeyboardInterrupt too
            out[h] = e

    threads = [threading.Thread(target=run, args=hw, daemon=True) for hw in bodies.items()]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout)
        assert not t.is_alive(), "a host's thread did not finish"
    return out


def random_word(rng: random.Random) -> int:
    """A dense word that is no failure notice (bit 31 or bit 63 clear), or a record."""
    if rng.random() < 0.2:
        return R.pack(rng.random() < 0.8, rng.randrange(8))
    w = rng.getrandbits(64) | rng.getrandbits(64) | rng.getrandbits(64)
    if (w >> 63) & (w >> 31) & 1:
        w ^= 1 << rng.choice([31, 63])
    return signed(w)


# -- pure --------------------------------------------------------------------------------
def test_constants_match_record() -> None:
    assert _C.POISON == R.POISON
    assert _C.POISON_TIMEOUT == R.POISON_TIMEOUT
    assert _C.SUSPECT == R.SUSPECT


@pytest.mark.parametrize("hosts", range(1, 18))
@pytest.mark.parametrize("k", [2, 3, 8])
def test_dissemination_plan_reaches_every_host(hosts: int, k: int) -> None:
    plans = [dissemination(hosts, k, me) for me in range(hosts)]
    known = [{me} for me in range(hosts)]
    for r in range(max(map(len, plans))):
        before = [set(s) for s in known]
        for me, plan in enumerate(plans):
            _, recv = plan[r]
            for j in recv:
                assert me in plans[j][r][0], "every receive has its send"
                known[me] |= before[j]
    assert all(s == set(range(hosts)) for s in known)


def test_invalid_plans_are_refused() -> None:
    with mesh(2, [dissemination(2, 2, 0), dissemination(2, 2, 1)]) as socks:
        fds = {1: socks[0][1].fileno()}
        with pytest.raises(ValueError, match="no connection"):
            _C.LeaderRounds(0, 3, [([1], [2])], fds, 0.0)
        with pytest.raises(ValueError, match="names host"):
            _C.LeaderRounds(0, 2, [([0], [1])], fds, 0.0)
        with pytest.raises(ValueError, match="twice"):
            _C.LeaderRounds(0, 2, [([1, 1], [1])], fds, 0.0)
        with pytest.raises(ValueError):
            _C.LeaderRounds(2, 2, [], {}, 0.0)


# -- verdicts ----------------------------------------------------------------------------
@pytest.mark.timeout(60)
@pytest.mark.parametrize("hosts", [1, 2, 3, 4, 5, 9, 16])
@pytest.mark.parametrize("k", [2, 3, 8])
def test_every_host_gets_the_and(hosts: int, k: int) -> None:
    steps = 300 if hosts <= 5 else 120
    rng = random.Random(hosts * 100 + k)
    words = [[random_word(rng) for _ in range(hosts)] for _ in range(steps)]
    want = []
    for row in words:
        acc = M64
        for w in row:
            acc &= w
        want.append(signed(acc))
    plans = [dissemination(hosts, k, me) for me in range(hosts)]
    # Busy-polling only where every host has a core of its own (small meshes).
    busy = 50e-6 if hosts <= 2 else 0.0
    with mesh(hosts, plans) as socks:
        lr = leaders(hosts, k, socks, busy)

        def body(me: int) -> list[int]:
            got = []
            for step in range(steps):
                status, value, peer, _ = lr[me].exchange(words[step][me], 20.0)
                assert (status, peer) == (OK, -1)
                got.append(value)
            return got

        out = run_hosts({me: (lambda me=me: body(me)) for me in range(hosts)})
    for me in range(hosts):
        assert out[me] == want, f"host {me}: {out[me]!r:.200}"
        assert lr[me].seq == steps
        assert lr[me].num_rounds == len(plans[me])


@pytest.mark.timeout(30)
def test_unsigned_words_and_partial_frames() -> None:
    # Host 1 is raw Python: it dribbles its frame out a few bytes at a time.
    with mesh(2, [dissemination(2, 2, 0), dissemination(2, 2, 1)]) as socks:
        lr = _C.LeaderRounds(0, 2, dissemination(2, 2, 0), {1: socks[0][1].fileno()}, 0.0)
        raw = socks[1][0]

        def peer() -> int:
            data = frame(1, 0x7FFF_0000_FFFF_FFFF)
            for i in range(0, 16, 3):
                raw.sendall(data[i : i + 3])
                time.sleep(0.02)
            return len(raw.recv(16))

        out = run_hosts({0: lambda: lr.exchange(0xFFFF_FFFF_0000_FFFF, 10.0), 1: peer})
        assert out[0][:3] == (OK, 0x7FFF_0000_0000_FFFF, -1)
        assert out[1] == 16


# -- failures ----------------------------------------------------------------------------
def _suspect_named(res: tuple[int, int, int, float], suspect: int, timed_out: bool) -> bool:
    status, value, peer, _ = res
    if status == POISONED:
        code = R.POISON | (R.POISON_TIMEOUT if timed_out else 0) | suspect
        return value == code
    return peer == suspect and status == (TIMEOUT if timed_out else CLOSED)


@pytest.mark.timeout(60)
@pytest.mark.parametrize(("hosts", "k"), [(5, 2), (9, 3)])
def test_closed_peer_fails_every_leader_within_the_exchange(hosts: int, k: int) -> None:
    dead, before, timeout = 2, 20, 30.0
    plans = [dissemination(hosts, k, me) for me in range(hosts)]
    with mesh(hosts, plans) as socks:
        lr = leaders(hosts, k, socks)

        def body(me: int) -> Any:
            for _ in range(before):
                assert lr[me].exchange(W, timeout)[0] == OK
            if me == dead:
                time.sleep(0.3)  # the others are waiting by now
                for s in socks[me].values():
                    s.close()
                return None
            t0 = time.monotonic()
            res = lr[me].exchange(W, timeout)
            return res, time.monotonic() - t0, lr[me].exchange(W, timeout)

        out = run_hosts({me: (lambda me=me: body(me)) for me in range(hosts)}, timeout=60)
    direct = 0
    for me in range(hosts):
        if me == dead:
            continue
        assert isinstance(out[me], tuple), (me, out)
        res, waited, again = out[me]
        assert _suspect_named(res, dead, timed_out=False), (me, res)
        assert waited < timeout / 3, (me, res, waited)
        direct += res[0] == CLOSED
        # The first failure sticks: no I/O on streams whose framing is lost.
        assert again[:3] == res[:3]
    assert direct >= 1


@pytest.mark.timeout(30)
def test_hung_peer_times_out_at_the_deadline() -> None:
    # 4 hosts, k=2: hosts 2 and 3 wait for host 1 (which never sends) directly, host 0
    # only through host 2 (round 1). Host 0 waits longer, so it hears of the timeout
    # from host 2's notice rather than timing out on host 2 at the same moment.
    hosts, k, hung = 4, 2, 1
    timeouts = {0: 5.0, 2: 1.0, 3: 1.0}
    plans = [dissemination(hosts, k, me) for me in range(hosts)]
    with mesh(hosts, plans) as socks:
        lr = leaders(hosts, k, socks)

        def body(me: int) -> Any:
            t0 = time.monotonic()
            return lr[me].exchange(W, timeouts[me]), time.monotonic() - t0

        out = run_hosts({me: (lambda me=me: body(me)) for me in timeouts})
    for me in (2, 3):
        res, waited = out[me]
        assert res[:3] == (TIMEOUT, 0, hung), (me, res)
        assert 0.9 <= waited < 10, (me, res, waited)
    res, waited = out[0]
    assert res[:3] == (POISONED, R.POISON | R.POISON_TIMEOUT | hung, 2), res
    assert waited < 4.5, (res, waited)


@pytest.mark.timeout(30)
def test_frame_of_another_exchange_is_malformed() -> None:
    with mesh(2, [dissemination(2, 2, 0), dissemination(2, 2, 1)]) as socks:
        lr = _C.LeaderRounds(0, 2, dissemination(2, 2, 0), {1: socks[0][1].fileno()}, 0.0)
        socks[1][0].sendall(frame(7, -1))
        status, _, peer, waited = lr.exchange(W, 10.0)
        assert (status, peer) == (MALFORMED, 1)
        assert waited < 5
        assert lr.exchange(W, 10.0)[:3] == (MALFORMED, 0, 1)
        assert lr.seq == 2


@pytest.mark.timeout(30)
def test_notice_is_forwarded_unchanged() -> None:
    # Host 0 is raw Python and sends a notice in every round. Host 1 gets it directly
    # (round 0) and forwards it to host 3 (round 1), which hears it from host 1.
    hosts, k = 4, 2
    code = R.POISON | R.POISON_TIMEOUT | 3
    plans = [dissemination(hosts, k, me) for me in range(hosts)]
    with mesh(hosts, plans) as socks:
        lr = leaders(hosts, k, socks)
        for send, _ in plans[0]:
            for j in send:
                socks[0][j].sendall(frame(1, notice(code)))
        out = run_hosts({me: (lambda me=me: lr[me].exchange(W, 10.0)) for me in (1, 2, 3)})
    for me in (1, 2, 3):
        assert out[me][:2] == (POISONED, code), (me, out[me])
        assert out[me][3] < 5
    assert out[1][2] == 0
    assert out[3][2] == 1, "host 3 hears of it from host 1"


@pytest.mark.timeout(30)
def test_sigint_on_main_thread_interrupts_and_warns_peers() -> None:
    # 4 hosts, k=2: host 0 (this thread) waits for host 3, which hangs; host 2 waits
    # for host 0 in round 1, so it must get host 0's notice when Ctrl-C stops it.
    hosts, k, hung = 4, 2, 3
    plans = [dissemination(hosts, k, me) for me in range(hosts)]
    before = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with mesh(hosts, plans) as socks:
            lr = leaders(hosts, k, socks)
            results: dict[int, Any] = {}
            threads = [
                threading.Thread(
                    target=lambda me=me: results.__setitem__(me, lr[me].exchange(W, 3.0)),
                    daemon=True,
                )
                for me in (1, 2)
            ]
            for t in threads:
                t.start()
            timer = threading.Timer(0.3, os.kill, (os.getpid(), signal.SIGINT))
            timer.start()
            t0 = time.monotonic()
            with pytest.raises(KeyboardInterrupt):
                lr[0].exchange(W, 30.0)
            interrupted_after = time.monotonic() - t0
            timer.join()
            for t in threads:
                t.join(20)
            # The failure sticks: the next exchange reports this leader's own notice.
            again = lr[0].exchange(W, 30.0)
    finally:
        signal.signal(signal.SIGINT, before)
    assert interrupted_after < 5, interrupted_after
    assert results[2][:3] == (POISONED, R.POISON | 0, 0), results[2]
    assert results[2][3] < 2.5, results[2]
    assert _suspect_named(results[1], hung, timed_out=True), results[1]
    assert again[:3] == (POISONED, R.POISON | 0, 0)


@pytest.mark.timeout(30)
def test_exchange_is_not_reentrant_across_threads() -> None:
    with mesh(2, [dissemination(2, 2, 0), dissemination(2, 2, 1)]) as socks:
        lr = _C.LeaderRounds(0, 2, dissemination(2, 2, 0), {1: socks[0][1].fileno()}, 0.0)
        t = threading.Thread(target=lr.exchange, args=(W, 1.0), daemon=True)
        t.start()
        time.sleep(0.2)
        with pytest.raises(RuntimeError, match="in progress"):
            lr.exchange(W, 1.0)
        t.join(10)


# -- through the shared-memory exchange --------------------------------------------------
class NativeFailed(Exception):
    pass


@pytest.mark.timeout(60)
def test_shm_leader_runs_the_native_rounds() -> None:
    # One local rank per host: each host's ShmExchange leader takes its word to the
    # other hosts through LeaderRounds; the C++ hook decides the unanimous cases.
    hosts, k, steps = 3, 2, 60
    plans = [dissemination(hosts, k, me) for me in range(hosts)]
    failures: dict[int, tuple[int, int, int, float]] = {}
    mixed: dict[int, int] = {}

    def slow_path(status: int, seq: int, ident: int, hit: bool, word: int, *_: Any) -> bool:
        assert status == 0
        all_hit, any_hit, agree = R.unpack(word)
        assert agree and any_hit and not all_hit
        return False

    with mesh(hosts, plans) as socks:
        lr = leaders(hosts, k, socks)
        segs = []
        for me in range(hosts):
            name = f"/dynamo_dist.{os.getpid()}.rounds{me}"
            seg = _C.ShmExchange(name, True, 0, 1, True, 2.0, 30.0)
            seg.unlink()

            def on_failure(status: int, value: int, peer: int, waited: float, me: int = me) -> None:
                failures[me] = (status, value, peer, waited)
                raise NativeFailed(status, value, peer)

            seg.set_cross_host_native(lr[me], on_failure)
            segs.append(seg)

        def body(me: int) -> list[bool]:
            hook = _C.GuardHook(segs[me], slow_path)
            rng = random.Random(7)
            got = []
            for _ in range(steps):
                misses = {h for h in range(hosts) if rng.random() < 0.2}
                got.append(hook.exchange(me not in misses, 42))
                mixed[me] = mixed.get(me, 0) + (0 < len(misses) < hosts)
            if me == 1:
                return got  # leaves: host 1 never makes the last exchange
            try:
                hook.exchange(True, 42)
            except NativeFailed:
                return got
            raise AssertionError("the exchange without host 1 succeeded")

        out = run_hosts({me: (lambda me=me: body(me)) for me in range(hosts)})
    rng = random.Random(7)
    want = []
    for _ in range(steps):
        misses = {h for h in range(hosts) if rng.random() < 0.2}
        want.append(not misses)
    for me in range(hosts):
        assert out[me] == want, (me, out[me])
    assert mixed[0] > 0
    for me in (0, 2):
        status, value, peer, _ = failures[me]
        assert (status, peer) == (TIMEOUT, 1) or (status, value) == (
            POISONED,
            R.POISON | R.POISON_TIMEOUT | 1,
        ), failures[me]


_DYING_HOST = """
import os, struct, sys, time
seq, word = int(sys.argv[1]), int(sys.argv[2])
# Round 0's frames only: a leader that got them all may finish without this host's later
# rounds (the word reached it); the rest must fail within the exchange.
for fd in map(int, sys.argv[3].split(",")):
    os.write(fd, struct.pack("<Qq", seq, word))
time.sleep(0.3)  # the others are waiting for its later rounds by now
os._exit(3)
"""


@pytest.mark.multiproc
@pytest.mark.timeout(60)
def test_dead_process_fails_every_leader_within_the_exchange() -> None:
    # Host 2 is a process that sends its round-0 frames and exits: the kernel closes
    # its connections, its direct receivers see them closed, the others get notices.
    import subprocess
    import sys

    hosts, k, dead, timeout = 5, 2, 2, 30.0
    plans = [dissemination(hosts, k, me) for me in range(hosts)]
    with mesh(hosts, plans) as socks:
        lr = leaders(hosts, k, socks)
        first = ",".join(str(socks[dead][j].fileno()) for j in plans[dead][0][0])
        child = subprocess.Popen(
            [sys.executable, "-c", _DYING_HOST, "1", str(W), first],
            pass_fds=[s.fileno() for s in socks[dead].values()],
        )
        for s in socks[dead].values():
            s.close()  # the child's copies are the only ones left
        t0 = time.monotonic()
        alive = [me for me in range(hosts) if me != dead]
        out = run_hosts({me: (lambda me=me: lr[me].exchange(W, timeout)) for me in alive})
        assert child.wait(30) == 3
    assert time.monotonic() - t0 < timeout / 3
    for me in alive:
        if out[me][0] != OK:
            assert _suspect_named(out[me], dead, timed_out=False), (me, out[me])
        else:
            assert out[me][1] == W, (me, out[me])
    assert any(out[me][0] == CLOSED for me in alive)
    assert any(out[me][0] == POISONED for me in alive), "some leader hears of it second-hand"
