"""One compile through the cache: its agreement ticket, and what the compile did.

The cache wraps the real compile; when the cache machinery fails, a :class:`Turn` tells
an error of the compile itself (re-raised, as without the cache) from one of ours (a
local compile instead), whether a result already exists (never compile twice), and
whether this rank already reported at the agreement (never report twice). It also
holds the host's fetch lock while this rank fetches a graph for its host (fan-out).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from dynamo_dist.cache.agree import Agreement
from dynamo_dist.cache.lock import Lock, owner_record
from dynamo_dist.cache.stats import CacheStats, current_region_label
from dynamo_dist.cache.store import DiskStore
from dynamo_dist.dist import local as dist_local
from dynamo_dist.dynamo import inductor

__all__ = ["Turn", "compile_counted"]


def compile_counted(counts: CacheStats, compile_fn: Callable[[], Any]) -> Any:
    """``compile_fn()``, counting the graphs inductor compiled for it in ``counts``.

    One graph built if inductor missed its FX graph cache at least once (a graph with a
    backward misses twice): a graph whose kernels inductor found in its own cache, or
    loaded from an installed entry, is not built.
    """
    before = inductor.fxgraph_cache_misses()
    try:
        return compile_fn()
    finally:
        built = inductor.fxgraph_cache_misses() - before
        counts.inductor_compiles += built
        if built > 0:
            counts.count_built(current_region_label())


class Turn:
    """One compile through the cache (see the module docstring)."""

    def __init__(
        self,
        rank: int,
        counts: CacheStats,
        agreement: Agreement,
        n: int,
        group: dist_local.GroupInfo | None,
    ) -> None:
        self.rank = rank
        self.counts = counts
        self.agreement = agreement
        self.n = n
        self.group = group
        self.reported = False
        self.compile_raised = False
        self.has_result = False
        self.result: Any = None
        self.start = time.monotonic()
        #: The entry installed for this compile: (where from, its recorded build seconds).
        self.installed: tuple[str, float | None] | None = None
        # Fan-out: the host-local store, and the host's fetch lock while this rank holds it.
        self.host: DiskStore | None = None
        self.fetch: Lock | None = None
        self.phase = "fetch"

    def note_phase(self, phase: str) -> None:
        """Tell the host's other ranks what this fetcher does: fetch, wait or lead.

        They compile alongside (or ahead, or stop waiting) only while a graph is being
        compiled ("wait", "lead"), never while the fetcher merely reads an entry.
        """
        if self.fetch is not None and phase != self.phase:
            self.phase = phase
            self.fetch.note({**owner_record(self.rank), "phase": phase})

    def let_go(self) -> None:
        """Release the host's fetch lock (after leaving a copy, or giving up)."""
        if self.fetch is not None:
            fetch, self.fetch = self.fetch, None
            fetch.release()

    def count(self, counts_loads: bool) -> None:
        """Count this compile once it is over: a graph loaded (a hit), or a miss.

        A load is this rank's time from the start of the compile (waiting for the rank
        that built it included) until the graph was usable. ``counts_loads`` False: the
        caller loads further (a precompiled artifact) and counts the load itself.
        """
        if self.installed is None or not self.has_result:
            self.counts.cache_misses += 1
        elif counts_loads:
            source, build_seconds = self.installed
            seconds = time.monotonic() - self.start
            self.counts.count_loaded(source, current_region_label(), build_seconds, seconds)

    def compile(self, compile_fn: Callable[[], Any]) -> Any:
        try:
            self.result = compile_counted(self.counts, compile_fn)
        except BaseException:
            self.compile_raised = True
            raise
        self.has_result = True
        return self.result

    def agree(self, key: str, ok: bool) -> bool:
        """All-or-nothing with the other ranks of the group (or just ``ok`` without any)."""
        if self.reported or not self.agreement.applies(self.group):
            return ok and not self.reported
        assert self.group is not None
        self.reported = True
        return self.agreement.agree(key, self.n, ok, self.group) and ok

    def peers_said_no(self) -> bool:
        """Whether another rank already reported "no" for this compile (see agree)."""
        return not self.reported and self.agreement.decided_no(self.n, self.group)

    def abstain(self) -> None:
        if not self.reported:
            self.reported = True
            self.agreement.abstain(self.n, self.group)
