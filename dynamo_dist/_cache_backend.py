"""The shared cache as a Dynamo backend, and this process's cache directories.

The last stage of the cache (key -> agree -> protocol -> backend): what ``_api`` plugs
into ``torch.compile``, and the process-wide ``stats()`` the report and
``dynamo_dist.stats()`` read.
"""

from __future__ import annotations

import os
from typing import Any

import torch.fx

from ._cache_key import graph_key
from ._cache_profile import profiles_for
from ._cache_protocol import SharedCache
from ._cache_stats import warn_once
from ._config import Config

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
        return getattr(self._inner, name)

    def __call__(self, gm: torch.fx.GraphModule, example_inputs: list[Any]) -> Any:
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
            compiled = self._cache.compile_uncached(lambda: self._inner(gm, example_inputs))
        else:
            compiled = self._cache.compile(
                key, factors, lambda: self._inner(gm, example_inputs), self._label
            )
        # The frame's automatic-dynamic decisions are final once its graph is compiled.
        self._profiles.after_compile()
        return compiled


_caches: dict[str, SharedCache] = {}


def get_cache(cfg: Config, agree: bool) -> SharedCache:
    """The process's one :class:`SharedCache` for ``cfg.cache_dir`` (created on first use)."""
    assert cfg.cache_dir is not None
    root = os.path.abspath(cfg.cache_dir)
    if root not in _caches:
        _caches[root] = SharedCache(root, cfg.timeout, cfg.wait_log_interval, agree)
    return _caches[root]


def stats() -> dict[str, Any]:
    """Cache counters summed over the cache directories this process uses."""
    out: dict[str, Any] = {}
    for c in _caches.values():
        for k, v in c.stats().items():
            if isinstance(v, int | float) and not isinstance(v, bool):
                out[k] = out.get(k, 0) + v
            else:
                out[k] = v
    return out
