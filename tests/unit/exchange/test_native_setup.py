"""The native leaders' exchange, Python side: the round plan, the handshake, connection setup.

Real sockets and a real TCPStore, leaders as threads of this process (setup is Python);
the rounds themselves run in C++ (tests/unit/exchange/test_leader_rounds.py, and the
multi-host tests in tests/multiproc/test_transport.py).
"""

from __future__ import annotations

import contextlib
import random
import socket
import threading
import time
from typing import Any

import pytest
import torch.distributed as dist

from dynamo_dist.exchange import native as N

pytestmark = pytest.mark.timeout(60)


# -- the plan --------------------------------------------------------------------------
def _simulate(hosts: int, radix: int, words: list[int]) -> list[int]:
    """Every leader's word after the plan's rounds, with perfect message passing."""
    plans = [N.radix_plan(hosts, me, radix) for me in range(hosts)]
    held = list(words)
    for r in range(max((len(p) for p in plans), default=0)):
        before = list(held)
        for me, plan in enumerate(plans):
            send, recv = plan[r]
            for peer in recv:
                assert me in plans[peer][r][0], "whoever I receive from sends to me"
                held[me] &= before[peer]
            for peer in send:
                assert me in plans[peer][r][1], "whoever I send to receives from me"
    return held


@pytest.mark.parametrize("hosts", [1, 2, 3, 4, 5, 7, 8, 9, 16, 17, 64, 128, 129])
@pytest.mark.parametrize("radix", [2, 3, 8])
def test_the_plan_gives_every_leader_the_and(hosts: int, radix: int) -> None:
    rng = random.Random(hosts * 100 + radix)
    for _ in range(5):
        words = [rng.getrandbits(64) | rng.getrandbits(64) for _ in range(hosts)]
        want = words[0]
        for w in words[1:]:
            want &= w
        assert _simulate(hosts, radix, words) == [want] * hosts


def test_rounds_and_partners_at_scale() -> None:
    assert N.choose_radix(128) == 8 and len(N.radix_plan(128, 5, 8)) == 3  # not 7
    assert len(N.radix_plan(8, 0, N.choose_radix(8))) == 1
    assert N.radix_plan(1, 0, 2) == []
    plan = N.radix_plan(128, 5, 8)
    assert all(len(send) <= 7 and len(recv) <= 7 for send, recv in plan)
    assert len(N.partners(plan)) <= 2 * 7 * 3


# -- the handshake ---------------------------------------------------------------------
TOKEN = b"t" * 32


def _pair() -> tuple[socket.socket, socket.socket]:
    a, b = socket.socketpair()
    return a, b


def _accept_in_thread(sock: socket.socket, token: bytes, me: int, expected: set[int]) -> Any:
    out: dict[str, Any] = {}

    def run() -> None:
        try:
            out["sender"] = N.handshake_accept(sock, token, me, expected)
        except OSError as e:
            out["error"] = e

    t = threading.Thread(target=run)
    t.start()
    return t, out


def test_both_sides_prove_the_token() -> None:
    a, b = _pair()
    t, out = _accept_in_thread(b, TOKEN, 3, {1})
    N.handshake_connect(a, TOKEN, 1, 3)
    t.join()
    assert out == {"sender": 1}


def test_a_connector_without_the_token_is_refused_and_learns_nothing() -> None:
    a, b = _pair()
    t, out = _accept_in_thread(b, TOKEN, 3, {1})
    with pytest.raises(ConnectionError, match="did not prove"):
        N.handshake_connect(a, b"x" * 32, 1, 3)  # the acceptor's MAC fails under its key
    a.close()
    t.join()
    assert isinstance(out.get("error"), OSError)


def test_an_acceptor_without_the_token_is_not_trusted() -> None:
    a, b = _pair()
    t, _ = _accept_in_thread(b, b"y" * 32, 3, {1})
    with pytest.raises(ConnectionError, match="did not prove the group's token"):
        N.handshake_connect(a, TOKEN, 1, 3)
    a.close()
    t.join()


@pytest.mark.parametrize(
    "hello",
    [
        b"",  # connects and says nothing
        b"GET / HTTP/1.1\r\n\r\n",  # a port scanner
        b"\xff" * 4096,  # garbage, longer than any message
        N._HELLO.pack(b"DDNATV01", 7, 3, b"n" * 32),  # a leader this one does not expect
        N._HELLO.pack(b"DDNATV01", 1, 4, b"n" * 32),  # meant for another leader
    ],
)
def test_strangers_are_refused_within_the_deadline(hello: bytes) -> None:
    a, b = _pair()
    t, out = _accept_in_thread(b, TOKEN, 3, {1})
    a.sendall(hello)
    start = time.monotonic()
    t.join(10)
    assert not t.is_alive() and isinstance(out.get("error"), OSError), out
    assert time.monotonic() - start < N.HANDSHAKE_S + 3  # loaded machine: generous


# -- setup over a real store -----------------------------------------------------------
def _store_server() -> tuple[Any, int]:
    port = _free_port()
    server = dist.TCPStore("127.0.0.1", port, 1, is_master=True, wait_for_workers=False)
    return server, port


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _setup_all(hosts: int, port: int, monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(port))
    results: list[Any] = [None] * hosts

    def leader(me: int) -> None:
        store = dist.TCPStore("127.0.0.1", port, is_master=False)
        plan = N.radix_plan(hosts, me, N.choose_radix(hosts))
        results[me] = (plan, N.connect_leaders(store, "g", me, hosts, N.partners(plan), 30))

    threads = [threading.Thread(target=leader, args=(i,)) for i in range(hosts)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    return results


@pytest.mark.parametrize("hosts", [2, 3, 9])
def test_every_leader_connects_to_exactly_its_partners(
    hosts: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    server, port = _store_server()
    results = _setup_all(hosts, port, monkeypatch)
    try:
        for plan, conns in results:
            assert conns.missing == {} and conns.refused == 0
            assert set(conns.sockets) == N.partners(plan)
        # One socket per pair, the same connection seen from both ends.
        for me, (_, conns) in enumerate(results):
            for peer, sock in conns.sockets.items():
                theirs = results[peer][1].sockets[me]
                assert sock.getsockname() == theirs.getpeername()
    finally:
        for _, conns in results:
            conns.close()
        del server


def test_a_listener_is_open_only_during_setup(monkeypatch: pytest.MonkeyPatch) -> None:
    server, port = _store_server()
    results = _setup_all(2, port, monkeypatch)
    client = dist.TCPStore("127.0.0.1", port, is_master=False)
    host, lport = client.get("g/native/addr/1").decode().split()
    with pytest.raises(OSError):
        socket.create_connection((host, int(lport)), timeout=2).close()
    assert host == "127.0.0.1"  # the store's interface, not 0.0.0.0
    for _, conns in results:
        conns.close()
    del server


def test_strangers_flooding_the_listener_do_not_stop_the_leaders(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A sustained flood of silent connections from an address that is not a leader's
    (127.0.0.2; the leaders publish 127.0.0.1) is closed at accept and never takes a
    pending slot, so the real peers connect."""
    server, port = _store_server()
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(port))
    out: dict[int, Any] = {}
    store = dist.TCPStore("127.0.0.1", port, is_master=False)
    stop = threading.Event()

    def leader(me: int) -> None:
        client = dist.TCPStore("127.0.0.1", port, is_master=False)
        out[me] = N.connect_leaders(client, "g", me, 3, {0, 1, 2} - {me}, 30)

    def stranger(host: str, lport: int) -> None:
        # Silent, and back as soon as the leader closes it (a slowloris).
        while not stop.is_set():
            with contextlib.suppress(OSError), socket.socket() as s:
                s.bind(("127.0.0.2", 0))
                s.settimeout(3)
                s.connect((host, lport))
                s.recv(1)

    # Leaders 0 and 2 start; 0 waits for 1's address before it dials anyone (it dials
    # in order), so 2's listener is flooded before any leader dials it.
    threads = [threading.Thread(target=leader, args=(i,), daemon=True) for i in (0, 2)]
    for t in threads:
        t.start()
    host, lport = store.get("g/native/addr/2").decode().split()
    flood = [
        threading.Thread(target=stranger, args=(host, int(lport)), daemon=True)
        for _ in range(3 * N.MAX_PENDING)
    ]
    for t in flood:
        t.start()
    time.sleep(0.5)
    threads.append(threading.Thread(target=leader, args=(1,), daemon=True))
    threads[-1].start()
    for t in threads:
        t.join(45)
    stop.set()
    try:
        assert all(out[i].missing == {} for i in range(3)), [out[i].missing for i in range(3)]
        assert out[2].refused >= N.MAX_PENDING
    finally:
        for c in out.values():
            c.close()
        del server


def _tcp_pair() -> tuple[socket.socket, socket.socket]:
    with socket.create_server(("127.0.0.1", 0)) as srv:
        a = socket.create_connection(srv.getsockname())
        b, _ = srv.accept()
    return a, b


def test_closing_after_a_failure_keeps_the_notice_and_ends_with_a_fin() -> None:
    # A failed leader may close with a partner's frames unread: a plain close() would
    # reset the connection, and its partner see "connection reset" instead of EOF after
    # the notice (or lose the notice, if it was still queued here).
    for graceful, expect in ((False, ConnectionResetError), (True, None)):
        failed, partner = _tcp_pair()
        partner.sendall(b"frame of a round nobody reads" * 10)
        time.sleep(0.05)  # the frames have arrived, unread
        failed.sendall(b"NOTICE")
        if graceful:
            N.close_gracefully(failed)
        else:
            failed.close()
        time.sleep(0.05)
        partner.settimeout(5)
        assert partner.recv(6) == b"NOTICE"
        if expect is None:
            assert partner.recv(1) == b""  # a FIN
        else:
            with pytest.raises(expect):
                partner.recv(1)
        partner.close()
