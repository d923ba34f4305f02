"""What the shared cache tells its users: one typed counters record, warnings and events.

Counters are a dataclass rather than a dict so a misspelt counter is a type error, not a
new key in the report. Each cache decision users debug with (an entry loaded, published
or refused) is also an event: a ``dynamo_dist_cache_*`` artifact in the structured trace
(``TORCH_TRACE``, read by tlparse) and a count in ``counters["dynamo_dist"]``.

Event payloads name the entry (a key prefix), the graph's label, ranks and sizes, never
the entry's factors or anything else that could carry a secret or the environment.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from dynamo_dist import _counts
from dynamo_dist._log import get_logger
from dynamo_dist.dist import local as dist_local
from dynamo_dist.dynamo import events as dynamo_events
from dynamo_dist.dynamo import hook as dynamo_hook

__all__ = [
    "CacheStats",
    "current_region_label",
    "emit_load",
    "emit_precompiled",
    "emit_profile",
    "emit_publish",
    "emit_refusal",
    "log",
    "warn_first",
    "warn_once",
]

log = get_logger("cache")

_warned: set[str] = set()

#: Enough of a key to find the entry on disk and in the logs.
_KEY_PREFIX = 12
#: A refusal reason is a short message; cap it so a pathological one stays small.
_REASON_MAX = 300


def current_region_label() -> str:
    """The name of the compiled region whose compile runs on this thread (``regions``)."""
    return dynamo_hook.region_label(dist_local.current_region())


def warn_once(key: str, msg: str, *args: Any) -> None:
    """Log a warning once per process per ``key``: a broken directory must not flood logs."""
    if key not in _warned:
        _warned.add(key)
        log.warning(msg, *args)


def warn_first(key: str, msg: str, *args: Any) -> None:
    """A warning the first time per process per ``key``, an info line every later time.

    For what recurs at every miss of one graph (a stale lock this rank cannot take over):
    the logs say it once, and still show each time it decided a compile.
    """
    if key in _warned:
        log.info(msg, *args)
    else:
        warn_once(key, msg, *args)


@dataclass
class CacheStats:
    """One cache directory's counters in this process (field order is the report's order)."""

    # Hits: graphs loaded (``graphs_loaded``: every load, wherever it came from).
    # Misses: graphs that went through the cache and were not loaded from it (this rank
    # built them, or compiled them itself after a problem or a timeout).
    cache_hits: int = 0
    cache_misses: int = 0
    # Entries installed into this rank's inductor cache (a precompiled one included).
    cache_loads: int = 0
    cache_publishes: int = 0
    cache_refused: int = 0
    cache_fallbacks: int = 0
    # Graphs this rank compiled alongside the rank leading their compile
    # (``cache_followers``: compile), rather than waiting to load them.
    cache_compiled_alongside: int = 0
    # Graphs this rank compiled and published while waiting for another rank's compile:
    # the later pieces of a DDP graph DDPOptimizer splits, which it will need next.
    cache_compiled_ahead: int = 0
    # Compiles that went around the cache because of a problem on this rank's side (a
    # read-only local cache, an entry this rank cannot read, a full disk): each one
    # costs a local compile and is warned about once.
    cache_errors: int = 0
    cache_bytes_read: int = 0
    cache_bytes_written: int = 0
    # FX graphs inductor compiled on this rank (a graph with a backward is two), and
    # one per precompiled capture.
    inductor_compiles: int = 0
    # Automatic-dynamic profiles (``_cache_profile``): merged at start, published when
    # the code state gained a dynamic mark.
    profile_loads: int = 0
    profile_publishes: int = 0
    # Fan-out (``cache_fanout``): entries this rank read from the shared directory for
    # its host (the host's fetcher), and entries it installed from the host-local copy
    # instead of reading the shared directory.
    cache_host_fetches: int = 0
    cache_host_loads: int = 0
    # Profiles not read because no private local directory could be had to stage them.
    profile_skipped: int = 0
    # Values read from the job's key-value store and not used (``_store_payload``): over
    # 1 MiB, over 100,000 objects, or a bad MAC. Profiles and views of this directory
    # here; other kinds (status board, report) are added in ``dynamo_dist.stats()``.
    store_payloads_refused: int = 0
    # Precompiled artifacts (``_precompile``): captured by this rank (a leader), loaded
    # from an entry, calls that ran one (no Dynamo), calls some rank's guards missed, and
    # agreed fallbacks to Dynamo by reason (graph_break, unserializable_guard,
    # source_changed, torch_internals_changed, guard_miss, no_aot_compile, package_error,
    # other_rank: this rank could have used its artifact, another could not;
    # unsupported_module: FSDP2, lazy modules, CUDA graphs).
    precompiled_captures: int = 0
    precompiled_loads: int = 0
    precompiled_calls: int = 0
    precompiled_misses: int = 0
    precompiled_fallbacks: dict[str, int] = dataclasses.field(default_factory=dict)
    # Artifacts found but not used because a function they inline was edited since
    # their capture (the old code is never run): captured again for the code as it is.
    precompiled_stale: int = 0
    # The compile accounting (README, "The job report"), counted where the cache sees
    # it; the runtime adds what Dynamo's frame callback counts under the same keys.
    # Module forwards traced by a precompiled capture (Dynamo's aot_compile).
    frames_traced: int = 0
    # Graphs this rank built: inductor compiled at least one FX graph for the graph handed
    # to the cache, or captured a precompiled artifact. A graph compiled ahead (a later
    # DDP piece) is built here, then loaded when this rank reaches it.
    graphs_built: int = 0
    # Graphs this rank loaded instead of building (each load is a cache hit), by where
    # they came from: "shared" (the shared directory), "host_copy" (the copy the host's
    # fetcher or leader left, fan-out), "precompiled" (a precompiled artifact, from
    # either).
    graphs_loaded: int = 0
    loaded_from: dict[str, int] = dataclasses.field(default_factory=dict)
    # Precompiled modules that needed another artifact (its guards failed), by reason.
    recompiles: int = 0
    recompile_reasons: dict[str, int] = dataclasses.field(default_factory=dict)
    # Measured, per loaded graph whose entry records its build time: that build time
    # (the publisher's, in its clean room), and the time this rank took to have the
    # graph from the cache (waiting for its publisher included). Their difference is
    # ``build_seconds_saved``, negative where loading took longer than the build.
    build_seconds_loaded: float = 0.0
    load_seconds: float = 0.0
    # Per compiled region (``dynamo.hook.region_label``): {"built", "loaded", "traced"}.
    regions: dict[str, dict[str, int]] = dataclasses.field(default_factory=dict)

    def count_traced(self, region: str) -> None:
        """A precompiled capture traced a module's forward, in ``region``."""
        self.frames_traced += 1
        self.regions[region] = _counts.add(self.regions.get(region), {"traced": 1})

    def count_built(self, region: str) -> None:
        """This rank built a graph of ``region`` (see ``graphs_built``)."""
        self.graphs_built += 1
        self.regions[region] = _counts.add(self.regions.get(region), {"built": 1})

    def count_loaded(
        self, source: str, region: str, build_seconds: float | None, load_seconds: float
    ) -> None:
        """This rank loaded a graph of ``region`` from ``source``, a cache hit.

        ``build_seconds``: what its build took, as recorded (None: not recorded, and the
        load is left out of the measured saving); ``load_seconds``: what loading took.
        """
        self.graphs_loaded += 1
        self.cache_hits += 1
        _counts.capped(self.loaded_from, source)
        self.regions[region] = _counts.add(self.regions.get(region), {"loaded": 1})
        if build_seconds is not None:
            self.build_seconds_loaded += build_seconds
            self.load_seconds += load_seconds

    def count_recompile(self, reason: str) -> None:
        self.recompiles += 1
        _counts.capped(self.recompile_reasons, reason)

    def as_dict(self) -> dict[str, Any]:
        """The counters under the keys ``dynamo_dist.stats()`` reports (README)."""
        out = dataclasses.asdict(self)
        out["build_seconds_loaded"] = round(self.build_seconds_loaded, 2)
        out["load_seconds"] = round(self.load_seconds, 2)
        out["build_seconds_saved"] = round(self.build_seconds_loaded - self.load_seconds, 2)
        return out


def emit_load(key: str, label: str, owner_rank: Any, rank: int, build_seconds: float) -> None:
    """An entry was verified and installed: this rank skips inductor for ``label``.

    ``build_seconds``: what building it took its publisher, as its manifest records.
    """
    dynamo_events.emit(
        "cache_load",
        key=key[:_KEY_PREFIX],
        label=label,
        rank=rank,
        owner_rank=owner_rank,
        build_seconds=build_seconds,
    )


def emit_publish(key: str, label: str, rank: int, nbytes: int, compile_seconds: float) -> None:
    """This rank led the compile of ``label`` and published the entry for the others."""
    dynamo_events.emit(
        "cache_publish",
        key=key[:_KEY_PREFIX],
        label=label,
        rank=rank,
        owner_rank=rank,
        bytes=nbytes,
        compile_seconds=round(compile_seconds, 3),
    )


def emit_refusal(key: str, rank: int, stage: str, reason: str) -> None:
    """An entry failed verification (``stage``: "verify" or "unpack") and was moved aside."""
    dynamo_events.emit(
        "cache_refusal",
        key=key[:_KEY_PREFIX],
        rank=rank,
        stage=stage,
        reason=reason[:_REASON_MAX],
    )


def emit_precompiled(what: str, label: str, rank: int, **detail: Any) -> None:
    """A precompiled artifact was captured, loaded, or given up for Dynamo (and why)."""
    dynamo_events.emit(
        f"precompiled_{what}",
        label=label,
        rank=rank,
        **{k: (v[:_REASON_MAX] if isinstance(v, str) else v) for k, v in detail.items()},
    )


def emit_profile(what: str, job: str, generation: int, rank: int, frames: int, marks: int) -> None:
    """An automatic-dynamic profile was loaded (``what="load"``) or published."""
    dynamo_events.emit(
        f"cache_profile_{what}",
        job=job[:64],
        generation=generation,
        rank=rank,
        frames=frames,
        dynamic_marks=marks,
    )
