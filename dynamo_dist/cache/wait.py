"""The one wait of a rank for a graph another rank is getting: loop, takeover, deadline.

A rank that needs a graph waits in one of two places (sites): the host-local
directory, where the host's fetcher leaves a verified copy (fan-out,
:class:`dynamo_dist.cache.fanout.HostSite`), and the shared directory, where a leader
publishes the entry (:class:`dynamo_dist.cache.protocol.SharedSite`). The wait is the
same in both, so it is written once here (:meth:`Wait.at`), and a site supplies only
what differs: what it looks at, whose lock it watches, what taking that lock means,
and what its messages say.

Every pass of the loop sleeps and checks the deadline: nothing found on disk (a lock
that cannot be read, a FIFO, a directory where a file should be) can make it spin or
outlast ``timeout``. A holder that let go without leaving the entry is looked for once
more (the entry may have landed between the two looks), then this rank compiles at
once rather than lead one after another; a dead holder is taken over. While a graph is
compiled elsewhere, the waiting rank may compile it too (``cache_followers``), stop
waiting once a peer said "no" (nobody will install it), or lead a graph it compiles
next (:func:`dynamo_dist.cache.lead.compile_ahead`).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any, Literal, Protocol

from dynamo_dist.cache.lock import Holder, Lock, Watch, stale_after
from dynamo_dist.cache.stats import CacheStats, log
from dynamo_dist.cache.store import Entry
from dynamo_dist.cache.turn import Turn

__all__ = ["Outcome", "Site", "Took", "Upcoming", "Wait"]

#: A graph this rank will compile next, as (key, factors, compile_fn, label): what a rank
#: waiting for a leader may compile and publish meanwhile (DDPOptimizer's later pieces).
Upcoming = tuple[str, dict[str, Any], Callable[[], Any], str]
#: How a wait ends: ('load', entry), ('leader', None), ('fallback', None), ('alongside',
#: None), or (None, None) from the host-local directory: go on to the shared one.
Outcome = tuple[str | None, Entry | None]
#: What taking a site's lock led to: an outcome, "again" (look at once), or None (wait).
Took = Outcome | Literal["again"] | None


class Site(Protocol):
    """Where a rank waits for ``key``: what the two places differ in."""

    key: str
    label: str
    turn: Turn
    #: The longest sleep between two looks.
    poll: float
    #: How many times ``stale_after`` a silent holder whose process is alive is waited for.
    alive_grace: int
    #: What failed, in the warning, when the lock cannot be looked at or taken.
    problem: str
    #: How the wait ends then.
    failed: Outcome
    #: Log formats, each given (holder, key, label) or (seconds, holder, key, label).
    let_go_format: str
    timed_out_format: str
    waiting_format: str

    def look(self) -> Outcome | None:
        """The entry, if it is here: an outcome ends the wait, None waits on."""

    def holder(self, seen: Holder | None) -> tuple[Holder | None, bool]:
        """(the lock's holder, whether just looked at) given the one waited for so far."""

    def taking_over(self, holder: Holder, watch: Watch) -> None:
        """Say why a dead holder's lock was taken over (by this rank)."""

    def stuck(self, holder: Holder, watch: Watch, e: OSError) -> None:
        """Say that a dead holder's lock cannot be taken over (``e``): whose, and the fix."""

    def take(self, over: Holder | None) -> Lock | None:
        """Take the key's lock (over a dead ``over``); None if another rank got it."""

    def took(self, lock: Lock | None) -> Took:
        """Act on what :meth:`take` returned (lead, fetch for the host)."""

    def compiling(self, holder: Holder) -> bool:
        """Whether ``holder`` is compiling the graph (not merely reading it), noted."""


@dataclass
class Wait:
    """One rank's wait for one graph, at one site then maybe the other."""

    timeout: float
    log_interval: float
    counts: CacheStats
    #: Compile a graph another rank is compiling, instead of waiting to load it.
    followers_compile: bool
    local_problem: Callable[[str, str, BaseException], None]
    #: Lead one of the graphs given (see lead.compile_ahead); whether it did.
    compile_ahead: Callable[[Iterator[Upcoming], str], bool]
    upcoming: Callable[[], Iterable[Upcoming]] | None
    #: When the wait began (monotonic): one deadline for both sites.
    start: float

    def at(self, site: Site) -> Outcome:
        """Wait at ``site`` for its key: load, lead (or fetch), fall back, or go on."""
        next_log = self.start + self.log_interval
        delay = 0.02
        watch = Watch(stale_after(self.timeout), site.alive_grace)
        seen: Holder | None = None  # the last live holder this rank waited for
        relooked = False  # looked at the entry again after its holder let go
        ahead: Iterator[Upcoming] | None = None
        while True:
            found = site.look()
            if found is not None:
                return found
            taking = False
            lock: Lock | None = None
            holder: Holder | None = None
            try:
                holder, fresh = site.holder(seen)
                if holder is None and seen is not None and not relooked:
                    # The entry may have landed between the two looks: one more.
                    relooked = True
                    continue
                if holder is None and seen is not None:
                    return self._let_go(site, seen)
                if holder is None or (fresh and watch.dead(holder)):
                    taking = True
                    lock = site.take(holder)
                    if holder is not None and lock is not None:
                        site.taking_over(holder, watch)  # said by the one that took it
                else:
                    seen = holder
                    if site.compiling(holder):
                        # A graph is being compiled: compile too, stop, or compile ahead.
                        role = self._instead_of_waiting(site, holder)
                        if role is not None:
                            return role, None
                        if self.upcoming is not None:
                            ahead = iter(self.upcoming()) if ahead is None else ahead
                            if self.compile_ahead(ahead, site.label):
                                continue  # look again at once: the wait was spent compiling
            except OSError as e:
                if taking and holder is not None:
                    site.stuck(holder, watch, e)  # not ours to take: later misses go at once
                else:
                    self.local_problem(site.problem, site.key, e)
                return site.failed
            if taking:
                took = site.took(lock)
                if took == "again":
                    continue
                if took is not None:
                    return took
            now = time.monotonic()
            if now - self.start >= self.timeout:
                return self._timed_out(site, seen, now - self.start)
            if now >= next_log and seen is not None:
                next_log = now + self.log_interval
                log.warning(
                    site.waiting_format,
                    site.key[:12],
                    site.label,
                    seen.describe(),
                    now - self.start,
                )
            time.sleep(delay)
            delay = min(delay * 1.5, site.poll)

    def _let_go(self, site: Site, seen: Holder) -> Outcome:
        """The holder let go without leaving the entry (it compiles the graph itself: it
        could not read or publish it, or was refused, or timed out), so nobody will
        install the entry: compile now, all at once, rather than lead one by one."""
        self.counts.cache_fallbacks += 1
        log.info(site.let_go_format, seen.describe(), site.key[:12], site.label)
        return "fallback", None

    def _timed_out(self, site: Site, seen: Holder | None, waited: float) -> Outcome:
        self.counts.cache_fallbacks += 1
        log.warning(
            site.timed_out_format,
            waited,
            seen.describe() if seen else "another rank",
            site.key[:12],
            site.label,
        )
        return "fallback", None

    def _instead_of_waiting(self, site: Site, holder: Holder) -> str | None:
        """'alongside' or 'fallback' if this rank should compile now, not wait for ``holder``."""
        if self.followers_compile:
            log.info(
                "%s is compiling %s (%s); compiling it here too (cache_followers)",
                holder.describe(),
                site.key[:12],
                site.label,
            )
            self.counts.cache_compiled_alongside += 1
            return "alongside"
        if site.turn.peers_said_no():
            # A rank compiles this graph itself (it cannot use the cache, or compiles
            # alongside): nobody will install the entry, so waiting for it would only
            # delay this rank's own compile.
            log.info(
                "another rank compiles %s (%s) itself; compiling it here now instead of "
                "waiting for %s",
                site.key[:12],
                site.label,
                holder.describe(),
            )
            self.counts.cache_fallbacks += 1
            return "fallback"
        return None
