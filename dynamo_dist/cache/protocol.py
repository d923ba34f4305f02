"""The leader/follower protocol over one shared cache directory.

For each graph key the first rank to take the key's lock is its leader: it compiles in
a clean room (a fresh ``TORCHINDUCTOR_CACHE_DIR``), so everything inductor writes for
this graph (AOTAutograd and FX graph cache entries, compiled kernel ``.so`` files) lands
in one place, and publishes that directory as the entry. Shipping the kernels matters on
CPU, where a Mega-Cache blob lacks them and loading it still rebuilds every kernel with
gcc. The other ranks wait for the entry, verify it, stage it, and, once every rank
agreed it could (:mod:`._cache_agree`), unpack it into their own inductor cache and call
inductor, which then finds everything cached and compiles nothing. A restart finds the
entry at once. Where each rank has cores to spare (``cache_followers``), the others
compile alongside the leader instead of waiting, each in its own clean room, and
publish too if the entry is still missing when they are done.

Fan-out (``cache_fanout``): the shared file system sees one reader per host, not one
per rank. Of the ranks of a host that need a graph, the first to take the key's lock in
a private host-local directory (:func:`host_copy_dir`, mode 0700, one per host and per
emulated host) is the host's fetcher: it alone looks at the shared entry and lock,
verifies and stages the entry as before, and leaves a copy of the verified bytes in the
host-local directory (``DiskStore.put_copy``) before it lets go. A leader leaves one too
when it publishes. The host's other ranks poll only that directory, and verify the copy
as they would the shared entry before installing it. A fetcher that dies is taken over
by another local rank (found dead by its process, on this host, within a look), one that
lets go without leaving a copy (it compiles itself) makes its local ranks compile too,
and a copy that fails verification sends that rank to the shared entry itself: the
timeout and the agreement bound all of it as before. While a graph is compiled
elsewhere, a fetcher stats the entry's manifest once a second (``SHARED_POLL_S``) and
looks at its lock every ``LOCK_LOOK_S``.

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
import hashlib
import math
import os
import stat
import time
from collections.abc import Callable, Iterable, Iterator
from functools import partial
from pathlib import Path
from typing import Any

import torch.distributed as dist

from dynamo_dist._config import CACHE_SECRET_FILE_ENV
from dynamo_dist._errors import ConfigError
from dynamo_dist.cache import fs, fs_tree
from dynamo_dist.cache.agree import Agreement, next_compile
from dynamo_dist.cache.archive import extract
from dynamo_dist.cache.entries import Entry, EntryRefused, EntryUnavailable
from dynamo_dist.cache.fs_ops import FsOps
from dynamo_dist.cache.install import merge_into
from dynamo_dist.cache.key import version_factors
from dynamo_dist.cache.lock import Holder, Lock, Locks, Watch, owner_record, stale_after
from dynamo_dist.cache.rooms import ROOMS, staging_dir
from dynamo_dist.cache.secret import cache_secret
from dynamo_dist.cache.stats import (
    CacheStats,
    emit_load,
    emit_publish,
    emit_refusal,
    log,
    warn_once,
)
from dynamo_dist.cache.store import DiskStore
from dynamo_dist.dist import local as dist_local
from dynamo_dist.dist import proc
from dynamo_dist.dynamo import inductor, patches

__all__ = [
    "SharedCache",
    "Upcoming",
    "host_copy_dir",
    "local_inductor_dir",
    "private_local_dir",
    "require_private_local_dir",
]

#: A graph this rank will compile next, as (key, factors, compile_fn, label): what a rank
#: waiting for a leader may compile and publish meanwhile (DDPOptimizer's later pieces).
Upcoming = tuple[str, dict[str, Any], Callable[[], Any], str]


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


#: Tests only: two launches that must share their host copies name one run here.
HOST_RUN_ENV = "_DYNAMO_DIST_HOST_RUN"
#: Host-local directories of other runs untouched for this long are removed.
HOST_RUN_KEEP_S = 24 * 3600.0


def run_tag() -> str:
    """This run of the job: torchrun's run id and restart count (or its rendezvous).

    Host copies serve the ranks of one run only. Across runs and restarts the first
    rank of each host reads the shared directory again, so an entry cleared or pruned
    there is never loaded from a copy a host kept (and copies do not pile up).
    """
    env = os.environ
    raw = env.get(HOST_RUN_ENV) or "/".join(
        env.get(k, "")
        for k in ("TORCHELASTIC_RUN_ID", "TORCHELASTIC_RESTART_COUNT", "MASTER_ADDR", "MASTER_PORT")
    )
    return hashlib.sha256(raw.encode()).hexdigest()[:16]


def _sweep_other_runs(host: Path, mine: str) -> None:
    """Remove this host's directories of runs untouched for ``HOST_RUN_KEEP_S`` (best effort)."""
    now = time.time()
    with contextlib.suppress(OSError), fs.walk(host, ()) as (host_fd,):
        for name, st in fs.entries(host_fd):
            if name != mine and stat.S_ISDIR(st.st_mode) and now - st.st_mtime > HOST_RUN_KEEP_S:
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


def local_inductor_dir() -> Path:
    """This rank's inductor cache directory as inductor sees it now."""
    return Path(inductor.cache_dir())


def _private_problem(path: Path) -> str | None:
    """Why ``path`` is no private directory of ours (created 0700 if absent), or None.

    The whole tree is looked at once per process (by descriptor, bounded): a directory
    its owner made private after someone else could write it (torch creates it with
    the umask: 0775 under umask 002) may hold their files, which inductor would load.
    """
    try:
        fs.private_dir(path.parent, (path.name,))
        if path not in _trees_checked:
            problem = fs_tree.foreign_in_tree(path)
            if problem is not None:
                return problem
            _trees_checked.add(path)
    except OSError as e:
        return f"{e.filename}: {e.strerror}" if e.filename else str(e)
    return None


#: Local directories whose whole tree was found ours (once per process: a tree that is
#: ours, under a private top, cannot gain someone else's files afterwards).
_trees_checked: set[Path] = set()


def _replacement_dirs() -> list[tuple[Path, tuple[str, ...]]]:
    """Where this user's ranks keep inductor's cache when the configured one is not private."""
    xdg = os.environ.get("XDG_CACHE_HOME")
    home = os.path.expanduser("~")
    out: list[tuple[Path, tuple[str, ...]]] = []
    if xdg and os.path.isabs(xdg):
        out.append((Path(xdg), ("dynamo_dist", "inductor")))
    if home and os.path.isabs(home):
        out.append((Path(home), (".cache", "dynamo_dist", "inductor")))
    return out


def private_local_dir() -> Path | None:
    """This rank's inductor cache directory, private: the configured one, or a replacement.

    Verified entries are unpacked there, clean rooms and profiles are staged there, and
    inductor compiles and loads kernels from it, so a directory someone else created
    first (the default is under /tmp, where a co-tenant can pre-create
    ``torchinductor_<user>``) or can write would be a way to get code run. When the
    configured directory is not private, this process (every rank of this user on the
    host alike) switches inductor to ``$XDG_CACHE_HOME/dynamo_dist/inductor`` (or
    ``~/.cache/dynamo_dist/inductor``), created 0700 and checked all the way down, and
    says so once; failing that, to a fresh private temporary directory. None only if
    even that fails: then nothing is staged, led or loaded here.
    """
    path = Path(
        os.path.abspath(os.environ.get("TORCHINDUCTOR_CACHE_DIR") or inductor.default_cache_dir())
    )
    reason = _private_problem(path)
    if reason is None:
        _use_private_headers(path)
        return path
    for base, names in _replacement_dirs():
        with contextlib.suppress(OSError):
            parent = fs.private_dir(base, names[:-1], tighten=False)
            new = fs.private_dir(parent, names[-1:])
            if new != path and _private_problem(new) is None:  # its whole tree too
                return _switch_to(new, path, reason)
    with contextlib.suppress(OSError):
        # A fresh directory in the temp dir, only if that is a sticky or private parent
        # (in a group-writable one, another member could rename ours away and put theirs
        # in its place); made once per process, then found private like any other.
        return _switch_to(fs.private_temp_dir("dynamo_dist-inductor-"), path, reason)
    warn_once(
        f"local:{path}",
        "local inductor cache %s is not private (%s), and no private replacement could be "
        "made; the shared cache is not used by this rank. Fix: set TORCHINDUCTOR_CACHE_DIR "
        "to a new, empty directory of your own.",
        path,
        reason,
    )
    return None


def require_private_local_dir() -> Path:
    """:func:`private_local_dir`, or ConfigError: no compile in a directory others can fill.

    Where neither the configured directory nor any replacement is private (an unusable
    home and a group-writable temp dir), compiling there would load whatever a co-tenant
    put there, so the compile stops with the cause and the fix instead.
    """
    local = private_local_dir()
    if local is None:
        raise ConfigError(
            "TORCHINDUCTOR_CACHE_DIR: the local inductor cache "
            f"{inductor.cache_dir()} is not private to this user and no private "
            "replacement could be made ($XDG_CACHE_HOME, ~/.cache, the temp dir); with a "
            "shared cache nothing is compiled where another user could plant files. Fix: "
            "set TORCHINDUCTOR_CACHE_DIR to a new, empty directory of your own"
        )
    return local


def _use_private_headers(local: Path) -> None:
    """Inductor's precompiled headers go under ``local`` (private), not under /tmp.

    Inductor keeps them in ``/tmp/torchinductor_<user>/precompiled_headers`` whatever
    ``TORCHINDUCTOR_CACHE_DIR`` says, and compiles every CPU kernel with ``-include`` of
    a header found there: one planted there would be built into every kernel a leader
    publishes (found by the adversarial review of issue 26).
    """
    if local in _headers_moved:
        return  # once per directory: this runs at every compile
    with contextlib.suppress(OSError):
        headers = fs.private_dir(local, ("precompiled_headers",))
        inductor.use_precompiled_header_dir(str(headers))
        _headers_moved.clear()
        _headers_moved.add(local)


#: The private directory inductor's precompiled headers were last moved under.
_headers_moved: set[Path] = set()


def _switch_to(new: Path, old: Path, reason: str) -> Path:
    inductor.use_cache_dir(str(new))
    _use_private_headers(new)
    warn_once(
        f"local:{old}",
        "local inductor cache %s is not private (%s): nothing is compiled, staged or loaded "
        "there; this process uses %s instead (mode 0700). Fix: set TORCHINDUCTOR_CACHE_DIR "
        "to a new, empty directory of your own.",
        old,
        reason,
        new,
    )
    return new


class _Turn:
    """One compile through the cache: its agreement ticket, and what the compile did.

    The cache wraps the real compile; when the cache machinery fails, this tells an
    error of the compile itself (re-raised, as without the cache) from one of ours
    (a local compile instead), whether a result already exists (never compile twice),
    and whether this rank already reported at the agreement (never report twice).
    """

    def __init__(self, cache: SharedCache, n: int, scope: dist_local.Scope | None) -> None:
        self.cache = cache
        self.n = n
        self.scope = scope
        self.reported = False
        self.compile_raised = False
        self.has_result = False
        self.result: Any = None
        self.looked = False  # counted as a hit or a miss
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
            self.fetch.note({**owner_record(self.cache.rank), "phase": phase})

    def let_go(self) -> None:
        """Release the host's fetch lock (after leaving a copy, or giving up)."""
        if self.fetch is not None:
            fetch, self.fetch = self.fetch, None
            fetch.release()

    def count_look(self, found: bool) -> None:
        if not self.looked:
            self.looked = True
            if found:
                self.cache.counts.cache_hits += 1
            else:
                self.cache.counts.cache_misses += 1

    def compile(self, compile_fn: Callable[[], Any]) -> Any:
        try:
            self.result = self.cache._compile_counted(compile_fn)
        except BaseException:
            self.compile_raised = True
            raise
        self.has_result = True
        return self.result

    def agree(self, key: str, ok: bool) -> bool:
        """All-or-nothing with the other ranks of the scope (or just ``ok`` without any)."""
        if self.reported or not self.cache.agreement.applies(self.scope):
            return ok and not self.reported
        assert self.scope is not None
        self.reported = True
        return self.cache.agreement.agree(key, self.n, ok, self.scope) and ok

    def peers_said_no(self) -> bool:
        """Whether another rank already reported "no" for this compile (see agree)."""
        return not self.reported and self.cache.agreement.decided_no(self.n, self.scope)

    def abstain(self) -> None:
        if not self.reported:
            self.reported = True
            self.cache.agreement.abstain(self.n, self.scope)


class SharedCache:
    """One shared cache directory, as seen from this process."""

    def __init__(
        self,
        root: str,
        timeout: float,
        wait_log_interval: float,
        agree: bool,
        followers_compile: bool = False,
        fanout: bool = True,
    ) -> None:
        self.root = root
        # One rank per host reads each entry from the shared directory (module docstring).
        self.fanout = fanout
        self._hosts: dict[Path, DiskStore | None] = {}
        # Compile a graph another rank is compiling, instead of waiting to load it.
        self.followers_compile = followers_compile
        self.store = DiskStore(root, cache_secret())  # ConfigError if misconfigured
        self.locks = Locks(self.store)
        self.timeout = timeout
        self.wait_log_interval = wait_log_interval
        self.agree_across_ranks = agree
        self.rank = dist.get_rank() if dist.is_initialized() else 0
        self.world_size = dist.get_world_size() if dist.is_initialized() else 1
        self.enabled = True
        # False for a cache this rank can read but not write (a pre-populated, read-only
        # directory): it loads entries and compiles what is missing itself.
        self.writable = True
        self.counts = CacheStats()
        # Precompiled artifacts this process holds, by key: the identical blocks of a
        # model (torchtitan compiles each on its own) share one, checked per instance.
        self.artifacts: dict[str, Any] = {}
        self.agreement = Agreement(timeout, agree)
        # Before anything is traced: Dynamo reads its own state from the local cache
        # (``code_state_<job>.pkl`` with a user job_id) while tracing the first frame.
        private_local_dir()
        try:
            self.store.check_usable()
        except OSError as e:
            if self._readable():
                self.writable = False
                warn_once(
                    f"readonly:{root}",
                    "shared cache directory %s is read-only for this rank (%s: %s): loading "
                    "the entries it has; graphs it lacks are compiled locally and not "
                    "published. Fix, if this rank should publish: make it writable.",
                    root,
                    type(e).__name__,
                    e.strerror or e,
                )
            else:
                self.enabled = False
                warn_once(
                    f"unusable:{root}",
                    "shared cache directory %s is unusable (%s: %s); training continues "
                    "without the shared cache. Fix: point cache_dir / DYNAMO_DIST_CACHE_DIR "
                    "at a writable directory every rank can reach.",
                    root,
                    type(e).__name__,
                    e.strerror or e,
                )
        if self.enabled and self.store.secret is None:
            self._check_unsigned_is_safe()
        # The operations above are made once per process; what is counted from here on
        # is the per-entry traffic.
        self.setup_fs_ops = self.store.ops.total
        self.store.ops = FsOps()

    def _readable(self) -> bool:
        """Whether this namespace's entries can be listed (for a read-only cache)."""
        try:
            with self.store.walk("entries", self.store.namespace) as fds:
                fs.names(fds[-1])
                return True
        except OSError:
            return False

    def _check_unsigned_is_safe(self) -> None:
        """Without a secret, load only from a directory nobody else can write.

        A sha256 in the manifest proves nothing: whoever can edit an entry can
        recompute it, and loading an entry runs its code on every rank.
        """
        reason = fs.untrusted_reason(self.root)
        if reason is None:
            return
        self.enabled = False
        warn_once(
            f"untrusted:{self.root}",
            "shared cache directory %s can be written by others (%s), and without a secret "
            "an entry cannot be told from a forged one: not loading unsigned entries from "
            "it; compiling without the shared cache. Fix: set %s to a file (mode 0600) "
            "holding a random secret on every rank, or use a private directory (owned by "
            "this user, mode 0700, no parent writable by others).",
            self.root,
            reason,
            CACHE_SECRET_FILE_ENV,
        )

    def stats(self) -> dict[str, Any]:
        """This directory's counters, under the keys ``dynamo_dist.stats()`` reports."""
        return {
            **self.counts.as_dict(),
            **self.store.ops.as_dict("shared_fs_"),
            "shared_fs_setup": self.setup_fs_ops,
            "cache_dir": self.root,
            "cache_enabled": self.enabled,
            "cache_writable": self.enabled and self.writable,
        }

    def _compile_counted(self, compile_fn: Callable[[], Any]) -> Any:
        before = inductor.fxgraph_cache_misses()
        try:
            return compile_fn()
        finally:
            after = inductor.fxgraph_cache_misses()
            self.counts.inductor_compiles += after - before

    def _local_problem(self, what: str, key: str, e: BaseException) -> None:
        """One warning per kind of local problem; the compile goes on without the cache."""
        self.counts.cache_errors += 1
        warn_once(
            f"{what}:{self.root}:{type(e).__name__}",
            "shared cache %s: %s for graph %s failed (%s: %s); compiling locally. The "
            "shared entries are untouched; training is not affected.",
            self.root,
            what,
            key[:12],
            type(e).__name__,
            e,
        )

    # -- the protocol ----------------------------------------------------------------
    def compile(
        self,
        key: str,
        factors: dict[str, Any],
        compile_fn: Callable[[], Any],
        label: str,
        upcoming: Callable[[], Iterable[Upcoming]] | None = None,
    ) -> Any:
        """Compile one graph through the cache: load it, lead its compile, or fall back.

        ``upcoming``: the graphs this rank will compile next, which it may compile and
        publish while it waits for another rank to publish this one (see
        :meth:`_compile_ahead`). Never raises an error of the cache's own: only what
        ``compile_fn`` raises.
        """
        # Numbered by compile within the group, not by key: ranks compiling
        # rank-specific graphs (different keys) still meet at the same agreement. A
        # compile inside dynamo_dist.local() has no scope: it agrees with nobody.
        scope = dist_local.current_scope()
        n = next_compile(scope) if self.agreement.applies(scope) and scope is not None else 0
        if private_local_dir() is None or not self.enabled:
            # Neither load nor lead (no usable or trusted directory, or nowhere safe to
            # install: the clean room would be there too). Still report, so peers that
            # could use the cache need not wait out the timeout for this rank.
            return self.compile_uncached(compile_fn, n)
        turn = _Turn(self, n, scope)
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
            self._local_problem("the cache protocol", key, e)
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
        turn: _Turn,
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
            self._lead(key, factors, compile_fn, label, turn, only_if_missing=True)
            return turn.result
        staging: Path | None = None
        installed = False
        if role == "load":
            assert entry is not None
            staging = self._stage(entry, turn)
            turn.let_go()  # the host-local copy is in place (or this rank gave up)
        # All or nothing: a rank installs the loaded entry only if every rank could,
        # so no rank runs different code for the same graph.
        ok = turn.agree(key, role == "leader" or staging is not None)
        if role == "leader":
            return turn.result
        if staging is not None:
            try:
                if ok and entry is not None:
                    try:
                        local = local_inductor_dir()
                        ROOMS.record_installed(local, merge_into(staging, local))
                    except OSError as e:
                        # A local problem (a full disk, a link planted in the local
                        # cache): not the shared entry's fault either.
                        self._local_problem("installing the entry", key, e)
                    else:
                        self._loaded(key, entry, label)
                        installed = True
                else:
                    log.info("not every rank could load %s; compiling locally", key[:12])
            finally:
                fs_tree.remove_path(staging, owner=os.geteuid())
        if installed:
            # Every kernel came built: loading them needs no precompiled header.
            with inductor.cpp_kernels_load_only():
                return turn.compile(compile_fn)
        return turn.compile(compile_fn)

    def _loaded(self, key: str, entry: Entry, label: str) -> None:
        """Count, log and emit one installed entry."""
        seconds = entry.manifest.get("compile_seconds", 0)
        if not isinstance(seconds, int | float) or not math.isfinite(seconds) or seconds < 0:
            seconds = 0.0
        owner = entry.manifest.get("owner")
        owner_rank = owner.get("rank") if isinstance(owner, dict) else None
        if not isinstance(owner_rank, int) or isinstance(owner_rank, bool):
            owner_rank = None
        self.counts.cache_loads += 1
        if self._store_of(entry) is not self.store:
            self.counts.cache_host_loads += 1
        self.counts.compile_seconds_saved += float(seconds)
        log.info("loaded %s for %s (compiled by rank %s)", key[:12], label, owner_rank)
        emit_load(key, label, owner_rank, self.rank, float(seconds))

    def _get(self, key: str) -> tuple[Entry | None, bool]:
        """(the verified entry or None, whether this rank can read the cache for ``key``)."""
        try:
            return self.store.get(key, expect=version_factors()), True
        except EntryUnavailable as e:
            self._local_problem("reading the entry", key, e)
            return None, False
        except EntryRefused as e:
            self.counts.cache_refused += 1
            log.warning(
                "refused shared cache entry %s (%s); moved it to %s and recompiling",
                key[:12],
                e,
                self.store.refused,
            )
            emit_refusal(key, self.rank, "verify", str(e))
            return None, True
        except OSError as e:
            self._local_problem("reading the cache", key, e)
            return None, False

    def _host_store(self) -> DiskStore | None:
        """The host-local store of verified copies (fan-out), or None without one.

        One per local cache directory (``private_local_dir`` may change with
        TORCHINDUCTOR_CACHE_DIR); a directory that cannot be made private costs the
        fan-out, with one warning: this rank then reads the shared directory itself.
        """
        if not self.fanout:
            return None
        local = private_local_dir()
        if local is None:
            return None
        if local not in self._hosts:
            store: DiskStore | None = None
            try:
                store = DiskStore(host_copy_dir(local), self.store.secret)
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
            self._hosts[local] = store
        return self._hosts[local]

    def _store_of(self, entry: Entry) -> DiskStore:
        """The store ``entry`` was read from: a host-local one, or the shared directory."""
        for store in self._hosts.values():
            if store is not None and entry.root == store.root:
                return store
        return self.store

    def _obtain(
        self,
        key: str,
        factors: dict[str, Any],
        compile_fn: Callable[[], Any],
        label: str,
        turn: _Turn,
        upcoming: Callable[[], Iterable[Upcoming]] | None = None,
    ) -> tuple[str, Entry | None]:
        """('load', entry), ('leader', None) with ``turn.result`` set, or ('fallback', None).

        With fan-out, from the host-local copy (:meth:`_from_host`) unless this rank is
        the host's fetcher (``turn.fetch``) or the copy failed, then from the shared
        directory as before (:meth:`_from_shared`).
        """
        start = time.monotonic()
        turn.host = self._host_store()
        if turn.host is not None:
            role, entry = self._from_host(turn.host, key, label, turn, upcoming, start)
            if role is not None:
                return role, entry
        return self._from_shared(key, factors, compile_fn, label, turn, upcoming, start)

    def _from_host(
        self,
        host: DiskStore,
        key: str,
        label: str,
        turn: _Turn,
        upcoming: Callable[[], Iterable[Upcoming]] | None,
        start: float,
    ) -> tuple[str | None, Entry | None]:
        """Wait for the host-local copy of ``key``; (None, None): go to the shared directory.

        The first rank of the host to take the key's lock in the host-local directory
        goes on to the shared directory as the host's fetcher (holding the lock in
        ``turn.fetch`` until its copy is in place); the others poll only the host-local
        directory. Bounded like the shared wait: every pass sleeps and checks the
        deadline.
        """
        next_log = start + self.wait_log_interval
        delay = 0.02
        watch = Watch(stale_after(self.timeout))
        locks = Locks(host)
        seen: Holder | None = None  # the last live fetcher this rank waited for
        relooked = False  # looked at the copy again after its fetcher let go
        ahead: Iterator[Upcoming] | None = None
        while True:
            try:
                entry = host.get(key, expect=version_factors())
            except EntryRefused as e:
                # Ours and private, yet it fails verification: something wrote into it.
                # Not fatal: this rank reads the shared entry itself.
                self.counts.cache_refused += 1
                log.warning(
                    "refused the host-local copy of shared cache entry %s (%s); moved it to %s "
                    "and reading the shared entry instead",
                    key[:12],
                    e,
                    host.refused,
                )
                emit_refusal(key, self.rank, "host", str(e))
                turn.let_go()
                return None, None
            if entry is not None:
                turn.count_look(True)
                turn.let_go()  # found after taking the lock: placed by the last fetcher
                return "load", entry
            if turn.fetch is not None:
                return None, None  # this rank fetches for the host
            try:
                holder = locks.holder(key)
                if holder is None:
                    if seen is not None and not relooked:
                        # The copy may have landed between the two looks: one more.
                        relooked = True
                        continue
                    if seen is not None:
                        # The fetcher let go without leaving a copy: it compiles the graph
                        # itself (it could not read or publish it, or timed out), so
                        # nobody will install the entry; compile now, all at once.
                        turn.count_look(False)
                        self.counts.cache_fallbacks += 1
                        log.info(
                            "%s stopped fetching %s (%s) for this host without a copy; "
                            "compiling locally",
                            seen.describe(),
                            key[:12],
                            label,
                        )
                        return "fallback", None
                    turn.fetch = locks.acquire(key, {**owner_record(self.rank), "phase": "fetch"})
                    turn.phase = "fetch"
                    continue  # look at the copy once more: it may be new
                if watch.dead(holder):
                    log.warning(
                        "%s, fetching %s (%s) for this host, is gone; fetching it here",
                        holder.describe(),
                        key[:12],
                        label,
                    )
                    turn.fetch = locks.acquire(
                        key, {**owner_record(self.rank), "phase": "fetch"}, over=holder
                    )
                    turn.phase = "fetch"
                    continue
            except OSError as e:
                self._local_problem("taking the host fetch lock", key, e)
                return None, None  # read the shared directory itself
            turn.count_look(False)
            seen = holder
            if holder.record.get("phase") in ("wait", "lead"):
                # A graph is being compiled (by the fetcher, or by the rank it waits for):
                # the same choices as a rank waiting on the shared lock.
                role = self._instead_of_waiting(holder, key, label, turn)
                if role is not None:
                    return role, None
                if upcoming is not None:
                    ahead = iter(upcoming()) if ahead is None else ahead
                    if self._compile_ahead(ahead, label):
                        continue
            now = time.monotonic()
            if now - start >= self.timeout:
                self.counts.cache_fallbacks += 1
                log.warning(
                    "waited %.0fs for %s to fetch %s (%s) for this host; compiling locally",
                    now - start,
                    seen.describe(),
                    key[:12],
                    label,
                )
                return "fallback", None
            if now >= next_log:
                next_log = now + self.wait_log_interval
                log.warning(
                    "waiting for graph %s (%s) fetched for this host by %s: %.0fs",
                    key[:12],
                    label,
                    seen.describe(),
                    now - start,
                )
            time.sleep(delay)
            delay = min(delay * 1.5, HOST_POLL_S)

    def _from_shared(
        self,
        key: str,
        factors: dict[str, Any],
        compile_fn: Callable[[], Any],
        label: str,
        turn: _Turn,
        upcoming: Callable[[], Iterable[Upcoming]] | None,
        start: float,
    ) -> tuple[str, Entry | None]:
        """Load, lead or fall back, looking at the shared directory itself.

        Every pass of the loop sleeps and checks the deadline: nothing found on disk
        (a lock that cannot be read, a FIFO, a directory where a file should be) can
        make it spin or outlast ``timeout``. While a live holder compiles, a pass only
        stats the entry's manifest; the lock is looked at every ``LOCK_LOOK_S``.
        """
        next_log = start + self.wait_log_interval
        delay = 0.02
        poll = SHARED_POLL_S if self.fanout else SHARED_POLL_UNBOUNDED_S
        watch = Watch(stale_after(self.timeout))
        seen: Holder | None = None  # the last live holder this rank waited for
        relooked = False  # looked at the entry again after its leader let go
        looked = -math.inf
        ahead: Iterator[Upcoming] | None = None
        while True:
            entry, readable = self._get(key)
            if entry is not None:
                turn.count_look(True)
                return "load", entry
            turn.count_look(False)
            if not readable or not self.writable:
                return "fallback", None  # this rank can neither load nor publish it
            try:
                # A holder of this host found dead by its process (no file-system
                # operation) is looked at again at once, to be taken over.
                fresh = (
                    seen is None
                    or not self.fanout
                    or time.monotonic() - looked >= LOCK_LOOK_S
                    or seen.dead_by_identity()
                )
                if fresh:
                    holder = self.locks.holder(key)
                    looked = time.monotonic()
                else:
                    holder = seen  # between looks at the lock, only the entry is polled
                if holder is None and seen is not None and not relooked:
                    # The entry may have landed between the two looks: one more.
                    relooked = True
                    continue
                if holder is None and seen is not None:
                    # The leader let go without publishing (its publish failed, or it was
                    # refused): compile now, all at once, rather than lead one by one.
                    log.info(
                        "%s finished compiling %s (%s) without publishing it; compiling locally",
                        seen.describe(),
                        key[:12],
                        label,
                    )
                    self.counts.cache_fallbacks += 1
                    return "fallback", None
                lock = None
                if holder is None:
                    lock = self.locks.acquire(key, owner_record(self.rank))
                elif fresh and watch.dead(holder):
                    log.warning(
                        "the leader compiling %s for %s, %s, is gone (%s); taking over",
                        key[:12],
                        label,
                        holder.describe(),
                        "its process has exited"
                        if holder.dead_by_identity()
                        else f"no heartbeat for {watch.silent_for(holder):.0f}s",
                    )
                    lock = self.locks.acquire(key, owner_record(self.rank), over=holder)
                else:
                    seen = holder
                    turn.note_phase("wait")
                    role = self._instead_of_waiting(holder, key, label, turn)
                    if role is not None:
                        return role, None
                    if upcoming is not None:
                        ahead = iter(upcoming()) if ahead is None else ahead
                        if self._compile_ahead(ahead, label):
                            continue  # look again at once: the wait was spent compiling
            except OSError as e:
                self._local_problem("taking the leader lock", key, e)
                return "fallback", None
            if lock is not None:
                try:
                    # Published while this rank took the lock: load it, do not recompile.
                    entry, _ = self._get(key)
                    if entry is not None:
                        return "load", entry
                    turn.note_phase("lead")
                    self._lead(key, factors, compile_fn, label, turn)
                    return "leader", None
                finally:
                    lock.release()
            now = time.monotonic()
            if now - start >= self.timeout:
                self.counts.cache_fallbacks += 1
                log.warning(
                    "waited %.0fs for %s to publish %s (%s); compiling locally",
                    now - start,
                    seen.describe() if seen else "another rank",
                    key[:12],
                    label,
                )
                return "fallback", None
            if now >= next_log and seen is not None:
                next_log = now + self.wait_log_interval
                log.warning(
                    "waiting for graph %s (%s) compiled by %s: %.0fs",
                    key[:12],
                    label,
                    seen.describe(),
                    now - start,
                )
            time.sleep(delay)
            delay = min(delay * 1.5, poll)

    def _compile_ahead(self, ahead: Iterator[Upcoming], waiting_for: str) -> bool:
        """While waiting for a leader, lead one graph this rank compiles next; True if it did.

        DDPOptimizer compiles a DDP graph piece by piece, each piece's example inputs
        coming from the one before, so a rank waiting for another to publish piece k
        would otherwise idle while that rank goes on to lead piece k+1 too: the pieces
        compiled one after another on one rank. Here the waiting rank leads the first
        later piece nobody has published or locked, publishes it and goes back to
        waiting, so the pieces compile on several ranks at once.

        Taking the lock, the clean room and the publish are a leader's; nothing is
        agreed (no rank installs anything now) and the compiled result is dropped:
        when this rank reaches that piece it loads the entry like every rank. An entry
        keyed for a graph nobody then compiles is never loaded, so a wrong guess about
        what comes next costs a compile, never a result. Any failure ends the
        look-ahead for this wait and is otherwise ignored.
        """
        try:
            for key, factors, compile_fn, label in ahead:
                entry, readable = self._get(key)
                if entry is not None or not readable or self.locks.holder(key) is not None:
                    continue
                lock = self.locks.acquire(key, owner_record(self.rank))
                if lock is None:
                    continue
                try:
                    if self._get(key)[0] is None:
                        log.info(
                            "compiling %s (%s) while waiting for %s",
                            key[:12],
                            label,
                            waiting_for,
                        )
                        if self._compile_and_publish(
                            key,
                            factors,
                            partial(self._compile_counted, compile_fn),
                            label,
                            in_room_only=True,
                        ):
                            self.counts.cache_compiled_ahead += 1
                finally:
                    lock.release()
                return True
        except Exception as e:
            log.info("stopped compiling ahead (%s: %s)", type(e).__name__, e)
            log.debug("compiling ahead failed", exc_info=True)
            close = getattr(ahead, "close", None)
            if callable(close):
                close()  # a closed generator yields nothing: later passes skip it
        return False

    def _instead_of_waiting(self, holder: Holder, key: str, label: str, turn: _Turn) -> str | None:
        """'alongside' or 'fallback' if this rank should compile now, not wait for ``holder``."""
        if self.followers_compile:
            log.info(
                "%s is compiling %s (%s); compiling it here too (cache_followers)",
                holder.describe(),
                key[:12],
                label,
            )
            self.counts.cache_compiled_alongside += 1
            return "alongside"
        if turn.peers_said_no():
            # A rank compiles this graph itself (it cannot use the cache, or compiles
            # alongside): nobody will install the entry, so waiting for it would only
            # delay this rank's own compile.
            log.info(
                "another rank compiles %s (%s) itself; compiling it here now instead of "
                "waiting for %s",
                key[:12],
                label,
                holder.describe(),
            )
            self.counts.cache_fallbacks += 1
            return "fallback"
        return None

    def _lead(
        self,
        key: str,
        factors: dict[str, Any],
        compile_fn: Callable[[], Any],
        label: str,
        turn: _Turn,
        only_if_missing: bool = False,
    ) -> None:
        """Compile in a clean room and publish everything inductor wrote as the entry.

        ``only_if_missing``: a rank that compiled alongside the lock's holder publishes
        only if the holder has not (yet) published.
        """
        self._compile_and_publish(
            key, factors, lambda: turn.compile(compile_fn), label, only_if_missing
        )

    def _compile_and_publish(
        self,
        key: str,
        factors: dict[str, Any],
        run: Callable[[], Any],
        label: str,
        only_if_missing: bool = False,
        in_room_only: bool = False,
    ) -> bool:
        """Run ``run`` in a clean room and publish what it wrote; whether it ran there.

        ``in_room_only``: without a room, do not run at all (a compile ahead, whose
        result nobody would use).
        """
        local = local_inductor_dir()
        try:
            room = ROOMS.make_room(local, key)
        except OSError as e:
            # No room (a read-only or full local cache): compile the plain way, publish
            # nothing; the followers see the lock released and compile themselves. The
            # local directory is checked again first (it may be why no room could be
            # made), so the compile never happens in one someone else could fill.
            self._local_problem("making a clean room", key, e)
            if not in_room_only:
                require_private_local_dir()
                run()
            return False
        t0 = time.monotonic()
        with inductor.cache_dir_override(room):
            run()
        seconds = time.monotonic() - t0
        try:
            ROOMS.record_room(room)
            ROOMS.complete(room)
        except OSError as e:
            self._local_problem("completing the entry's kernels", key, e)
        if not only_if_missing or self._get(key)[0] is None:
            self._publish(key, factors, label, room, seconds)
        # Keep this rank's own inductor cache warm too, for local restarts.
        try:
            ROOMS.record_installed(local, merge_into(room, local))
        except OSError as e:
            self._local_problem("keeping a local copy", key, e)
        return True

    def _publish(
        self, key: str, factors: dict[str, Any], label: str, room: Path, seconds: float
    ) -> None:
        manifest = {
            "factors": factors,
            "owner": owner_record(self.rank),
            "label": label,
            "compile_seconds": round(seconds, 3),
            "created": time.time(),
        }
        try:
            written = self.store.put(key, ROOMS.members(room), manifest)
        except Exception as e:  # never the job's end: the others compile themselves
            self.counts.cache_errors += 1
            warn_once(
                f"write:{self.root}:{type(e).__name__}",
                "cannot publish to the shared cache %s (%s: %s); training continues, "
                "other ranks will compile themselves",
                self.root,
                type(e).__name__,
                e,
            )
            return
        host = self._host_store()
        if host is not None and written:
            # The host's other ranks load this copy: none of them reads the shared one.
            # Only the entry that won the publish: a leader that lost the race runs its
            # own build, but its host's ranks must not (they compile, like any rank
            # whose fetcher left no copy, and the agreement keeps all ranks together).
            try:
                host.put(key, ROOMS.members(room), manifest)
            except Exception as e:
                self._local_problem("keeping a host-local copy", key, e)
        if written:
            self.counts.cache_publishes += 1
            self.counts.cache_bytes_written += written
            log.info(
                "published %s for %s (%d bytes, compiled in %.1fs)",
                key[:12],
                label,
                written,
                seconds,
            )
            emit_publish(key, label, self.rank, written, seconds)

    def _stage(self, entry: Entry, turn: _Turn | None = None) -> Path | None:
        """Unpack a verified entry beside the local cache; None on any failure.

        Only an entry proven bad (EntryRefused) is moved aside; a local failure (a full
        or read-only disk, EntryUnavailable) leaves the shared entry for the others.
        The host's fetcher (``turn.fetch``) also leaves the verified bytes it unpacked
        in the host-local store, for the host's other ranks.
        """
        store = self._store_of(entry)
        host = turn.host if turn is not None and turn.fetch is not None else None
        if store is not self.store:
            host = None  # already a host-local copy
        # An unpredictable name (mkdtemp, 0700) directly inside the private local cache:
        # nothing can be planted in it while it waits for the other ranks' agreement.
        local = local_inductor_dir()
        try:
            staging = staging_dir(local, entry.key)
        except OSError as e:
            self._local_problem("unpacking the entry", entry.key, e)
            return None
        try:
            if host is None:
                self.counts.cache_bytes_read += extract(entry, staging)
                return staging
            with fs.anonymous_file(local) as keep:
                self.counts.cache_bytes_read += extract(entry, staging, keep)
                try:
                    host.put_copy(entry.key, entry.manifest, keep)
                    self.counts.cache_host_fetches += 1
                except Exception as e:  # the others compile; this rank installs
                    self._local_problem("keeping a host-local copy", entry.key, e)
            return staging
        except EntryUnavailable as e:
            fs_tree.remove_path(staging, owner=os.geteuid())
            self._local_problem("unpacking the entry", entry.key, e)
            return None
        except EntryRefused as e:
            fs_tree.remove_path(staging, owner=os.geteuid())
            if not store.refuse(entry.path, f"unpacking failed: {e}", ident=entry.ident):
                # Not the directory verified any more (republished, or changed: the next
                # look verifies it anew), or already moved: nothing to refuse here.
                self._local_problem("unpacking the entry", entry.key, e)
                return None
            self.counts.cache_refused += 1
            log.warning(
                "refused shared cache entry %s (unpacking failed: %s); recompiling",
                entry.key[:12],
                e,
            )
            emit_refusal(entry.key, self.rank, "unpack", f"unpacking failed: {e}")
            return None
        except Exception as e:  # OSError and anything unforeseen: not proven bad
            fs_tree.remove_path(staging, owner=os.geteuid())
            self._local_problem("unpacking the entry", entry.key, e)
            return None

    def compile_uncached(self, compile_fn: Callable[[], Any], n: int | None = None) -> Any:
        """Compile without the cache, telling the other ranks not to wait for this one.

        For graphs this rank cannot use the cache for (no key, cache off here): every
        rank compiles the same sequence of graphs, so each one still takes part in the
        n-th agreement, as a "no".
        """
        scope = dist_local.current_scope()
        if self.agreement.applies(scope):
            assert scope is not None
            self.agreement.abstain(next_compile(scope) if n is None else n, scope)
        require_private_local_dir()  # never compiled where someone else could plant files
        return self._compile_counted(compile_fn)
