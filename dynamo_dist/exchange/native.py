"""The host leaders' native exchange: authenticated TCP connections, rounds run in C++.

Recursive doubling over gloo (``exchange/allreduce.py``) costs about 70 us of Python and
gloo per round at every compiled call; here Python only sets the connections up, once
per group, and ``_C.LeaderRounds`` runs the rounds without the GIL. Setup, in order:

1. **Plan.** A k-ary dissemination (:func:`radix_plan`): in round r leader i sends its
   word to ``i + j * k**r`` and receives from ``i - j * k**r`` (mod H, j < k), so after
   ceil(log_k H) rounds every leader holds the AND of all (AND is idempotent: words that
   arrive twice do no harm). Rounds cost more than messages, so k is large
   (:func:`choose_radix`: 3 rounds at 128 hosts).
2. **Listen** only on the address this host reaches the job's store from (the interface
   gloo uses; ``GLOO_SOCKET_IFNAME`` if set), never on all interfaces, and only while the
   group is being set up.
3. **Authenticate** each connection both ways (:func:`handshake_connect`,
   :func:`handshake_accept`): fixed-size messages, a nonce from each side and an HMAC
   under a per-group random token that leader 0 puts in the store (the store is what
   gloo trusts too), compared in constant time, within a one-second deadline. Nothing is
   allocated from a length a peer declares. At most :data:`MAX_PENDING` connections wait
   unauthenticated; one that fails is closed and counted, and never fails the group.
4. **Agree**: every leader says whether it reached all its partners; if any did not,
   all use recursive doubling, and one WARNING names the host.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import itertools
import os
import secrets
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

from dynamo_dist._log import get_logger
from dynamo_dist.dist.group import all_gather_objects
from dynamo_dist.exchange.allreduce import describe_notice, peer_exited

log = get_logger("collective")

#: Largest radix: a round with k - 1 partners costs one poll over k - 1 sockets, and
#: at 128 hosts k = 8 means 3 rounds instead of 7.
MAX_RADIX = 8
#: Connections that may wait in the handshake at once; more are closed at accept.
MAX_PENDING = 16
#: Seconds a connection has to complete its handshake.
HANDSHAKE_S = 1.0

_MAGIC = b"DDNATV01"
_HELLO = struct.Struct("<8sII32s")  # magic, from, to, connector's nonce
_NONCE = 32
_MAC = 32


def choose_radix(hosts: int) -> int:
    """k for H hosts: one round up to :data:`MAX_RADIX` hosts, then as few rounds as k = 8
    gives (2 rounds to 64 hosts, 3 to 512)."""
    return max(2, min(MAX_RADIX, hosts))


def radix_plan(hosts: int, me: int, radix: int) -> list[tuple[list[int], list[int]]]:
    """Leader ``me``'s rounds: ``(send_to, recv_from)`` host indices per round."""
    rounds = []
    dist = 1
    while dist < hosts:
        offsets = {(j * dist) % hosts for j in range(1, radix) if j * dist < hosts} - {0}
        rounds.append(
            (
                sorted({(me + o) % hosts for o in offsets}),
                sorted({(me - o) % hosts for o in offsets}),
            )
        )
        dist *= radix
    return rounds


def partners(plan: Iterable[tuple[list[int], list[int]]]) -> set[int]:
    """Every host a leader exchanges with in some round: one connection each."""
    return {h for send, recv in plan for h in (*send, *recv)}


class _WrongToken(ConnectionError):
    """The other end answered the handshake without the group's token."""


def _mac(token: bytes, role: bytes, hello: bytes, nonce: bytes) -> bytes:
    return hmac.new(token, role + hello + nonce, hashlib.sha256).digest()


def _read_exact(sock: socket.socket, n: int, deadline: float) -> bytes:
    """``n`` bytes by ``deadline``, or OSError: fixed sizes only, never a peer's length."""
    buf = bytearray()
    while len(buf) < n:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("handshake deadline")
        sock.settimeout(left)
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise ConnectionError("closed during the handshake")
        buf += chunk
    return bytes(buf)


def handshake_connect(sock: socket.socket, token: bytes, me: int, peer: int) -> None:
    """The connecting side: prove the token, and check that the acceptor knows it too."""
    deadline = time.monotonic() + HANDSHAKE_S
    hello = _HELLO.pack(_MAGIC, me, peer, secrets.token_bytes(_NONCE))
    sock.settimeout(HANDSHAKE_S)
    sock.sendall(hello)
    reply = _read_exact(sock, _NONCE + _MAC, deadline)
    nonce_a, mac_a = reply[:_NONCE], reply[_NONCE:]
    if not hmac.compare_digest(mac_a, _mac(token, b"A", hello, nonce_a)):
        raise _WrongToken(f"host leader {peer} did not prove the group's token")
    sock.sendall(_mac(token, b"C", hello, nonce_a))


def handshake_accept(sock: socket.socket, token: bytes, me: int, expected: set[int]) -> int:
    """The accepting side: the connector's index once it proved the token, else OSError."""
    deadline = time.monotonic() + HANDSHAKE_S
    hello = _read_exact(sock, _HELLO.size, deadline)
    magic, sender, to, _nonce = _HELLO.unpack(hello)
    if magic != _MAGIC or to != me or sender not in expected:
        raise ConnectionError("not a leader of this group")
    nonce_a = secrets.token_bytes(_NONCE)
    sock.sendall(nonce_a + _mac(token, b"A", hello, nonce_a))
    mac_c = _read_exact(sock, _MAC, deadline)
    if not hmac.compare_digest(mac_c, _mac(token, b"C", hello, nonce_a)):
        raise ConnectionError(f"a connection claiming host leader {sender} lacks the token")
    return int(sender)


def listen_address() -> str:
    """The address to listen on: the one this host reaches the job's store from.

    That is the interface gloo's connections use unless ``GLOO_SOCKET_IFNAME`` names
    one, in which case its address. A UDP ``connect`` sends nothing: it only asks the
    kernel which local address routes to the store.
    """
    ifname = os.environ.get("GLOO_SOCKET_IFNAME", "").split(",")[0]
    if ifname:
        return _interface_address(ifname)
    master = os.environ.get("MASTER_ADDR", "127.0.0.1")
    port = int(os.environ.get("MASTER_PORT", "29500"))
    family = socket.AF_INET6 if ":" in master else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as s:
        s.connect((master, port))
        return str(s.getsockname()[0])


def _interface_address(ifname: str) -> str:
    import fcntl

    siocgifaddr = 0x8915
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        packed = struct.pack("256s", ifname.encode()[:15])
        return socket.inet_ntoa(fcntl.ioctl(s.fileno(), siocgifaddr, packed)[20:24])


@dataclass
class _Acceptor:
    """The listening side of setup: authenticated connections by host index."""

    listener: socket.socket
    token: bytes
    me: int
    expected: set[int]
    accepted: dict[int, socket.socket] = field(default_factory=dict)
    refused: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)
    pending: threading.Semaphore = field(default_factory=lambda: threading.Semaphore(MAX_PENDING))
    done: threading.Event = field(default_factory=threading.Event)
    # Addresses the expected peers published (they publish before they dial): read again
    # when a connection comes from an address not seen yet.
    peer_addresses: Callable[[], set[str]] = field(default=lambda: set())
    known: set[str] = field(default_factory=set)

    def serve(self, deadline: float) -> None:
        self.listener.settimeout(0.05)
        while not self.done.is_set() and time.monotonic() < deadline:
            try:
                conn, (addr, *_) = self.listener.accept()
            except (TimeoutError, BlockingIOError):
                continue
            except OSError:
                if self.listener.fileno() < 0:
                    return  # the listener was closed: setup is over
                time.sleep(0.05)  # EMFILE, ECONNABORTED...: the listener still works
                continue
            if not self._from_a_peer(addr) or not self.pending.acquire(blocking=False):
                # Not from a leader's address, or too many unauthenticated connections
                # at once: strangers from elsewhere never take a peer's pending slot.
                conn.close()
                with self.lock:
                    self.refused += 1
                continue
            threading.Thread(target=self._one, args=(conn,), daemon=True).start()

    def _from_a_peer(self, addr: str) -> bool:
        if addr not in self.known:
            with contextlib.suppress(OSError, RuntimeError, ValueError):
                self.known = self.peer_addresses()
        return addr in self.known

    def _one(self, conn: socket.socket) -> None:
        try:
            with self.lock:
                want = self.expected - set(self.accepted)
            sender = handshake_accept(conn, self.token, self.me, want)
            with self.lock:
                if sender in self.accepted:
                    raise ConnectionError("duplicate connection")
                self.accepted[sender] = conn
                if set(self.accepted) >= self.expected:
                    self.done.set()
        except OSError:
            conn.close()
            with self.lock:
                self.refused += 1
        finally:
            self.pending.release()


@dataclass
class Connections:
    """A leader's authenticated connections, by host index, and what setup saw."""

    sockets: dict[int, socket.socket]
    missing: dict[int, str]
    refused: int

    def close(self) -> None:
        for s in self.sockets.values():
            close_gracefully(s)


_DRAIN_LIMIT = 1 << 20


def close_gracefully(sock: socket.socket) -> None:
    """Close ``sock`` with a FIN, never a reset, without waiting.

    After a failed exchange a peer's frames can sit unread in our receive buffer, and
    Linux closes such a socket with an RST that discards what we have not sent yet: the
    failure notice a partner needs to name the cause would be lost, and the partner see
    "exited" instead. Reading what has arrived first (up to ``_DRAIN_LIMIT``, non-blocking)
    and shutting down our side lets the notice go out, then the FIN.
    """
    with contextlib.suppress(OSError):
        sock.setblocking(False)
        drained = 0
        while drained < _DRAIN_LIMIT:
            chunk = sock.recv(65536)
            if not chunk:
                break
            drained += len(chunk)
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_WR)
    with contextlib.suppress(OSError):
        sock.close()


_NO_ADDRESS = "-"


def _published(store: Any, key: str, deadline: float) -> bytes:
    """``key``'s value once a leader set it, or RuntimeError at ``deadline``."""
    store.wait([key], timedelta(seconds=max(0.001, deadline - time.monotonic())))
    return bytes(store.get(key))


def _dial(published: bytes, token: bytes, me: int, peer: int, deadline: float) -> socket.socket:
    """A connection to ``peer`` that passed the handshake, retried until ``deadline``: a
    peer's pending slots may be held by strangers for a moment. A peer that answers but
    cannot prove the token is not retried."""
    if published.decode() == _NO_ADDRESS:
        raise ConnectionError("it could not listen")
    addr, port = published.decode().split()
    for attempt in itertools.count():
        try:
            sock = socket.create_connection((addr, int(port)), timeout=HANDSHAKE_S)
        except OSError:
            if time.monotonic() + HANDSHAKE_S > deadline:
                raise
        else:
            try:
                handshake_connect(sock, token, me, peer)
                return sock
            except _WrongToken:
                sock.close()
                raise
            except OSError:
                sock.close()
                if time.monotonic() + HANDSHAKE_S > deadline:
                    raise
        time.sleep(min(0.5, 0.02 * 2**attempt))
    raise AssertionError("unreachable")


def connect_leaders(
    store: Any, prefix: str, me: int, hosts: int, peers: set[int], timeout: float
) -> Connections:
    """Connect to every host in ``peers``: the lower index dials, the higher accepts.

    Returns what connected and, per host that did not, why; never raises for a peer.
    """
    key = f"{prefix}/native"
    deadline = time.monotonic() + min(timeout, 60.0)
    if me == 0:
        store.set(f"{key}/token", secrets.token_bytes(32).hex())
    token = bytes.fromhex(_published(store, f"{key}/token", deadline).decode())
    try:
        listener = socket.create_server((listen_address(), 0), backlog=MAX_PENDING)
    except OSError as e:
        # Say so at once: partners waiting for this leader's address give up now, not
        # at the deadline.
        store.set(f"{key}/addr/{me}", _NO_ADDRESS)
        why = f"cannot listen: {type(e).__name__}: {e}"
        return Connections({}, {me: why}, 0)  # this leader itself
    host, port = listener.getsockname()[:2]
    store.set(f"{key}/addr/{me}", f"{host} {port}")
    dialers = {p for p in peers if p < me}

    def peer_addresses() -> set[str]:
        keys = [f"{key}/addr/{p}" for p in sorted(dialers)]
        published = [store.get(k).decode() for k in keys if store.check([k])]
        return {v.split()[0] for v in published if v != _NO_ADDRESS}

    acceptor = _Acceptor(listener, token, me, dialers, peer_addresses=peer_addresses)
    if not acceptor.expected:
        acceptor.done.set()
    server = threading.Thread(target=acceptor.serve, args=(deadline,), daemon=True)
    server.start()
    sockets: dict[int, socket.socket] = {}
    missing: dict[int, str] = {}
    for peer in sorted(p for p in peers if p > me):
        try:
            published = _published(store, f"{key}/addr/{peer}", deadline)
            sockets[peer] = _dial(published, token, me, peer, deadline)
        except (OSError, ValueError, RuntimeError) as e:
            missing[peer] = f"{type(e).__name__}: {e}"
    acceptor.done.wait(max(0.0, deadline - time.monotonic()))
    acceptor.done.set()
    listener.close()  # listen only while the group is set up
    server.join()
    with acceptor.lock:
        sockets.update(acceptor.accepted)
        for peer in acceptor.expected - set(acceptor.accepted):
            missing[peer] = "never connected and authenticated"
        refused = acceptor.refused
    for s in sockets.values():
        s.settimeout(None)
    return Connections(sockets, missing, refused)


# What _C.LeaderRounds.exchange returns as its status.
_OK, _TIMEOUT, _CLOSED, _POISONED, _MALFORMED = range(5)


class NativeExchange:
    """The leaders' exchange over :class:`Connections`, its rounds run by ``_C.LeaderRounds``.

    Satisfies ``allreduce.LeaderExchange`` (the Python-callable cross-host step); the
    shared-memory transport hands :attr:`rounds` to its C++ exchange instead, so a
    compiled call never enters Python on its way across hosts.
    """

    def __init__(
        self,
        conns: Connections,
        plan: list[tuple[list[int], list[int]]],
        me: int,
        hosts: int,
        timeout: float,
        ranks: list[int],
        busy_poll_s: float,
    ) -> None:
        from dynamo_dist.dynamo.hook import _C

        self.conns = conns
        self.timeout = timeout
        self.ranks = ranks
        fds = {h: s.fileno() for h, s in conns.sockets.items()}
        self.rounds = _C.LeaderRounds(me, hosts, plan, fds, busy_poll_s)

    @property
    def waiting_since(self) -> float | None:
        """When the exchange in progress began (``time.monotonic``), or None: the rounds
        run in C++, which keeps the time whether Python or the C++ hook called them."""
        waited = self.rounds.waiting_for()
        return time.monotonic() - waited if waited >= 0 else None

    def __call__(self, word: int) -> tuple[int, str | None]:
        status, value, peer, _waited = self.rounds.exchange(word, self.timeout)
        if status == _OK:
            return value, None
        return 0, self.describe(status, value, peer)

    def describe(self, status: int, value: int, peer: int) -> str:
        """The failure text, as recursive doubling words it for the same failure."""
        who = self.ranks[peer] if 0 <= peer < len(self.ranks) else "?"
        if status == _TIMEOUT:
            return "timeout"
        if status == _POISONED:
            return describe_notice(value, self.ranks)
        if status == _MALFORMED:
            return f"host leader rank {who} sent a malformed frame (another build or version?)"
        return peer_exited(who)

    def close(self) -> None:
        self.conns.close()


@dataclass
class _SetupReport:
    """What one leader says after setup, gathered by all."""

    ok: bool
    host: str
    why: str


def native_or_none(
    store: Any,
    prefix: str,
    leaders_group: Any,
    leader_ranks: list[int],
    timeout: float,
    busy_poll_s: float,
    radix: int | None = None,
) -> NativeExchange | None:
    """The native exchange if every leader reached all its partners, else None for all.

    Collective over the leaders' group. One WARNING (from the first leader) names each
    host that could not connect, and why; the caller then uses recursive doubling.
    ``radix`` overrides :func:`choose_radix` (the scale benchmark runs several rounds
    on few hosts with it, to fit a round's cost apart from a partner's).
    """
    hosts, me = leaders_group.size(), leaders_group.rank()
    plan = radix_plan(hosts, me, radix or choose_radix(hosts))
    conns: Connections | None = None
    why = ""
    try:
        conns = connect_leaders(store, prefix, me, hosts, partners(plan), timeout)
        if conns.missing:
            why = "; ".join(
                f"host leader rank {leader_ranks[p]}: {e}" for p, e in sorted(conns.missing.items())
            )
    except (OSError, RuntimeError, ValueError) as e:
        why = f"{type(e).__name__}: {e}"
    exchange = None
    if not why and conns is not None:
        try:
            exchange = NativeExchange(conns, plan, me, hosts, timeout, leader_ranks, busy_poll_s)
        except (RuntimeError, ValueError, OSError) as e:
            why = f"{type(e).__name__}: {e}"
    if conns is not None and conns.refused:
        # Counted, never fatal: a port scanner, or something that is not this job.
        log.warning(
            "%d connection(s) to this host leader's exchange port failed the handshake "
            "and were closed (not a leader of this group, or without its token)",
            conns.refused,
        )
    reports: list[_SetupReport] = all_gather_objects(
        leaders_group, _SetupReport(not why, socket.gethostname(), why)
    )
    failed = [(leader_ranks[i], r) for i, r in enumerate(reports) if not r.ok]
    if not failed:
        return exchange
    if conns is not None:
        conns.close()
    if me == 0:
        log.warning(
            "leader_exchange=native: %s; every host leader uses recursive doubling instead. "
            "Fix: let the host leaders reach each other over TCP on the interface gloo uses "
            '(GLOO_SOCKET_IFNAME), or set leader_exchange = "doubling"',
            "; ".join(f"host {r.host} (rank {k}) could not connect: {r.why}" for k, r in failed),
        )
    return None
