"""Dynamo's automatic-dynamic decisions, kept in the shared cache across restarts.

Why: when a size varies (a short last batch, a rank with a shorter input), Dynamo
recompiles the frame with that dimension dynamic and remembers the decision in its
profile-guided code state (``torch._dynamo.pgo``). Upstream persists that state only
with a ``torch.compiler.config.job_id`` and only in the local inductor directory, so
on fresh hosts every restart pays the same recompile again. Here the state travels
with the shared cache: a restart compiles dynamic from the start and performs none
of the first run's shape recompiles.

* **Key.** The user's ``job_id`` when set (never overwritten), else one derived from
  what is stable across restarts of the same job: the first compiled callable's
  source hash, torch's versions and the world size; never ``TORCHELASTIC_RUN_ID``,
  which changes on every run. Each group (its ranks) has its own profile.
* **One writer, one reader.** The group's lowest rank reads the newest profile when
  the group is set up (``dynamo_dist.compile``, which every member calls) and posts
  the bytes (or "none") in the job's key-value store, where the others read them: every
  rank merges the same state or none does, since ranks compiling against different
  profiles would trace different graphs. The store, not a gloo collective: a member
  that skips this (a cache configured on some ranks only) must not shift the group's
  collectives; the others wait at most the timeout, then compile without a profile.
  The same rank publishes a new profile whenever the state gains a dynamic mark (a
  static size seen again compiles the same graph anyway).
* **Generations.** A profile is an ordinary entry of the store (verified, signed,
  published atomically), keyed by (job, group, generation): entries are immutable,
  so a newer state is generation ``g + 1`` and readers take the highest one present.
* **Closures.** Dynamo names a closure's frame by ``hash()`` of its cells' code objects,
  which differs in every process (string hashing is salted): such frames (the wrapper
  ``torch.compile`` puts around ``DDP.forward`` among them) are published under a
  stable name and filed under this process's hash just before the frame compiles.
* **Never code.** The state is a pickle; it is unpickled only after the entry's
  verification, and then only with pgo's own classes allowed.
* **Untrusted store.** Whatever can reach the job's store can set any key, so the bytes
  read there (the writer's profile, other ranks' views) are capped at 1 MiB and
  100,000 objects before and while they are unpickled, signed with the cache secret
  when there is one, and a view is checked like a loaded profile before it is merged
  (``_store_payload``). A refused one is counted and ignored.

A profile that cannot be read, verified or unpickled costs nothing but the
recompiles it would have saved, and one warning.
"""

from __future__ import annotations

import atexit
import contextlib
import hashlib
import json
from datetime import timedelta
from typing import Any

import torch.distributed as dist

from dynamo_dist.cache import secret as cache_secret
from dynamo_dist.cache.key import version_factors
from dynamo_dist.cache.profile_store import MAX_GENERATIONS, GroupProfile, publish, read_newest
from dynamo_dist.cache.protocol import SharedCache
from dynamo_dist.cache.stats import emit_profile, log, warn_once
from dynamo_dist.dist import local as dist_local
from dynamo_dist.dist import proc
from dynamo_dist.dist import store as dist_store
from dynamo_dist.dynamo import compat, pgo, pgo_pickle

__all__ = ["Profiles", "derived_job_id", "profiles_for"]


def derived_job_id(source: str, world_size: int) -> str:
    """A job id stable across restarts of the same program at the same scale."""
    blob = json.dumps(
        {"source": source, "versions": version_factors(), "world": world_size}, sort_keys=True
    )
    return "dynamo-dist-" + hashlib.sha256(blob.encode()).hexdigest()[:16]


def _group_key(group: dist_local.GroupInfo | None) -> str:
    """The profile's group key: the group's; a rank alone in its group is named by rank.

    Two pipeline stages of one rank each are different code at different sizes: they
    must not share one profile (nor its generations).
    """
    if group is not None:
        return group.key
    if dist.is_initialized() and dist.get_world_size() > 1:
        return f"rank-{dist.get_rank()}"
    return "single"


class Profiles:
    """The automatic-dynamic profiles of one shared cache directory, in this process."""

    def __init__(self, cache: SharedCache) -> None:
        self.cache = cache
        self._by_group: dict[str, GroupProfile] = {}

    # -- loading (collective over the group) --------------------------------------------
    def load(self, group: dist_local.GroupInfo | None, source: str) -> None:
        """Merge the group's newest profile into Dynamo's code state, on every rank or none.

        Called once per group from ``dynamo_dist.compile``, which every member of the
        group calls at the same point (that is when the group is set up).
        """
        key = _group_key(group)
        if key in self._by_group:
            return
        user = compat.compiler_job_id()
        world = dist.get_world_size() if dist.is_initialized() else 1
        job = user if user is not None else derived_job_id(source, world)
        rank = dist.get_rank() if dist.is_initialized() else 0
        writer = group is None or not group.ranks or rank == group.ranks[0]
        profile = GroupProfile(job, key, writer)
        self._by_group[key] = profile
        if group is not None and group.size > 1 and group.consensus is None:
            # Without compiler collectives the ranks' states drift apart anyway: sharing
            # one profile would not make them agree, so none is shared.
            log.info("automatic-dynamic profile not shared: consensus is off for %s", group.name)
            self._by_group[key].writer = False
            return
        found: tuple[int, bytes] | None = None
        if writer:
            found = read_newest(self.cache, profile)
        if group is not None and group.size > 1:
            profile.store = self.cache.agreement.client()
            profile.ranks = tuple(group.ranks)
            restart = proc.restart_count()
            # Numbered per group, not named by the directory: ranks may spell one cache
            # differently, and a second cache directory must not read the first's bytes.
            n = _loads.get(group.key, 0) + 1
            _loads[group.key] = n
            profile.base = f"dynamo_dist/cache/profile/{restart}/{group.key}/{n}"
            found = self._share(group, profile, found)
        if found is None:
            return
        generation, data = found
        profile.generation = generation
        try:
            state = pgo_pickle.loads(data)
            marks = pgo.dynamic_marks(state)
        except Exception as e:
            if not writer:  # the bytes came from the job's store: anyone could have set them
                dist_store.refuse("automatic-dynamic profile", e, self.cache.counts)
                return
            warn_once(
                f"profile-bad:{self.cache.root}",
                "automatic-dynamic profile %d of job %s in %s is unusable (%s); compiling "
                "without it",
                generation,
                job,
                self.cache.root,
                e,
            )
            return
        added = pgo.merge(state, _pending)
        # What the cache holds, closures' frames included (they join the live state
        # only when they compile): nothing new to publish until a mark beyond these.
        profile.marks = marks
        self.cache.counts.profile_loads += 1
        log.info(
            "loaded automatic-dynamic profile %d of job %s: %d frames, %d dynamic marks",
            generation,
            job,
            added,
            len(profile.marks),
        )
        emit_profile("load", job, generation, rank, added, len(profile.marks))

    def _share(
        self, group: dist_local.GroupInfo, profile: GroupProfile, found: tuple[int, bytes] | None
    ) -> tuple[int, bytes] | None:
        """The writer's (generation, bytes) on every rank of ``group``, through the store.

        Posted signed when there is a cache secret (the MAC binds the key); a reader
        refuses a payload over the store cap or with a bad MAC before looking into it.
        """
        store, writer, name = profile.store, profile.writer, profile.base
        if store is None:
            return found if writer else None
        secret = cache_secret.cache_secret()
        try:
            if writer:
                payload = b"" if found is None else found[0].to_bytes(4, "big") + found[1]
                store.set(name, dist_store.seal(payload, secret, name))
                return found
            try:
                # One blocking wait, not polling: 4,096 ranks polling the job's one
                # store would send it thousands of operations a second.
                store.wait([name], timedelta(seconds=self.cache.timeout))
            except Exception:
                # The shared client is dropped: its connection may still get that reply.
                self.cache.agreement.drop_client()
                profile.store = None
                warn_once(
                    f"profile-wait:{self.cache.root}",
                    "rank %d of %s did not post the automatic-dynamic profile within "
                    "%.0fs (is cache_dir set on every rank?); compiling without it",
                    group.ranks[0] if group.ranks else 0,
                    group.name,
                    self.cache.timeout,
                )
                return None
            raw = store.get(name)
        except Exception as e:  # the store failed: nothing shared, nothing lost
            warn_once(
                f"profile-exchange:{self.cache.root}",
                "could not share the automatic-dynamic profile within %s (%s: %s); "
                "compiling without it",
                group.name,
                type(e).__name__,
                e,
            )
            return None
        try:
            payload = dist_store.unseal(raw, secret, name)
        except dist_store.PayloadRefused as e:
            dist_store.refuse("automatic-dynamic profile", e, self.cache.counts)
            return None
        if len(payload) < 4:
            return None
        return int.from_bytes(payload[:4], "big"), payload[4:]

    # -- publishing (the group's writer, after each compile) ----------------------------
    def after_compile(self, group: dist_local.GroupInfo | None) -> None:
        """Publish the group's dynamic decisions if they gained a mark since the last look.

        Called by the caching backend once per graph; cheap when nothing changed. Ranks
        other than the writer post their own view in the job's store when it gains a
        mark; the writer publishes the union of its view and theirs. A frame without a
        graph (``DDP.forward`` around the module call) is compiled without compiler
        collectives, so only the rank whose size changed marks it dynamic: the union
        is what spares every rank that recompile on restart. Never raises: a profile
        that cannot be written costs the next restart a recompile.
        """
        if dist_local.is_local():
            return  # a rank-local compile runs against its own state; not the group's
        profile = self._by_group.get(_group_key(group))
        if profile is not None:
            self._step(profile)

    def _step(self, profile: GroupProfile) -> None:
        cache = self.cache
        try:
            if not profile.writer:
                self._contribute(profile)
                return
            if not cache.enabled or not cache.writable or profile.generation >= MAX_GENERATIONS:
                return
            self._collect(profile)
            mine = pgo.stable(pgo.live_state(), _names)
            state = pgo.union(mine, [profile.views])
            marks = pgo.dynamic_marks(state)
            if not marks <= profile.marks:
                publish(self.cache, profile, marks, state)
        except Exception as e:
            cache.counts.cache_errors += 1
            warn_once(
                f"profile-write:{cache.root}:{type(e).__name__}",
                "cannot publish the automatic-dynamic profile to %s (%s: %s); training "
                "continues, a restart may recompile once more",
                cache.root,
                type(e).__name__,
                e,
            )

    def _contribute(self, profile: GroupProfile) -> None:
        """A non-writer posts its view when it gained a mark (the writer merges it)."""
        if profile.store is None:
            return
        marks = pgo.dynamic_marks()
        if marks <= profile.contributed:
            return
        mine = pgo.stable(pgo.live_state(), _names)
        data = self.cache.rank.to_bytes(4, "big") + pgo_pickle.dumps(mine)
        profile.contributed = marks
        if len(data) + dist_store.MAC_BYTES > dist_store.MAX_STORE_PAYLOAD_BYTES:
            # The writer would refuse it: posting it would only cost the store and the writer.
            warn_once(
                f"profile-view-size:{self.cache.root}",
                "this rank's automatic-dynamic view is %d bytes, more than the job's store "
                "carries (%d); not shared, a restart may recompile once more",
                len(data),
                dist_store.MAX_STORE_PAYLOAD_BYTES,
            )
            return
        n = profile.store.add(f"{profile.base}/views", 1)
        name = f"{profile.base}/view/{n}"
        profile.store.set(name, dist_store.seal(data, cache_secret.cache_secret(), name))

    def _collect(self, profile: GroupProfile) -> None:
        """The writer reads the views posted since its last look (never waits for one).

        A view is checked like a profile loaded from the cache (``read_newest``): its
        size and MAC before anything else, then ``pgo_loads`` (object cap, rebuilt from
        checked fields) and its dynamic marks. One that fails is counted and never merged.
        """
        store = profile.store
        if store is None:
            return
        secret = cache_secret.cache_secret()
        total = int(store.add(f"{profile.base}/views", 0))
        while profile.seen < total:
            name = f"{profile.base}/view/{profile.seen + 1}"
            if not store.check([name]):
                break  # counted but not yet set: read at the next look
            raw = store.get(name)
            profile.seen += 1
            view = self._view(profile, raw, secret, name)
            if view is None:
                continue
            try:  # the union stays under the cap too: it is what the writer holds
                union = pgo.union(profile.views, [view])
                profile.views = pgo_pickle.checked(union)
            except ValueError as e:
                dist_store.refuse("automatic-dynamic view", e, self.cache.counts)

    def _view(
        self, profile: GroupProfile, raw: Any, secret: str | None, name: str
    ) -> dict[Any, Any] | None:
        """The state of a view read from the store under ``name``; None if refused."""
        try:
            data = dist_store.unseal(raw, secret, name)
            if len(data) <= 4:
                return None
            rank = int.from_bytes(data[:4], "big")
            if rank not in profile.ranks:
                raise dist_store.PayloadRefused(f"{name} names rank {rank}, not in its group")
            view = pgo_pickle.loads(data[4:])
            pgo.dynamic_marks(view)
        except Exception as e:
            dist_store.refuse("automatic-dynamic view", e, self.cache.counts)
            return None
        return view

    def flush(self) -> None:
        """The writer's last look at exit: views posted after its last compile count too."""
        for profile in self._by_group.values():
            if profile.writer and profile.store is not None:
                self._step(profile)


_profiles: dict[str, Profiles] = {}
_loads: dict[str, int] = {}  # per group: how many profiles this process loaded in it

# Closures' frames (``CodeId.closure_hash`` is salted per process): this process's
# hash -> stable name of every closure it compiled, and loaded entries waiting for
# their closure's frame to compile (see ``pgo.adopt``).
_names: dict[int, str] = {}
_pending: dict[tuple[Any, ...], Any] = {}


def adopt_frame(frame: Any) -> None:
    """Before ``frame`` compiles: file the loaded entries of its closure under this process's
    name for it (the frame callback calls this, for compiles with a shared cache)."""
    if dist_local.is_local():
        return
    pgo.adopt(frame, _names, _pending)


@atexit.register
def _flush_at_exit() -> None:
    for p in list(_profiles.values()):
        with contextlib.suppress(Exception):
            p.flush()


def profiles_for(cache: SharedCache) -> Profiles:
    """The process's one :class:`Profiles` per shared cache directory."""
    p = _profiles.get(cache.root)
    if p is None:
        p = _profiles[cache.root] = Profiles(cache)
    return p
