"""Cross-rank agreement on each cached compile: all ranks install an entry, or none does.

A rank that loaded an entry must not run it while another rank compiled the same graph
itself (a different program for one graph). So for its n-th cached compile every rank
reports ok or not in the job's key-value store and waits, bounded by the timeout, for
all reports; one "no" (or a missing report) makes every rank compile locally. A rank
that cannot use the cache at all still reports, as a "no", so its peers never wait out
the timeout for it.

Compiles are numbered per group, not per key: every rank of a group compiles the same
sequence of graphs (the guard exchange enforces it), so the n-th compile is the same
graph on every rank even when rank-specific graphs have different keys. The group is
the scope of the compile in progress (``_local.current_scope``): a pipeline stage's
ranks agree among themselves, and a compile inside ``dynamo_dist.local()`` (no scope)
neither agrees nor advances any sequence.
"""

from __future__ import annotations

import os
import time
from typing import Any

from ._cache_stats import log
from ._local import Scope
from ._status import open_store

__all__ = ["Agreement", "next_compile"]

_compile_seq: dict[str, int] = {}


def next_compile(scope: Scope) -> int:
    """The number of this process's next cached compile in ``scope``'s group.

    Over every cache directory: every rank of the group compiles the same sequence of
    graphs (that is what the guard exchange enforces), so the n-th compile is the same
    graph on every rank, even when ranks name their cache directories differently or a
    process uses several.
    """
    n = _compile_seq.get(scope.key, 0) + 1
    _compile_seq[scope.key] = n
    return n


class Agreement:
    """This process's side of the agreements for one cache directory."""

    def __init__(self, timeout: float, enabled: bool) -> None:
        self.timeout = timeout
        self.enabled = enabled
        self._store_client: Any = None  # the job's store, opened on first agreement
        self._store_opened = False

    def applies(self, scope: Scope | None) -> bool:
        """Whether a compile in ``scope`` must agree with other ranks."""
        return self.enabled and scope is not None and scope.size > 1

    def abstain(self, n: int, scope: Scope | None) -> None:
        """Report "no" for compile ``n`` without waiting: this rank compiles locally anyway."""
        if self.applies(scope):
            assert scope is not None
            self.agree("-", n, False, scope, wait=False)

    def _store(self) -> Any:
        if not self._store_opened:
            # One client per cache directory: each open clones a TCP connection.
            self._store_client = open_store(self.timeout)
            self._store_opened = True
        return self._store_client

    @staticmethod
    def _base(n: int, scope: Scope) -> str:
        # Per restart: keys from an earlier attempt of an elastic job must not count.
        restart = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
        return f"dynamo_dist/cache/agree/{restart}/{scope.key}/{n}"

    def decided_no(self, n: int, scope: Scope | None) -> bool:
        """Whether some rank already reported "no" for compile ``n``.

        Then nobody installs an entry for it: a rank still waiting for the leader's
        entry can stop waiting and compile at once (it would compile anyway).
        """
        if not self.applies(scope):
            return False
        assert scope is not None
        store = self._store()
        if store is None:
            return False
        try:
            return bool(store.add(f"{self._base(n, scope)}/fail", 0) > 0)
        except Exception:
            return False

    def agree(self, key: str, n: int, ok: bool, scope: Scope, wait: bool = True) -> bool:
        """True if every rank reported ok for its n-th compile; bounded by the timeout.

        ``wait=False`` only reports (a rank that compiles locally whatever the others say).
        """
        store = self._store()
        if store is None:
            return ok
        base = self._base(n, scope)
        try:
            store.add(f"{base}/fail", 0 if ok else 1)
            store.add(f"{base}/done", 1)
            if not wait:
                return False
            deadline = time.monotonic() + self.timeout
            delay = 0.005
            while store.add(f"{base}/done", 0) < scope.size:
                if time.monotonic() >= deadline:
                    log.warning(
                        "not every rank reported on cache entry %s within %.0fs; compiling locally",
                        key[:12],
                        self.timeout,
                    )
                    return False
                time.sleep(delay)
                delay = min(delay * 2, 0.2)
            return bool(store.add(f"{base}/fail", 0) == 0)
        except Exception as e:
            log.warning("cache agreement failed (%s); compiling locally", e)
            return False
