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

from dynamo_dist._log import get_logger
from dynamo_dist.dynamo import events as dynamo_events

__all__ = [
    "CacheStats",
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

    cache_hits: int = 0
    cache_misses: int = 0
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
    inductor_compiles: int = 0
    compile_seconds_saved: float = 0.0
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

    def as_dict(self) -> dict[str, Any]:
        """The counters under the keys ``dynamo_dist.stats()`` has always reported."""
        out = dataclasses.asdict(self)
        out["compile_seconds_saved"] = round(self.compile_seconds_saved, 2)
        return out


def emit_load(key: str, label: str, owner_rank: Any, rank: int, compile_seconds: float) -> None:
    """An entry was verified and installed: this rank skips inductor for ``label``."""
    dynamo_events.emit(
        "cache_load",
        key=key[:_KEY_PREFIX],
        label=label,
        rank=rank,
        owner_rank=owner_rank,
        compile_seconds_saved=compile_seconds,
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
