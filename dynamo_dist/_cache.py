"""Shared precompile cache: one rank compiles each graph, the others load it.

A facade over the cache's stages, each its own module, imported in this order (the
import graph is a DAG, with no lazy imports back up):

* :mod:`._cache_key`: the graph's key (versions, device, options, source, graph);
* :mod:`._cache_stats`: the typed counters record, warnings and trace events;
* :mod:`._cache_agree`: the cross-rank all-or-nothing agreement in the job's store;
* :mod:`._cache_protocol`: the leader/follower protocol (clean room, staging, install);
* :mod:`._cache_profile`: Dynamo's automatic-dynamic decisions, kept across restarts;
* :mod:`._cache_backend`: the Dynamo backend, the process's directories, ``stats()``.

The on-disk store (verification, signing, unpacking) is :mod:`._cache_store`. Other
modules import the names below from here, so the split stays invisible to them.
"""

from __future__ import annotations

from ._cache_backend import CachingBackend, get_cache, stats
from ._cache_key import (
    UnkeyableGraph,
    call_spec,
    graph_key,
    precompile_key,
    precompile_key_for_sources,
    source_hash,
    version_factors,
)
from ._cache_profile import profiles_for
from ._cache_protocol import SharedCache, require_private_local_dir
from ._cache_protocol import private_local_dir as _private_local_dir
from ._cache_stats import CacheStats

__all__ = [
    "CacheStats",
    "CachingBackend",
    "SharedCache",
    "UnkeyableGraph",
    "_private_local_dir",
    "call_spec",
    "get_cache",
    "graph_key",
    "precompile_key",
    "precompile_key_for_sources",
    "profiles_for",
    "require_private_local_dir",
    "source_hash",
    "stats",
    "version_factors",
]
