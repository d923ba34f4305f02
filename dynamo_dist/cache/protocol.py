"""The leader/follower protocol over one shared cache directory.

For each graph key the first rank to take the key's lock is its leader: it compiles in
a clean room and publishes that directory as the entry (:mod:`dynamo_dist.cache.lead`).
The other ranks wait for the entry (:mod:`dynamo_dist.cache.wait`), verify it, stage
it, and, once every rank agreed it could (:mod:`dynamo_dist.cache.agree`), unpack it
into their own inductor cache (:mod:`dynamo_dist.cache.install`) and call inductor,
which then finds everything cached and compiles nothing. A restart finds the entry at
once. Where each rank has cores to spare (``cache_followers``), the others compile
alongside the leader instead of waiting, each in its own clean room, and publish too
if the entry is still missing when they are done.

With fan-out (``cache_fanout``, :mod:`dynamo_dist.cache.fanout`) a rank first waits in
the host-local directory, and only the host's fetcher goes on to the shared one. While
a graph is compiled elsewhere, a fetcher stats the entry's manifest once a second
(``SHARED_POLL_S``) and looks at its lock every ``LOCK_LOOK_S``.

Whatever goes wrong with the cache (unusable directory, corrupt or tampered entry, a
leader that died, a full or read-only local disk, a bug of ours) costs at most a local
compile and one warning: never the job, and never a hang. Only an error of the compile
itself (inductor's, the user's) reaches Dynamo, as it would without the cache.

A rank that cannot use the cache still takes part in every agreement, as a "no" sent
without waiting; a rank waiting for a leader stops waiting once some rank said "no"
(nobody will install that entry); and a follower whose leader released its lock without
publishing compiles at once instead of leading in turn: a failed publish must not make
the ranks compile one after another.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterable
from functools import partial
from pathlib import Path
from typing import Any

from dynamo_dist.cache.agree import next_compile
from dynamo_dist.cache.directory import CacheDir
from dynamo_dist.cache.fanout import HostSite
from dynamo_dist.cache.follow import install, recorded_build_seconds, stage
from dynamo_dist.cache.lead import compile_ahead, lead
from dynamo_dist.cache.localdir import private_local_dir, require_private_local_dir
from dynamo_dist.cache.lock import ALIVE_GRACE, Holder, Lock, Watch, owner_record
from dynamo_dist.cache.stats import log, warn_first
from dynamo_dist.cache.turn import Turn, compile_counted
from dynamo_dist.cache.wait import Outcome, Took, Upcoming, Wait
from dynamo_dist.dist.local import GroupInfo
from dynamo_dist.dynamo import inductor, patches

__all__ = ["SharedCache", "SharedSite"]

#: Seconds between two looks at the shared directory by a rank waiting there for a graph
#: another rank compiles: one stat of the entry's manifest. With fan-out only one rank
#: per host waits there, so this bounds a host's polling of an entry.
SHARED_POLL_S = 1.0
#: Before fan-out (``cache_fanout`` off), every waiting rank polled this often.
SHARED_POLL_UNBOUNDED_S = 0.5
#: Seconds between two looks at the holder of a key's lock by a rank waiting for it (a
#: walk, a listing and the lock file: about 7 operations). A dead holder is still found
#: within ``stale_after`` (at least 30 s) plus this.
LOCK_LOOK_S = 10.0


class SharedSite:
    """The shared directory as a place to wait: the entry itself, and the key's lock.

    Taking the lock makes this rank the graph's leader. While a live holder compiles,
    a pass only stats the entry's manifest; the lock is looked at every
    ``LOCK_LOOK_S`` (every pass without fan-out, where every rank polls).
    """

    problem = "taking the leader lock"
    failed: Outcome = ("fallback", None)
    # A leader alive but silent is most likely stuck, and taking over costs a compile.
    alive_grace = ALIVE_GRACE
    let_go_format = "%s finished compiling %s (%s) without publishing it; compiling locally"
    timed_out_format = "waited %.0fs for %s to publish %s (%s); compiling locally"
    waiting_format = "waiting for graph %s (%s) compiled by %s: %.0fs"

    def __init__(
        self,
        cache: SharedCache,
        key: str,
        factors: dict[str, Any],
        compile_fn: Callable[[], Any],
        label: str,
        turn: Turn,
    ) -> None:
        self.cache = cache
        self.key = key
        self.factors = factors
        self.compile_fn = compile_fn
        self.label = label
        self.turn = turn
        self.poll = SHARED_POLL_S if cache.fanout else SHARED_POLL_UNBOUNDED_S
        self.looked = -math.inf  # when the lock was last looked at

    def look(self) -> Outcome | None:
        entry, readable = self.cache.get_entry(self.key)
        if entry is not None:
            return "load", entry
        if not readable or not self.cache.writable:
            return "fallback", None  # this rank can neither load nor publish it
        return None

    def holder(self, seen: Holder | None) -> tuple[Holder | None, bool]:
        # A holder of this host found dead by its process (no file-system operation)
        # is looked at again at once, to be taken over.
        fresh = (
            seen is None
            or not self.cache.fanout
            or time.monotonic() - self.looked >= LOCK_LOOK_S
            or seen.dead_by_identity()
        )
        if not fresh:
            return seen, False  # between looks at the lock, only the entry is polled
        holder = self.cache.locks.holder(self.key)
        self.looked = time.monotonic()
        return holder, True

    def taking_over(self, holder: Holder, watch: Watch) -> None:
        log.warning(
            "the leader compiling %s for %s, %s, is gone (%s); taking over",
            self.key[:12],
            self.label,
            holder.describe(),
            watch.reason(holder),
        )

    def stuck(self, holder: Holder, watch: Watch, e: OSError) -> None:
        """A stale lock this rank cannot take over (a co-tenant's, in a directory it cannot
        write, or past the generations allowed): this graph is compiled locally, and at
        every later miss of it in this process at once, since the lock's silence is
        remembered (``lock.Watch``); said once per lock, with whose it is and the fix."""
        self.cache.counts.cache_errors += 1
        path = self.cache.locks.path(self.key, holder.gen)
        warn_first(
            f"stuck:{path}:{holder.inode}",
            "shared cache lock %s (owner uid %s) is stale (%s) and this rank cannot take "
            "it over (%s: %s): graph %s (%s) is compiled locally now and, in this process, "
            "at once at every later miss. Fix: have uid %s or an administrator remove it "
            "(rm -r %s), or clear the cache as them (dynamo-dist cache clear %s).",
            path,
            holder.uid,
            watch.reason(holder),
            type(e).__name__,
            e.strerror or e,
            self.key[:12],
            self.label,
            holder.uid,
            path,
            self.cache.root,
        )

    def take(self, over: Holder | None) -> Lock | None:
        return self.cache.locks.acquire(self.key, owner_record(self.cache.rank), over=over)

    def took(self, lock: Lock | None) -> Took:
        if lock is None:
            return None
        try:
            # Published while this rank took the lock: load it, do not recompile.
            entry, _ = self.cache.get_entry(self.key)
            if entry is not None:
                return "load", entry
            self.turn.note_phase("lead")
            lead(self.cache, self.key, self.factors, self.compile_fn, self.label, self.turn)
            return "leader", None
        finally:
            lock.release()

    def compiling(self, holder: Holder) -> bool:
        self.turn.note_phase("wait")
        return True


class SharedCache(CacheDir):
    """One shared cache directory, as seen from this process: the protocol over it."""

    def compile(
        self,
        key: str,
        factors: dict[str, Any],
        compile_fn: Callable[[], Any],
        label: str,
        upcoming: Callable[[], Iterable[Upcoming]] | None = None,
        *,
        group: GroupInfo | None = None,
        counts_loads: bool = True,
    ) -> Any:
        """Compile one graph through the cache: load it, lead its compile, or fall back.

        ``upcoming``: the graphs this rank will compile next, which it may compile and
        publish while it waits for another rank to publish this one (see
        :func:`dynamo_dist.cache.lead.compile_ahead`). ``group``: the group of the
        compile in progress, whose ranks agree on it (None: nobody, as for a compile
        inside ``dynamo_dist.local()``). ``counts_loads`` False: the caller counts a
        loaded graph itself, after loading it further (a precompiled artifact). Never
        raises an error of the cache's own: only what ``compile_fn`` raises.
        """
        # Numbered by compile within the group, not by key: ranks compiling
        # rank-specific graphs (different keys) still meet at the same agreement.
        n = next_compile(group) if self.agreement.applies(group) and group is not None else 0
        if private_local_dir() is None or not self.enabled:
            # Neither load nor lead (no usable or trusted directory, or nowhere safe to
            # install: the clean room would be there too). Still report, so peers that
            # could use the cache need not wait out the timeout for this rank.
            return self.compile_uncached(compile_fn, n, group=group)
        turn = Turn(self.rank, self.counts, self.agreement, n, group)
        try:
            return self._turn(key, factors, label, compile_fn, turn, upcoming)
        finally:
            turn.count(counts_loads)

    def _turn(
        self,
        key: str,
        factors: dict[str, Any],
        label: str,
        compile_fn: Callable[[], Any],
        turn: Turn,
        upcoming: Callable[[], Iterable[Upcoming]] | None,
    ) -> Any:
        """One compile through the cache; a failure of the cache's costs a local compile."""
        try:
            # Applied on every rank (leader and followers alike): it is part of
            # AOTAutograd's configuration, hence of its cache key.
            with patches.eager_backward_lowering():
                return self._through_cache(key, factors, label, compile_fn, turn, upcoming)
        except BaseException as e:
            # Report before the error goes anywhere, or the other ranks wait for this one.
            with contextlib.suppress(Exception):
                turn.let_go()
            turn.abstain()
            if turn.compile_raised or not isinstance(e, Exception):
                raise  # the compile's own error (or an interrupt): as without the cache
            self.local_problem("the cache protocol", key, e)
            log.debug("shared cache failure", exc_info=True)
        if turn.has_result:
            return turn.result
        return turn.compile(compile_fn)

    def _through_cache(
        self,
        key: str,
        factors: dict[str, Any],
        label: str,
        compile_fn: Callable[[], Any],
        turn: Turn,
        upcoming: Callable[[], Iterable[Upcoming]] | None = None,
    ) -> Any:
        role, entry = self._obtain(key, factors, compile_fn, label, turn, upcoming)
        if role != "load":
            # The host's other ranks find the copy a leader left, or see that this rank
            # compiles itself and compile too.
            turn.let_go()
        if role in ("fallback", "alongside"):
            # This rank compiles locally whatever the others say: its "no" goes out
            # without waiting, so it compiles now (alongside a leader still compiling)
            # and nobody waits for its compile to report.
            turn.abstain()
            if role == "fallback":
                return turn.compile(compile_fn)
            # Alongside: in a clean room too, publishing if the entry is still missing
            # when done. The lock's holder may be dead in a way no waiter can tell yet
            # (another host or PID namespace, not silent long enough): the graph must
            # not stay unpublished because of it. Two publishes of one graph are fine.
            lead(self, key, factors, compile_fn, label, turn, only_if_missing=True)
            return turn.result
        staging: Path | None = None
        if role == "load":
            assert entry is not None
            staging = stage(self, entry, turn)
            turn.let_go()  # the host-local copy is in place (or this rank gave up)
        # All or nothing: a rank installs the loaded entry only if every rank could,
        # so no rank runs different code for the same graph.
        ok = turn.agree(key, role == "leader" or staging is not None)
        if role == "leader":
            return turn.result
        installed = (
            staging is not None
            and entry is not None
            and install(self, key, entry, label, staging, ok)
        )
        if installed:
            assert entry is not None
            turn.installed = (self.source_of(entry), recorded_build_seconds(entry))
            # Every kernel came built: loading them needs no precompiled header.
            with inductor.cpp_kernels_load_only():
                return turn.compile(compile_fn)
        return turn.compile(compile_fn)

    def _obtain(
        self,
        key: str,
        factors: dict[str, Any],
        compile_fn: Callable[[], Any],
        label: str,
        turn: Turn,
        upcoming: Callable[[], Iterable[Upcoming]] | None = None,
    ) -> Outcome:
        """('load', entry), ('leader', None) with ``turn.result`` set, or ('fallback', None).

        With fan-out, from the host-local copy (:class:`HostSite`) unless this rank is
        the host's fetcher (``turn.fetch``) or the copy failed, then from the shared
        directory as before (:class:`SharedSite`): one wait, one deadline.
        """
        wait = Wait(
            timeout=self.timeout,
            log_interval=self.wait_log_interval,
            counts=self.counts,
            followers_compile=self.followers_compile,
            local_problem=self.local_problem,
            compile_ahead=partial(compile_ahead, self),
            upcoming=upcoming,
            start=time.monotonic(),
        )
        turn.host = self.hosts.store()
        if turn.host is not None:
            role, entry = wait.at(HostSite(turn.host, key, label, turn, self.counts))
            if role is not None:
                return role, entry
        return wait.at(SharedSite(self, key, factors, compile_fn, label, turn))

    def compile_uncached(
        self,
        compile_fn: Callable[[], Any],
        n: int | None = None,
        *,
        group: GroupInfo | None = None,
    ) -> Any:
        """Compile without the cache, telling the other ranks not to wait for this one.

        For graphs this rank cannot use the cache for (no key, cache off here): every
        rank of ``group`` compiles the same sequence of graphs, so each one still takes
        part in the n-th agreement, as a "no".
        """
        if self.agreement.applies(group):
            assert group is not None
            self.agreement.abstain(next_compile(group) if n is None else n, group)
        require_private_local_dir()  # never compiled where someone else could plant files
        return compile_counted(self.counts, compile_fn)
