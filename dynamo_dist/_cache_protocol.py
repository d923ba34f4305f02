"""The leader/follower protocol over one shared cache directory.

For each graph key the first rank to take the key's lock is its leader: it compiles in
a clean room (a fresh ``TORCHINDUCTOR_CACHE_DIR``), so everything inductor writes for
this graph (AOTAutograd and FX graph cache entries, compiled kernel ``.so`` files) lands
in one place, and publishes that directory as the entry. Shipping the kernels matters on
CPU, where a Mega-Cache blob lacks them and loading it still rebuilds every kernel with
gcc. The other ranks wait for the entry, verify it, stage it, and, once every rank
agreed it could (:mod:`._cache_agree`), unpack it into their own inductor cache and call
inductor, which then finds everything cached and compiles nothing. A restart finds the
entry at once.

Whatever goes wrong with the cache (unusable directory, corrupt or tampered entry, a
leader that died) costs at most a local compile: never the job.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch.distributed as dist

from . import _local, _torch_compat
from ._cache_agree import Agreement, next_compile
from ._cache_key import version_factors
from ._cache_stats import CacheStats, emit_load, emit_publish, emit_refusal, log, warn_once
from ._cache_store import (
    DiskStore,
    Entry,
    EntryRefused,
    alive_on_this_host,
    extract,
    merge_into,
)
from ._config import CACHE_SECRET_FILE_ENV
from ._secret import cache_secret, untrusted_reason

__all__ = ["SharedCache", "local_inductor_dir", "private_local_dir"]

_STALE_LOCK_S = 30.0


def local_inductor_dir() -> Path:
    """This rank's inductor cache directory as inductor sees it now."""
    return Path(_torch_compat.inductor_cache_dir())


def private_local_dir() -> Path | None:
    """This rank's inductor cache directory if only this user can write it, else None.

    Verified entries are unpacked there and inductor reads them again later, so a
    directory someone else created first (the default is under /tmp) or can write
    would be a second way to get code loaded. Created with mode 0700 when absent; one
    of ours that nobody else can write is tightened to 0700. Warns once otherwise.
    """
    path = Path(
        os.path.abspath(
            os.environ.get("TORCHINDUCTOR_CACHE_DIR") or _torch_compat.inductor_default_cache_dir()
        )
    )
    reason: str | None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileExistsError):
            os.mkdir(path, 0o700)
        reason = untrusted_reason(path)
        if reason is None:
            st = os.stat(path)
            if st.st_uid != os.geteuid():
                reason = f"{path} is owned by uid {st.st_uid}, not by this user"
            elif st.st_mode & 0o077:
                # Ours, and untrusted_reason found it writable by nobody else.
                os.chmod(path, 0o700)
    except OSError as e:
        reason = f"{path}: {e.strerror or e}"
    if reason is None:
        return path
    warn_once(
        f"local:{path}",
        "local inductor cache %s is not private (%s): shared cache entries are installed "
        "only into a directory owned by this user with mode 0700, and this rank does not "
        "lead compiles there either; compiling locally. Fix: chmod 700 it if it is yours, "
        "or set TORCHINDUCTOR_CACHE_DIR to a directory of your own with mode 0700.",
        path,
        reason,
    )
    return None


class SharedCache:
    """One shared cache directory, as seen from this process."""

    def __init__(self, root: str, timeout: float, wait_log_interval: float, agree: bool) -> None:
        self.root = root
        self.store = DiskStore(root, cache_secret())  # ConfigError if misconfigured
        self.timeout = timeout
        self.wait_log_interval = wait_log_interval
        self.agree_across_ranks = agree
        self.rank = dist.get_rank() if dist.is_initialized() else 0
        self.world_size = dist.get_world_size() if dist.is_initialized() else 1
        self.enabled = True
        self.counts = CacheStats()
        self.agreement = Agreement(timeout, agree)
        try:
            self.store.check_usable()
        except OSError as e:
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

    def _check_unsigned_is_safe(self) -> None:
        """Without a secret, load only from a directory nobody else can write.

        A sha256 in the manifest proves nothing: whoever can edit an entry can
        recompute it, and loading an entry runs its code on every rank.
        """
        reason = untrusted_reason(self.root)
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
            "cache_dir": self.root,
            "cache_enabled": self.enabled,
        }

    def _owner(self) -> dict[str, Any]:
        return {
            "rank": self.rank,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "job": os.environ.get("TORCHELASTIC_RUN_ID", ""),
        }

    def _compile_counted(self, compile_fn: Callable[[], Any]) -> Any:
        before = _torch_compat.inductor_fxgraph_cache_misses()
        try:
            return compile_fn()
        finally:
            after = _torch_compat.inductor_fxgraph_cache_misses()
            self.counts.inductor_compiles += after - before

    # -- the protocol ----------------------------------------------------------------
    def compile(
        self, key: str, factors: dict[str, Any], compile_fn: Callable[[], Any], label: str
    ) -> Any:
        """Compile one graph through the cache: load it, lead its compile, or fall back."""
        # Numbered by compile within the group, not by key: ranks compiling
        # rank-specific graphs (different keys) still meet at the same agreement. A
        # compile inside dynamo_dist.local() has no scope: it agrees with nobody.
        scope = _local.current_scope()
        n = next_compile(scope) if self.agreement.applies(scope) and scope is not None else 0
        if not self.enabled or private_local_dir() is None:
            # Neither load nor lead (no usable or trusted directory, or nowhere safe to
            # install: the clean room would be there too). Still report, so peers that
            # could use the cache need not wait out the timeout for this rank.
            return self.compile_uncached(compile_fn, n)
        # Applied on every rank (leader and followers alike): it is part of
        # AOTAutograd's configuration, hence of its cache key.
        with _torch_compat.eager_backward_lowering():
            try:
                role, entry, result = self._obtain(key, factors, compile_fn, label)
            except BaseException:
                # The compile itself failed (a leader's inductor error, say): report before
                # the error reaches Dynamo, or the other ranks wait for this one.
                self.agreement.abstain(n, scope)
                raise
            staging: Path | None = None
            if role == "load":
                assert entry is not None
                staging = self._stage(entry)
            ok = role == "leader" or staging is not None
            # All or nothing: a rank installs the loaded entry only if every rank
            # could, so no rank runs different code for the same graph.
            if self.agreement.applies(scope):
                assert scope is not None
                ok = self.agreement.agree(key, n, ok, scope) and ok
            if role == "leader":
                return result
            if staging is not None and ok and entry is not None:
                try:
                    merge_into(staging, local_inductor_dir())
                    self._loaded(key, entry, label)
                except OSError as e:
                    # A local problem (a full disk, a link planted in the local cache):
                    # never the job's end, and not the shared entry's fault either.
                    warn_once(
                        f"install:{local_inductor_dir()}",
                        "cannot install shared cache entry %s into %s (%s); compiling "
                        "locally. Fix: free space, or point TORCHINDUCTOR_CACHE_DIR at a "
                        "fresh private directory",
                        key[:12],
                        local_inductor_dir(),
                        e,
                    )
                finally:
                    shutil.rmtree(staging, ignore_errors=True)
            elif staging is not None:
                shutil.rmtree(staging, ignore_errors=True)
                log.info("not every rank could load %s; compiling locally", key[:12])
            return self._compile_counted(compile_fn)

    def _loaded(self, key: str, entry: Entry, label: str) -> None:
        """Count, log and emit one installed entry."""
        seconds = float(entry.manifest.get("compile_seconds", 0))
        owner_rank = entry.manifest.get("owner", {}).get("rank")
        self.counts.cache_loads += 1
        self.counts.compile_seconds_saved += seconds
        log.info("loaded %s for %s (compiled by rank %s)", key[:12], label, owner_rank)
        emit_load(key, label, owner_rank, self.rank, seconds)

    def _get(self, key: str) -> Entry | None:
        try:
            return self.store.get(key, expect=version_factors())
        except EntryRefused as e:
            self.counts.cache_refused += 1
            log.warning(
                "refused shared cache entry %s (%s); moved it to %s and recompiling",
                key[:12],
                e,
                self.store.refused,
            )
            emit_refusal(key, self.rank, "verify", str(e))
            return None
        except OSError as e:
            warn_once(
                f"read:{self.root}",
                "cannot read the shared cache %s (%s); compiling locally",
                self.root,
                e,
            )
            return None

    def _obtain(
        self, key: str, factors: dict[str, Any], compile_fn: Callable[[], Any], label: str
    ) -> tuple[str, Entry | None, Any]:
        """('load', entry, None), ('leader', None, compiled) or ('fallback', None, None)."""
        start = time.monotonic()
        next_log = start + self.wait_log_interval
        delay = 0.02
        first = True
        while True:
            entry = self._get(key)
            if entry is not None:
                if first:
                    self.counts.cache_hits += 1
                return "load", entry, None
            if first:
                self.counts.cache_misses += 1
                first = False
            try:
                lock = self.store.try_lock(key, self._owner())
            except OSError as e:
                warn_once(
                    f"lock:{self.root}",
                    "cannot take locks in %s (%s); compiling locally",
                    self.root,
                    e,
                )
                return "fallback", None, None
            if lock is not None:
                try:
                    return "leader", None, self._lead(key, factors, compile_fn, label)
                finally:
                    lock.release()
            owner_info = self.store.lock_owner(key)
            if owner_info is None:
                continue  # released just now: look for the entry again
            owner, age = owner_info
            who = f"rank {owner.get('rank')} ({owner.get('host')}, pid {owner.get('pid')})"
            if alive_on_this_host(owner) is False or age > max(_STALE_LOCK_S, self.timeout / 4):
                log.warning(
                    "the leader compiling %s for %s, %s, is gone (no heartbeat for "
                    "%.0fs); taking over",
                    key[:12],
                    label,
                    who,
                    age,
                )
                self.store.break_lock(key)
                continue
            now = time.monotonic()
            if now - start >= self.timeout:
                self.counts.cache_fallbacks += 1
                log.warning(
                    "waited %.0fs for %s to publish %s (%s); compiling locally",
                    now - start,
                    who,
                    key[:12],
                    label,
                )
                return "fallback", None, None
            if now >= next_log:
                next_log = now + self.wait_log_interval
                log.warning(
                    "waiting for graph %s (%s) compiled by %s: %.0fs",
                    key[:12],
                    label,
                    who,
                    now - start,
                )
            time.sleep(delay)
            delay = min(delay * 1.5, 0.5)

    def _lead(
        self, key: str, factors: dict[str, Any], compile_fn: Callable[[], Any], label: str
    ) -> Any:
        """Compile in a clean room and publish everything inductor wrote as the entry."""
        local = local_inductor_dir()
        room = local / "dynamo_dist" / "cleanroom" / f"{key}.{os.getpid()}"
        shutil.rmtree(room, ignore_errors=True)
        room.mkdir(parents=True)
        t0 = time.monotonic()
        with _torch_compat.inductor_cache_dir_override(room):
            result = self._compile_counted(compile_fn)
        seconds = time.monotonic() - t0
        manifest = {
            "factors": factors,
            "owner": self._owner(),
            "label": label,
            "compile_seconds": round(seconds, 3),
            "created": time.time(),
        }
        try:
            written = self.store.put(key, room, manifest)
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
        except OSError as e:
            warn_once(
                f"write:{self.root}",
                "cannot publish to the shared cache %s (%s); "
                "training continues, other ranks will compile themselves",
                self.root,
                e,
            )
        # Keep this rank's own inductor cache warm too, for local restarts.
        with contextlib.suppress(OSError):
            merge_into(room, local)
        return result

    def _stage(self, entry: Entry) -> Path | None:
        """Unpack a verified entry beside the local cache; None (entry refused) on failure."""
        # An unpredictable name (mkdtemp, 0700) directly inside the private local cache:
        # nothing can be planted in it while it waits for the other ranks' agreement.
        try:
            staging = Path(
                tempfile.mkdtemp(prefix=f".dd-staging.{entry.key[:12]}.", dir=local_inductor_dir())
            )
        except OSError as e:
            warn_once(
                f"stage:{local_inductor_dir()}",
                "cannot unpack shared cache entries into %s (%s); compiling locally",
                local_inductor_dir(),
                e,
            )
            return None
        try:
            self.counts.cache_bytes_read += extract(entry, staging)
            return staging
        except OSError as e:
            # Local (ENOSPC, a read-only local cache): the shared entry is not to blame,
            # so it is not refused; this rank compiles locally.
            shutil.rmtree(staging, ignore_errors=True)
            warn_once(
                f"stage:{local_inductor_dir()}",
                "cannot unpack shared cache entry %s into %s (%s); compiling locally",
                entry.key[:12],
                staging,
                e,
            )
            return None
        except Exception as e:  # EntryRefused, and tarfile's own errors
            shutil.rmtree(staging, ignore_errors=True)
            self.counts.cache_refused += 1
            self.store.refuse(entry.path, f"unpacking failed: {e}")
            log.warning(
                "refused shared cache entry %s (unpacking failed: %s); recompiling",
                entry.key[:12],
                e,
            )
            emit_refusal(entry.key, self.rank, "unpack", f"unpacking failed: {e}")
            return None

    def compile_uncached(self, compile_fn: Callable[[], Any], n: int | None = None) -> Any:
        """Compile without the cache, telling the other ranks not to wait for this one.

        For graphs this rank cannot use the cache for (no key, cache off here): every
        rank compiles the same sequence of graphs, so each one still takes part in the
        n-th agreement, as a "no".
        """
        scope = _local.current_scope()
        if self.agreement.applies(scope):
            assert scope is not None
            self.agreement.abstain(next_compile(scope) if n is None else n, scope)
        return self._compile_counted(compile_fn)
