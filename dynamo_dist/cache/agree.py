"""Cross-rank agreement on each cached compile: all ranks install an entry, or none does.

A rank that loaded an entry must not run it while another rank compiled the same graph
itself (a different program for one graph). So for its n-th cached compile every rank
reports ok or not in the job's key-value store and waits, bounded by the timeout, for
all reports (three store operations per rank, no polling: see :class:`Agreement`);
one "no" (or a missing report) makes every rank compile locally. A rank
that cannot use the cache at all still reports, as a "no", so its peers never wait out
the timeout for it.

Compiles are numbered per group, not per key: every rank of a group compiles the same
sequence of graphs (the guard exchange enforces it), so the n-th compile is the same
graph on every rank even when rank-specific graphs have different keys. The group is
the compile's, passed down by the caching backend (``cache/backend.py``): a pipeline stage's
ranks agree among themselves, and a compile inside ``dynamo_dist.local()`` (no group)
neither agrees nor advances any sequence.
"""

from __future__ import annotations

import time
from datetime import timedelta
from typing import Any

from dynamo_dist.cache.stats import log
from dynamo_dist.dist import proc
from dynamo_dist.dist.local import GroupInfo
from dynamo_dist.dist.store import PayloadRefused, checked, open_store, refuse

__all__ = ["Agreement", "next_compile"]

_compile_seq: dict[str, int] = {}


def next_compile(group: GroupInfo) -> int:
    """The number of this process's next cached compile in ``group``.

    Over every cache directory: every rank of the group compiles the same sequence of
    graphs (that is what the guard exchange enforces), so the n-th compile is the same
    graph on every rank, even when ranks name their cache directories differently or a
    process uses several.
    """
    n = _compile_seq.get(group.key, 0) + 1
    _compile_seq[group.key] = n
    return n


# A report adds 1 for "ok" and 1 + _NO for "no" to one counter per compile, so one
# atomic add both counts the report and records a "no"; the low bits are the count.
_NO = 1 << 32
# Job-wide, the waiting ranks read "has some rank said no" at most this often in total:
# each rank's interval grows with the group (one TCPStore serves the whole job).
_PEEK_OPS_PER_S = 250.0


def _verdict(raw: object) -> int:
    """The agreement counter posted under ``.../all``; a value over the store cap is a "no".

    Any process can set the key: one too large to be a number is refused unparsed (and
    counted), and the compile goes on locally, as after any failed agreement.
    """
    try:
        return int(checked(raw, "cache agreement verdict"))
    except PayloadRefused as e:
        refuse("cache agreement verdict", e)
        return _NO


class Agreement:
    """This process's side of the agreements for one cache directory.

    Store traffic per rank and compile is three operations and no polling: the report
    (one ``add``), a blocking ``wait`` on the key the last reporter posts, and one
    ``get`` of the final count. Polling the count would make every waiting rank hit the
    job's one TCPStore several times a second: 4,096 ranks would send it about 20,000
    operations a second for as long as the slowest rank takes to arrive.
    """

    def __init__(self, timeout: float, enabled: bool) -> None:
        self.timeout = timeout
        self.enabled = enabled
        self._store_client: Any = None  # the job's store, opened on first agreement
        self._store_opened = False
        self._next_peek = 0.0

    def applies(self, group: GroupInfo | None) -> bool:
        """Whether a compile in ``group`` must agree with other ranks."""
        return self.enabled and group is not None and group.size > 1

    def abstain(self, n: int, group: GroupInfo | None) -> None:
        """Report "no" for compile ``n`` without waiting: this rank compiles locally anyway."""
        if self.applies(group):
            assert group is not None
            self.agree("-", n, False, group, wait=False)

    def client(self) -> Any:
        """This cache directory's client of the job's store (None without a store).

        The automatic-dynamic profile shares it: each client is one more TCP connection
        to the job's one store, which at 4,096 ranks already holds thousands.
        """
        return self._store()

    def _store(self) -> Any:
        if not self._store_opened:
            # One client per cache directory: each open clones a TCP connection.
            self._store_client = open_store(self.timeout)
            self._store_opened = True
        return self._store_client

    def drop_client(self) -> None:
        """Forget a client whose wait timed out: its connection may still get that reply."""
        self._store_client = None
        self._store_opened = False

    @staticmethod
    def _base(n: int, group: GroupInfo) -> str:
        # Per restart: keys from an earlier attempt of an elastic job must not count.
        return f"dynamo_dist/cache/agree/{proc.restart_count()}/{group.key}/{n}"

    def decided_no(self, n: int, group: GroupInfo | None) -> bool:
        """Whether some rank already reported "no" for compile ``n``.

        Then nobody installs an entry for it: a rank still waiting for the leader's
        entry can stop waiting and compile at once (it would compile anyway). Only a
        shortcut, so it is rate-limited: each rank looks at most every
        ``group.size / 250`` seconds (and at most twice a second), about 250 store
        operations a second for the whole group whatever its size.
        """
        if not self.applies(group):
            return False
        assert group is not None
        now = time.monotonic()
        if now < self._next_peek:
            return False
        self._next_peek = now + max(0.5, group.size / _PEEK_OPS_PER_S)
        store = self._store()
        if store is None:
            return False
        try:
            return bool(store.add(f"{self._base(n, group)}/n", 0) >= _NO)
        except Exception:
            return False

    def agree(self, key: str, n: int, ok: bool, group: GroupInfo, wait: bool = True) -> bool:
        """True if every rank reported ok for its n-th compile; bounded by the timeout.

        ``wait=False`` only reports (a rank that compiles locally whatever the others say).
        """
        store = self._store()
        if store is None:
            return ok
        base = self._base(n, group)
        try:
            total = int(store.add(f"{base}/n", 1 if ok else 1 + _NO))
            if total % _NO == group.size:
                store.set(f"{base}/all", str(total))  # the last report: wake the others
            if not wait:
                return False
            try:
                store.wait([f"{base}/all"], timedelta(seconds=self.timeout))
            except Exception as e:
                self.drop_client()
                log.warning(
                    "not every rank reported on cache entry %s within %.0fs (%s); "
                    "compiling locally",
                    key[:12],
                    self.timeout,
                    str(e).splitlines()[0][:120] if str(e) else type(e).__name__,
                )
                return self._veto(base, group)
            return _verdict(store.get(f"{base}/all")) < _NO
        except Exception as e:
            log.warning("cache agreement failed (%s); compiling locally", e)
            return False

    def _veto(self, base: str, group: GroupInfo) -> bool:
        """After a timed-out wait: make sure no late rank installs what this one will not.

        A "no" without a report (it adds no count) reaches every rank still to report;
        if every rank had already reported, the verdict was posted before the veto and
        this rank follows it instead. Either way all ranks do the same thing.
        """
        store = self._store()  # a fresh client: the old one may still get the wait's reply
        if store is None:
            return False
        try:
            total = int(store.add(f"{base}/n", _NO))
            if total % _NO == group.size:
                return _verdict(store.get(f"{base}/all")) < _NO
        except Exception as e:
            log.warning("cache agreement failed (%s); compiling locally", e)
        return False
