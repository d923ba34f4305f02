"""Fan-out: the shared file system sees one reader per host, not one per rank.

Of the ranks of a host that need a graph, the first to take the key's lock in a
private host-local directory (:func:`host_copy_dir`, mode 0700, one per host and per
emulated host) is the host's fetcher: it alone looks at the shared entry and lock,
verifies and stages the entry as before, and leaves a copy of the verified bytes in the
host-local directory (``DiskStore.put_copy``) before it lets go. A leader leaves one too
when it publishes. The host's other ranks poll only that directory (:class:`HostSite`,
waited at like the shared directory: :mod:`dynamo_dist.cache.wait`), and verify the
copy as they would the shared entry before installing it. A fetcher that dies is taken
over by another local rank (found dead by its process, on this host, within a look), as
is one that made no progress for ``stale_after`` (its lock's heartbeat stopped: a
SIGSTOPped or frozen process); one that lets go without leaving a copy (it compiles
itself) makes its local ranks compile too, and a copy that fails verification sends
that rank to the shared entry itself: the timeout and the agreement bound all of it as
before.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import stat
import time
from pathlib import Path

from dynamo_dist.cache import fs, fs_tree
from dynamo_dist.cache.key import version_factors
from dynamo_dist.cache.localdir import private_local_dir
from dynamo_dist.cache.lock import Holder, Lock, Locks, Watch, owner_record
from dynamo_dist.cache.stats import CacheStats, emit_refusal, log, warn_once
from dynamo_dist.cache.store import DiskStore, Entry, EntryRefused
from dynamo_dist.cache.turn import Turn
from dynamo_dist.cache.wait import Outcome, Took
from dynamo_dist.dist import proc

__all__ = ["HOST_POLL_S", "HostCopies", "HostSite", "host_copy_dir"]

#: The host's other ranks poll only the host-local directory (local disk) this often.
HOST_POLL_S = 0.25


def host_tag() -> str:
    """This host's directory name under a local cache: host, boot and GROUP_RANK.

    GROUP_RANK (torchrun's node rank) tells emulated hosts on one machine apart, and
    the host name and boot id tell real hosts apart when ranks of several hosts use a
    local cache directory on a shared file system (a home directory).
    """
    ident = proc.identity()
    raw = f"{ident['host']}/{ident['boot']}/{os.environ.get('GROUP_RANK', '')}"
    return hashlib.sha256(raw.encode()).hexdigest()[:16]


#: Host-local directories of other runs untouched for this long are removed.
HOST_RUN_KEEP_S = 24 * 3600.0


def run_tag() -> str:
    """This run of the job: torchrun's run id and restart count (or its rendezvous).

    Host copies serve the ranks of one run only. Across runs and restarts the first
    rank of each host reads the shared directory again, so an entry cleared or pruned
    there is never loaded from a copy a host kept (and copies do not pile up).
    """
    env = os.environ
    run = (env.get("TORCHELASTIC_RUN_ID", ""), proc.restart_count())
    raw = "/".join([*run, env.get("MASTER_ADDR", ""), env.get("MASTER_PORT", "")])
    return hashlib.sha256(raw.encode()).hexdigest()[:16]


def _sweep_other_runs(host: Path, mine: str) -> None:
    """Remove this host's directories of runs untouched for ``HOST_RUN_KEEP_S`` (best effort).

    One dated ahead of the clock is as old as the time since it was first seen.
    """
    now = time.time()
    with contextlib.suppress(OSError), fs.walk(host, ()) as (host_fd,):
        for name, st in fs.entries(host_fd):
            if name == mine or not stat.S_ISDIR(st.st_mode):
                continue
            if fs_tree.untouched_for(host_fd, name, st, now) > HOST_RUN_KEEP_S:
                fs_tree.remove_tree(host_fd, name, owner=os.geteuid())


def host_copy_dir(local: Path) -> Path:
    """``<local>/dynamo_dist/hosts/<host tag>/<run tag>``, made private; OSError if not.

    The host's verified copies of shared entries live there, read by every local rank
    and then loaded, so each directory on the way is created 0700, opened without
    following a link, must be this user's, and is tightened to 0700 (being ours, and
    below the private ``local``). Its contents are verified again before use anyway.
    """
    hosts = fs.private_dir(local, ("dynamo_dist", "hosts", host_tag()))
    _sweep_other_runs(hosts, run_tag())
    return fs.private_dir(hosts, (run_tag(),))


class HostCopies:
    """This rank's host-local stores of verified copies, one per local cache directory.

    One per local cache directory (``private_local_dir`` may change with
    TORCHINDUCTOR_CACHE_DIR); a directory that cannot be made private costs the
    fan-out, with one warning: this rank then reads the shared directory itself.
    """

    def __init__(self, root: str, shared: DiskStore, fanout: bool) -> None:
        self.root = root
        self.shared = shared
        self.fanout = fanout
        self._stores: dict[Path, DiskStore | None] = {}

    def store(self) -> DiskStore | None:
        """The host-local store of verified copies (fan-out), or None without one."""
        if not self.fanout:
            return None
        local = private_local_dir()
        if local is None:
            return None
        if local not in self._stores:
            store: DiskStore | None = None
            try:
                store = DiskStore(host_copy_dir(local), self.shared.secret)
                store.check_usable()
            except OSError as e:
                store = None
                warn_once(
                    f"hostcopy:{local}",
                    "no private host-local directory for shared cache entries under %s "
                    "(%s: %s); this rank reads the shared directory %s itself",
                    local,
                    type(e).__name__,
                    e.strerror or e,
                    self.root,
                )
            self._stores[local] = store
        return self._stores[local]

    def store_of(self, entry: Entry) -> DiskStore:
        """The store ``entry`` was read from: a host-local one, or the shared directory."""
        for store in self._stores.values():
            if store is not None and entry.root == store.root:
                return store
        return self.shared


class HostSite:
    """The host-local directory as a place to wait: the host's copy, its fetch lock.

    The first rank of the host to take the key's lock there goes on to the shared
    directory as the host's fetcher (holding the lock in ``turn.fetch`` until its copy
    is in place); the others poll only the host-local directory.
    """

    poll = HOST_POLL_S
    # A fetcher that made no progress for ``stale_after`` is taken over even if its
    # process is there (SIGSTOPped, in a debugger, swapping): taking over costs one more
    # verified read of the shared entry, never a compile, while waiting on it held every
    # other rank of the host until their timeout (issue 30).
    alive_grace = 1
    problem = "taking the host fetch lock"
    failed: Outcome = (None, None)  # read the shared directory itself
    let_go_format = "%s stopped fetching %s (%s) for this host without a copy; compiling locally"
    timed_out_format = "waited %.0fs for %s to fetch %s (%s) for this host; compiling locally"
    waiting_format = "waiting for graph %s (%s) fetched for this host by %s: %.0fs"

    def __init__(
        self, host: DiskStore, key: str, label: str, turn: Turn, counts: CacheStats
    ) -> None:
        self.host = host
        self.key = key
        self.label = label
        self.turn = turn
        self.counts = counts
        self.locks = Locks(host)

    def look(self) -> Outcome | None:
        try:
            entry = self.host.get(self.key, expect=version_factors())
        except EntryRefused as e:
            # Ours and private, yet it fails verification: something wrote into it.
            # Not fatal: this rank reads the shared entry itself.
            self.counts.cache_refused += 1
            log.warning(
                "refused the host-local copy of shared cache entry %s (%s); moved it to %s "
                "and reading the shared entry instead",
                self.key[:12],
                e,
                self.host.refused,
            )
            emit_refusal(self.key, self.turn.rank, "host", str(e))
            self.turn.let_go()
            return None, None
        if entry is not None:
            self.turn.let_go()  # found after taking the lock: placed by the last fetcher
            return "load", entry
        if self.turn.fetch is not None:
            return None, None  # this rank fetches for the host
        return None

    def holder(self, seen: Holder | None) -> tuple[Holder | None, bool]:
        return self.locks.holder(self.key), True

    def taking_over(self, holder: Holder, watch: Watch) -> None:
        if holder.dead_by_identity() or not holder.regular:
            log.warning(
                "%s, fetching %s (%s) for this host, is gone; fetching it here",
                holder.describe(),
                self.key[:12],
                self.label,
            )
            return
        log.warning(
            "%s, fetching %s (%s) for this host, has made no progress (%s); fetching and "
            "verifying it here instead",
            holder.describe(),
            self.key[:12],
            self.label,
            watch.reason(holder),
        )

    def stuck(self, holder: Holder, watch: Watch, e: OSError) -> None:
        # The host-local directory is private: only a broken local disk gets here.
        warn_once(
            f"hoststuck:{self.host.root}:{type(e).__name__}",
            "cannot take over the host-local fetch lock of %s (%s: %s); this rank reads "
            "the shared cache itself",
            self.key[:12],
            type(e).__name__,
            e.strerror or e,
        )

    def take(self, over: Holder | None) -> Lock | None:
        return self.locks.acquire(
            self.key, {**owner_record(self.turn.rank), "phase": "fetch"}, over=over
        )

    def took(self, lock: Lock | None) -> Took:
        self.turn.fetch = lock
        self.turn.phase = "fetch"
        return "again"  # look at the copy once more: it may be new

    def compiling(self, holder: Holder) -> bool:
        # A graph is being compiled (by the fetcher, or by the rank it waits for): the
        # same choices as a rank waiting on the shared lock.
        return holder.record.get("phase") in ("wait", "lead")
