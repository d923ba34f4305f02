"""A follower's work: stage a verified entry, then install it once every rank could.

A rank that found the entry unpacks it beside its local inductor cache (staging) and
reports at the agreement whether it could; only if every rank could does it merge the
staged files into its own inductor cache, so no rank runs different code for the same
graph. The host's fetcher also leaves the verified bytes it unpacked in the host-local
directory for the host's other ranks (fan-out). Only an entry proven bad is moved
aside; a local failure leaves the shared entry for the others.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

from dynamo_dist.cache import fs, fs_tree
from dynamo_dist.cache.archive import extract
from dynamo_dist.cache.directory import CacheDir
from dynamo_dist.cache.entries import Entry, EntryRefused, EntryUnavailable
from dynamo_dist.cache.install import merge_into
from dynamo_dist.cache.localdir import local_inductor_dir
from dynamo_dist.cache.rooms import ROOMS, staging_dir
from dynamo_dist.cache.stats import emit_load, emit_refusal, log
from dynamo_dist.cache.turn import Turn

__all__ = ["install", "recorded_build_seconds", "stage"]


def stage(d: CacheDir, entry: Entry, turn: Turn | None = None) -> Path | None:
    """Unpack a verified entry beside the local cache; None on any failure.

    Only an entry proven bad (EntryRefused) is moved aside; a local failure (a full
    or read-only disk, EntryUnavailable) leaves the shared entry for the others.
    The host's fetcher (``turn.fetch``) also leaves the verified bytes it unpacked
    in the host-local store, for the host's other ranks.
    """
    store = d.hosts.store_of(entry)
    host = turn.host if turn is not None and turn.fetch is not None else None
    if store is not d.store:
        host = None  # already a host-local copy
    # An unpredictable name (mkdtemp, 0700) directly inside the private local cache:
    # nothing can be planted in it while it waits for the other ranks' agreement.
    local = local_inductor_dir()
    try:
        staging = staging_dir(local, entry.key)
    except OSError as e:
        d.local_problem("unpacking the entry", entry.key, e)
        return None
    try:
        if host is None:
            d.counts.cache_bytes_read += extract(entry, staging)
            return staging
        with fs.anonymous_file(local) as keep:
            d.counts.cache_bytes_read += extract(entry, staging, keep)
            try:
                host.put_copy(entry.key, entry.manifest, keep)
                d.counts.cache_host_fetches += 1
            except Exception as e:  # the others compile; this rank installs
                d.local_problem("keeping a host-local copy", entry.key, e)
        return staging
    except EntryUnavailable as e:
        fs_tree.remove_path(staging, owner=os.geteuid())
        d.local_problem("unpacking the entry", entry.key, e)
        return None
    except EntryRefused as e:
        fs_tree.remove_path(staging, owner=os.geteuid())
        if not store.refuse(entry.path, f"unpacking failed: {e}", ident=entry.ident):
            # Not the directory verified any more (republished, or changed: the next
            # look verifies it anew), or already moved: nothing to refuse here.
            d.local_problem("unpacking the entry", entry.key, e)
            return None
        d.counts.cache_refused += 1
        log.warning(
            "refused shared cache entry %s (unpacking failed: %s); recompiling",
            entry.key[:12],
            e,
        )
        emit_refusal(entry.key, d.rank, "unpack", f"unpacking failed: {e}")
        return None
    except Exception as e:  # OSError and anything unforeseen: not proven bad
        fs_tree.remove_path(staging, owner=os.geteuid())
        d.local_problem("unpacking the entry", entry.key, e)
        return None


def install(d: CacheDir, key: str, entry: Entry, label: str, staging: Path, ok: bool) -> bool:
    """Install the staged ``entry`` if every rank could (``ok``); whether it was.

    The staging directory is removed either way.
    """
    try:
        if not ok:
            log.info("not every rank could load %s; compiling locally", key[:12])
            return False
        try:
            local = local_inductor_dir()
            ROOMS.record_installed(local, merge_into(staging, local))
        except OSError as e:
            # A local problem (a full disk, a link planted in the local
            # cache): not the shared entry's fault either.
            d.local_problem("installing the entry", key, e)
            return False
        _loaded(d, key, entry, label)
        return True
    finally:
        fs_tree.remove_path(staging, owner=os.geteuid())


def recorded_build_seconds(entry: Entry) -> float | None:
    """What building the entry's graph took its publisher (None: not recorded).

    The manifest's ``compile_seconds``: the publisher's compile in its clean room.
    """
    seconds = entry.manifest.get("compile_seconds")
    if (
        not isinstance(seconds, int | float)
        or isinstance(seconds, bool)
        or not math.isfinite(seconds)
        or seconds < 0
    ):
        return None
    return float(seconds)


def _loaded(d: CacheDir, key: str, entry: Entry, label: str) -> None:
    """Count, log and emit one installed entry (the graph it holds: ``Turn.count``)."""
    owner = entry.manifest.get("owner")
    owner_rank = owner.get("rank") if isinstance(owner, dict) else None
    if not isinstance(owner_rank, int) or isinstance(owner_rank, bool):
        owner_rank = None
    d.counts.cache_loads += 1
    if d.source_of(entry) == "host_copy":
        d.counts.cache_host_loads += 1
    log.info("loaded %s for %s (compiled by rank %s)", key[:12], label, owner_rank)
    emit_load(key, label, owner_rank, d.rank, recorded_build_seconds(entry) or 0.0)
