"""A leader's work: compile in a clean room, and publish everything inductor wrote.

The rank holding a key's lock compiles in a clean room (a fresh
``TORCHINDUCTOR_CACHE_DIR``), so everything inductor writes for this graph (AOTAutograd
and FX graph cache entries, compiled kernel ``.so`` files) lands in one place, and
publishes that directory as the entry, leaving a copy for its host's other ranks too
(fan-out). Shipping the kernels matters on CPU, where a Mega-Cache blob lacks them and
loading it still rebuilds every kernel with gcc. A rank waiting for another leader may
lead a graph it compiles next meanwhile (:func:`compile_ahead`).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path
from typing import Any

from dynamo_dist.cache.directory import CacheDir
from dynamo_dist.cache.install import merge_into
from dynamo_dist.cache.localdir import local_inductor_dir, require_private_local_dir
from dynamo_dist.cache.lock import owner_record
from dynamo_dist.cache.rooms import ROOMS
from dynamo_dist.cache.stats import emit_publish, log, warn_once
from dynamo_dist.cache.turn import Turn, compile_counted
from dynamo_dist.cache.wait import Upcoming
from dynamo_dist.dynamo import inductor

__all__ = ["compile_ahead", "lead"]


def lead(
    d: CacheDir,
    key: str,
    factors: dict[str, Any],
    compile_fn: Callable[[], Any],
    label: str,
    turn: Turn,
    only_if_missing: bool = False,
) -> None:
    """Compile in a clean room and publish everything inductor wrote as the entry.

    ``only_if_missing``: a rank that compiled alongside the lock's holder publishes
    only if the holder has not (yet) published.
    """
    _compile_and_publish(d, key, factors, lambda: turn.compile(compile_fn), label, only_if_missing)


def compile_ahead(d: CacheDir, ahead: Iterator[Upcoming], waiting_for: str) -> bool:
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
            entry, readable = d.get_entry(key)
            if entry is not None or not readable or d.locks.holder(key) is not None:
                continue
            lock = d.locks.acquire(key, owner_record(d.rank))
            if lock is None:
                continue
            try:
                if d.get_entry(key)[0] is None:
                    log.info(
                        "compiling %s (%s) while waiting for %s",
                        key[:12],
                        label,
                        waiting_for,
                    )
                    if _compile_and_publish(
                        d,
                        key,
                        factors,
                        partial(compile_counted, d.counts, compile_fn),
                        label,
                        in_room_only=True,
                    ):
                        d.counts.cache_compiled_ahead += 1
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


def _compile_and_publish(
    d: CacheDir,
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
        d.local_problem("making a clean room", key, e)
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
        d.local_problem("completing the entry's kernels", key, e)
    if not only_if_missing or d.get_entry(key)[0] is None:
        _publish(d, key, factors, label, room, seconds)
    # Keep this rank's own inductor cache warm too, for local restarts.
    try:
        ROOMS.record_installed(local, merge_into(room, local))
    except OSError as e:
        d.local_problem("keeping a local copy", key, e)
    return True


def _publish(
    d: CacheDir, key: str, factors: dict[str, Any], label: str, room: Path, seconds: float
) -> None:
    manifest = {
        "factors": factors,
        "owner": owner_record(d.rank),
        "label": label,
        "compile_seconds": round(seconds, 3),
        "created": time.time(),
    }
    try:
        written = d.store.put(key, ROOMS.members(room), manifest)
    except Exception as e:  # never the job's end: the others compile themselves
        d.counts.cache_errors += 1
        warn_once(
            f"write:{d.root}:{type(e).__name__}",
            "cannot publish to the shared cache %s (%s: %s); training continues, "
            "other ranks will compile themselves",
            d.root,
            type(e).__name__,
            e,
        )
        return
    host = d.hosts.store()
    if host is not None and written:
        # The host's other ranks load this copy: none of them reads the shared one.
        # Only the entry that won the publish: a leader that lost the race runs its
        # own build, but its host's ranks must not (they compile, like any rank
        # whose fetcher left no copy, and the agreement keeps all ranks together).
        try:
            host.put(key, ROOMS.members(room), manifest)
        except Exception as e:
            d.local_problem("keeping a host-local copy", key, e)
    if written:
        d.counts.cache_publishes += 1
        d.counts.cache_bytes_written += written
        log.info(
            "published %s for %s (%d bytes, compiled in %.1fs)",
            key[:12],
            label,
            written,
            seconds,
        )
        emit_publish(key, label, d.rank, written, seconds)
