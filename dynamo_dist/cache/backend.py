"""The shared cache as a Dynamo backend, and this process's cache directories.

The last stage of the cache (key -> agree -> protocol -> backend): what ``_api`` plugs
into ``torch.compile``, and the process-wide ``stats()`` the report and
``dynamo_dist.stats()`` read.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from functools import partial
from typing import Any

import torch.fx

from dynamo_dist import _counts
from dynamo_dist._config import Config
from dynamo_dist.cache import fs
from dynamo_dist.cache.key import graph_key
from dynamo_dist.cache.profile import profiles_for
from dynamo_dist.cache.protocol import SharedCache
from dynamo_dist.cache.stats import warn_once
from dynamo_dist.cache.wait import Upcoming
from dynamo_dist.dist import local as dist_local
from dynamo_dist.dynamo import ddp

__all__ = ["CachingBackend", "get_cache", "stats"]


class CachingBackend:
    """A Dynamo backend: the shared cache in front of inductor."""

    def __init__(self, inner: Any, cache: SharedCache, static: dict[str, Any], label: str) -> None:
        self._inner = inner
        self._cache = cache
        self._static = static
        self._label = label
        self._profiles = profiles_for(cache)

    def __getattr__(self, name: str) -> Any:
        # Dynamo asks the backend for inductor's attributes (compiler_name, get_compiler_config).
        if name == "_inner" or name.startswith("__"):
            raise AttributeError(name)  # not set yet (copy.deepcopy, unpickling)
        return getattr(self._inner, name)

    # Equal backends share a frame's compiled entries across torch.compile calls, as
    # torch's own backend wrappers do: one graph for all of torchtitan's per-block
    # compiles of one block class, instead of one per block up to the recompile limit.
    def __eq__(self, other: object) -> bool:
        return (
            isinstance(other, CachingBackend)
            and other._cache is self._cache
            and other._static == self._static
            and bool(other._inner == self._inner)
        )

    def __hash__(self) -> int:
        return hash((type(self), tuple(sorted((k, str(v)) for k, v in self._static.items()))))

    def __call__(self, gm: torch.fx.GraphModule, example_inputs: list[Any]) -> Any:
        # Dynamo calls this inside the compile the frame callback started, so the group
        # cannot come as an argument: the callback set it (``dist_local.compiling``) and
        # it is read here, once, and passed down (the agreement, the profile).
        group = dist_local.current_group()
        try:
            key, factors = graph_key(gm, example_inputs, self._static)
        except Exception as e:  # an unkeyable graph is compiled the plain way, and said so
            warn_once(
                f"unkeyable:{self._label}:{type(e).__name__}",
                "a graph of %s is compiled without the shared cache: its cache key could not "
                "be computed (%s: %s)",
                self._label,
                type(e).__name__,
                e,
            )
            compiled = self._cache.compile_uncached(
                lambda: self._inner(gm, example_inputs), group=group
            )
        else:
            # A DDPOptimizer bucket, made cacheable by AOTAutograd: a warm start then
            # loads the bucket's joint graph instead of tracing it again.
            options = getattr(self._inner, "config", None)  # inductor's, from options=
            with ddp.cacheable_bucket(gm, options if isinstance(options, dict) else None) as bucket:
                compiled = self._cache.compile(
                    key,
                    factors,
                    lambda: self._inner(gm, example_inputs),
                    self._label,
                    self._upcoming(gm) if bucket.active else None,
                    group=group,
                )
            compiled = bucket.wrap(compiled)
        # The frame's automatic-dynamic decisions are final once its graph is compiled.
        self._profiles.after_compile(group)
        return compiled

    def _upcoming(self, gm: torch.fx.GraphModule) -> Callable[[], Iterator[Upcoming]]:
        """The DDP pieces after ``gm``, keyed, for a rank that waits meanwhile."""

        def pieces() -> Iterator[Upcoming]:
            for piece, inputs in ddp.pieces_after(gm):
                key, factors = graph_key(piece, inputs, self._static)
                yield key, factors, partial(self._inner, piece, inputs), self._label

        return pieces


_caches: dict[str, SharedCache] = {}

#: ``cache_followers = "auto"`` compiles alongside the leader from this many CPUs per local
#: rank: inductor's compile workers then have room on both ranks, and waiting would only
#: add the entry's load to the leader's compile.
CPUS_PER_RANK_TO_COMPILE = 4


def followers_compile(cfg: Config) -> bool:
    """Whether a rank compiles a graph itself while another rank leads its compile."""
    if cfg.cache_followers != "auto":
        return cfg.cache_followers == "compile"
    return cpus_per_rank() >= CPUS_PER_RANK_TO_COMPILE


def cpus_per_rank() -> float:
    """The CPUs this rank may use, as far as the process can tell.

    A mask narrower than the machine means ranks are pinned, so the mask is already
    this rank's share; otherwise the host's CPUs are split among its
    ``LOCAL_WORLD_SIZE`` ranks. A cgroup v2 CPU quota (a container's ``--cpus``, which
    the mask does not show) is shared by the container's ranks and caps the share.
    """
    total = os.cpu_count() or 1
    try:
        mask = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        mask = total
    try:
        local = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    except ValueError:
        local = 1
    share = float(mask) if mask < total else mask / local
    try:
        quota, period = (fs.read_system_text("/sys/fs/cgroup/cpu.max") or "").split()[:2]
        if quota != "max" and float(period) > 0:
            share = min(share, float(quota) / float(period) / local)
    except (OSError, ValueError):
        pass
    return share


def get_cache(cfg: Config, agree: bool) -> SharedCache:
    """The process's one :class:`SharedCache` for ``cfg.cache_dir`` (created on first use)."""
    assert cfg.cache_dir is not None
    root = os.path.abspath(cfg.cache_dir)
    if root not in _caches:
        _caches[root] = SharedCache(
            root,
            cfg.timeout,
            cfg.wait_log_interval,
            agree,
            followers_compile(cfg),
            fanout=cfg.cache_fanout,
        )
    return _caches[root]


def stats() -> dict[str, Any]:
    """Cache counters summed over the cache directories this process uses."""
    out: dict[str, Any] = {}
    for c in _caches.values():
        out = _counts.add(out, c.stats())
    return out
