"""One group's automatic-dynamic profile as entries of the shared cache.

A profile is an ordinary entry of the store (verified, signed, published atomically),
keyed by (job, group, generation): entries are immutable, so a newer state is
generation ``g + 1`` and readers take the highest one present. This module owns that:
the record of what this process last saw of a group's profile, reading the newest
verified generation (checked before anyone merges it), and publishing the next one.
Who reads, who publishes and how the bytes reach the group's other ranks is
``cache/profile.py``'s job.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from typing import Any

from dynamo_dist.cache import fs, fs_tree
from dynamo_dist.cache.archive import extract
from dynamo_dist.cache.entries import EntryRefused, EntryUnavailable
from dynamo_dist.cache.key import version_factors
from dynamo_dist.cache.localdir import private_local_dir
from dynamo_dist.cache.lock import owner_record
from dynamo_dist.cache.protocol import SharedCache
from dynamo_dist.cache.rooms import bytes_member, staging_dir
from dynamo_dist.cache.stats import emit_profile, log, warn_once
from dynamo_dist.dist import store as dist_store
from dynamo_dist.dynamo import pgo, pgo_pickle

__all__ = ["MAX_GENERATIONS", "GroupProfile", "publish", "read_newest"]

PROFILE_FILE = "code_state.pkl"
#: Generations probed per load; a job that keeps finding new dynamic dims beyond this
#: many restarts keeps its newest 64 (publishing stops, loading still works).
MAX_GENERATIONS = 64
#: A code state is a few KB per frame; anything this large is not one. The writer posts
#: the profile in the job's store (after a 4-byte generation and, with a secret, a MAC),
#: where the others accept at most ``MAX_STORE_PAYLOAD_BYTES``: a larger profile would
#: be merged by the writer alone.
MAX_PROFILE_BYTES = dist_store.MAX_STORE_PAYLOAD_BYTES - 4 - dist_store.MAC_BYTES


def _key(job: str, group: str, generation: int) -> str:
    return hashlib.sha256(json.dumps(["pgo", job, group, generation]).encode()).hexdigest()


class GroupProfile:
    """One group's profile: where it is kept and what this process last saw of it."""

    def __init__(self, job: str, group: str, writer: bool) -> None:
        self.job = job
        self.group = group
        self.writer = writer
        self.generation = 0  # the newest generation seen (loaded or published)
        self.marks: frozenset[str] = frozenset()  # dynamic marks already in the cache
        # Other ranks' views (see ``Profiles.after_compile``): where they are posted in
        # the job's store, and, on the writer, their union (``views``).
        self.store: Any = None
        self.base = ""
        self.contributed: frozenset[str] = frozenset()
        self.seen = 0
        # The union of every view read so far, kept under the object cap: views only
        # gain marks, so it is the union of each rank's newest, without holding one
        # state per rank (4,096 of them at scale, or one forged view per rank).
        self.views: dict[Any, Any] = {}
        self.ranks: tuple[int, ...] = ()  # the group's ranks: the only ones with a view


def read_newest(cache: SharedCache, profile: GroupProfile) -> tuple[int, bytes] | None:
    """(generation, bytes) of the newest verified profile, or None.

    ``profile.generation`` becomes the newest generation present.
    """
    if not cache.enabled:
        return None
    newest: Any = None
    generation = 0
    for g in range(1, MAX_GENERATIONS + 1):
        try:
            key = _key(profile.job, profile.group, g)
            entry = cache.store.get(key, expect=version_factors())
        except EntryRefused as e:
            cache.counts.cache_refused += 1
            log.warning("refused automatic-dynamic profile %d of %s (%s)", g, profile.job, e)
            break
        except (EntryUnavailable, OSError) as e:
            cache.counts.cache_errors += 1
            warn_once(f"profile-read:{cache.root}", "cannot read profile %d (%s)", g, e)
            break
        if entry is None:
            break
        newest, generation = entry, g
    profile.generation = generation
    if newest is None:
        return None
    # Staged only in a private directory of ours (a replacement if the configured
    # local cache is not private); with none, skipped and counted.
    local = private_local_dir()
    try:
        if local is None:
            raise OSError("no private local directory to stage it in")
        staging = staging_dir(local, "pgo")
    except OSError as e:
        cache.counts.cache_errors += 1
        cache.counts.profile_skipped += 1
        warn_once(f"profile-stage:{cache.root}", "cannot stage the profile (%s)", e)
        return None
    try:
        cache.counts.cache_bytes_read += extract(newest, staging)
        try:
            with fs.walk(staging, ()) as (staging_fd,):
                data = fs.read_file(staging_fd, PROFILE_FILE, MAX_PROFILE_BYTES)
        except FileNotFoundError:
            raise EntryRefused(f"the profile entry has no {PROFILE_FILE}") from None
        except OSError as e:
            raise EntryRefused(f"{PROFILE_FILE}: {e.strerror or e}") from None
        try:  # checked here, so peers never get bad bytes
            pgo.dynamic_marks(pgo_pickle.loads(data))
        except Exception as e:
            raise EntryRefused(str(e)) from None
        return generation, data
    except EntryRefused as e:
        cache.counts.cache_refused += 1
        cache.store.refuse(newest.path, f"profile: {e}", ident=newest.ident)
        log.warning("refused automatic-dynamic profile %d of %s (%s)", generation, profile.job, e)
        return None
    except Exception as e:  # EntryUnavailable, OSError: a local problem, entry kept
        cache.counts.cache_errors += 1
        warn_once(f"profile-read:{cache.root}", "cannot read the profile (%s)", e)
        return None
    finally:
        fs_tree.remove_path(staging, owner=os.geteuid())


def publish(
    cache: SharedCache, profile: GroupProfile, marks: frozenset[str], state: dict[Any, Any]
) -> None:
    """Publish ``state`` as the group's next generation, unless no reader would accept it."""
    generation = profile.generation + 1
    key = _key(profile.job, profile.group, generation)
    rank = cache.rank
    data = pgo_pickle.dumps(state)
    try:  # what no reader would accept is not published (nor tried again until a new mark)
        if len(data) > MAX_PROFILE_BYTES:
            raise ValueError(f"it is {len(data)} bytes, more than {MAX_PROFILE_BYTES}")
        pgo_pickle.loads(data)
    except ValueError as e:
        profile.marks = marks
        warn_once(
            f"profile-size:{cache.root}",
            "automatic-dynamic profile of job %s not published (%s); a restart may "
            "recompile once more",
            profile.job,
            e,
        )
        return
    manifest = {
        "factors": {**version_factors(), "profile": profile.job, "group": profile.group},
        "owner": owner_record(rank),
        "label": f"automatic-dynamic profile of {profile.job}",
        "compile_seconds": 0.0,
        "created": time.time(),
    }
    # Written from memory: nothing of a local directory goes into the entry.
    written = cache.store.put(key, bytes_member(PROFILE_FILE, data), manifest)
    profile.generation = generation
    profile.marks = marks
    if written:
        cache.counts.profile_publishes += 1
        cache.counts.cache_bytes_written += written
        log.info(
            "published automatic-dynamic profile %d of job %s (%d dynamic marks)",
            generation,
            profile.job,
            len(marks),
        )
        emit_profile("publish", profile.job, generation, rank, 0, len(marks))
