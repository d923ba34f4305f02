"""One shared cache directory as this rank finds it: usable, read-only, or off.

Opening it checks what this rank may do with it (load and publish, load only, or
nothing: an unusable directory, or one others can write without a secret to tell a
forged entry), once per process, with one warning per problem. It holds what every
part of the protocol uses: the store and its locks, the host-local copies (fan-out),
the agreement, the counters, the verified look-up of an entry, and the one warning of
a local problem that makes a compile go on without the cache.
"""

from __future__ import annotations

from typing import Any

import torch.distributed as dist

from dynamo_dist._config import CACHE_SECRET_FILE_ENV
from dynamo_dist.cache import fs
from dynamo_dist.cache.agree import Agreement
from dynamo_dist.cache.fanout import HostCopies
from dynamo_dist.cache.key import version_factors
from dynamo_dist.cache.localdir import private_local_dir
from dynamo_dist.cache.lock import Locks
from dynamo_dist.cache.secret import cache_secret
from dynamo_dist.cache.stats import CacheStats, emit_refusal, log, warn_once
from dynamo_dist.cache.store import DiskStore, Entry, EntryRefused, EntryUnavailable, FsOps

__all__ = ["CacheDir"]


class CacheDir:
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
        # Compile a graph another rank is compiling, instead of waiting to load it.
        self.followers_compile = followers_compile
        self.store = DiskStore(root, cache_secret())  # ConfigError if misconfigured
        self.locks = Locks(self.store)
        self.hosts = HostCopies(root, self.store, fanout)
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

    def source_of(self, entry: Entry) -> str:
        """Where ``entry`` was read: "host_copy" (fan-out's host-local copy) or "shared"."""
        return "shared" if self.hosts.store_of(entry) is self.store else "host_copy"

    def local_problem(self, what: str, key: str, e: BaseException) -> None:
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

    def get_entry(self, key: str) -> tuple[Entry | None, bool]:
        """(the verified entry or None, whether this rank can read the cache for ``key``)."""
        try:
            return self.store.get(key, expect=version_factors()), True
        except EntryUnavailable as e:
            self.local_problem("reading the entry", key, e)
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
            self.local_problem("reading the cache", key, e)
            return None, False
