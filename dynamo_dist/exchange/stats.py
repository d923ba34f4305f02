"""One typed record of this rank's counters, flattened to the dict users and the report read.

The counters come from four places: the C++ hook (evaluations, misses), the runtime
(compiles, first-entry exchanges), the transport (exchanges, their cost and wait, per
region) and the cache.
Each has a typed record here; :meth:`Stats.as_dict` flattens them into the keys
``dynamo_dist.stats()`` has always returned, so the job report and scripts keep working.
This module imports nothing from the package but ``_counts``: every layer can count
into it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from dynamo_dist import _counts


@dataclass(slots=True)
class Counts:
    """What the runtime counts itself; the policy layer and the frame callback add to it."""

    compiles: int = 0
    """Frames Dynamo traced (and compiled) through a dynamo_dist callback, in lockstep with
    the group."""

    local_compiles: int = 0
    """Frames compiled inside ``dynamo_dist.local()`` (this rank alone)."""

    recompiles: int = 0
    """Of those, frames that already had compiled entries (Dynamo's recompiles)."""

    recompile_reasons: dict[str, int] = field(default_factory=dict)
    """Recompiles by Dynamo's reason (its first failed guard), or ``forced: ...``."""

    regions: dict[str, dict[str, int]] = field(default_factory=dict)
    """Per compiled region (``dynamo.hook.region_label``): frames traced, and graphs the
    backend built where no shared cache counts them: ``{"traced": n, "built": m}``."""

    def count_traced(self, region: str, recompile_reason: str | None) -> None:
        """A frame of ``region`` was traced (a recompile if ``recompile_reason``)."""
        self.regions[region] = _counts.add(self.regions.get(region), {"traced": 1})
        if recompile_reason is not None:
            self.recompiles += 1
            _counts.capped(self.recompile_reasons, recompile_reason)

    def count_built(self, region: str) -> None:
        """The backend built a graph of ``region`` (no shared cache: it counts its own)."""
        self.regions[region] = _counts.add(self.regions.get(region), {"built": 1})

    def add(self, other: Counts) -> None:
        """Add ``other``'s counts to these (compiles counted before a group was joined)."""
        for f in dataclasses.fields(self):
            setattr(self, f.name, _counts.add(getattr(self, f.name), getattr(other, f.name)))

    first_entry_exchanges: int = 0
    """Exchanges run for a frame this rank had no compiled entry for."""

    forced_recompiles_logged: int = 0
    """Mixed exchanges the policy reported (every rank counts each one)."""

    strict_errors: int = 0
    """Mixed exchanges policy ``strict`` turned into a RankDivergenceError."""


@dataclass(frozen=True, kw_only=True, slots=True)
class HookCounters:
    """The C++ guard hook's counters (``GuardHook.counters()``)."""

    evaluations: int = 0
    local_misses: int = 0
    forced_recompiles: int = 0
    hook_exchanges: int = 0

    @classmethod
    def from_hook(cls, counters: Mapping[str, int]) -> HookCounters:
        """Typed view of the hook's dict; a key the C++ side does not report stays 0."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: int(v) for k, v in counters.items() if k in names})


@dataclass(frozen=True, kw_only=True, slots=True)
class TransportStats:
    """The guard exchange's counts and times (percentiles of the hook's last 8192 samples)."""

    name: str
    """``gloo``, ``shm``, ``shm+native`` or ``shm+gloo`` (reported as ``transport``): shared
    memory within a host, then the native leaders' exchange or gloo's across hosts."""

    exchanges: int
    mixed_outcomes: int
    divergences: int
    """Frame mismatches, plus mixed exchanges policy ``strict`` refused."""

    cost_p50_us: float
    """Median of what an exchange costs this rank itself: computing the frame's identity,
    posting its record, the AND and the verdict; not the wait for the other ranks."""
    cost_p99_us: float
    wait_p50_us: float
    """Median time an exchange was blocked on the other ranks: until every local peer had
    posted, then the cross-host step (a host leader) or the leader's verdict (its host's
    other ranks); with gloo, the all-reduce. A rank that arrives last waits ~0; its peers
    wait for its lateness."""
    wait_p99_us: float

    def times(self) -> dict[str, float]:
        """The four figures under their report keys."""
        return {
            "cost_p50_us": self.cost_p50_us,
            "cost_p99_us": self.cost_p99_us,
            "wait_p50_us": self.wait_p50_us,
            "wait_p99_us": self.wait_p99_us,
        }


@dataclass(kw_only=True, slots=True)
class RegionStats:
    """One compiled region (a ``dynamo_dist.compile`` call) on this rank: its exchanges.

    Summed from the C++ hook's counts per frame identity (``GuardHook.frames()``): a
    region's frames are its call sites, the resume functions after a graph break, and
    each grad mode. The report's per-region breakdown (``dynamo-dist report --verbose``).
    """

    frames: int = 0
    """Distinct frame identities exchanged in the region."""
    exchanges: int = 0
    hits: int = 0
    """Exchanges in which this rank's own guards passed (before the ranks agreed); the
    others (``misses``) had no entry whose guards passed, or no entry yet."""
    wait_ns: int = 0
    """Total time its exchanges were blocked on the other ranks (``wait_*_us``' sense)."""
    wait_max_ns: int = 0

    def add_frame(self, exchanges: int, hits: int, wait_ns: int, wait_max_ns: int) -> None:
        self.frames += 1
        self.exchanges += exchanges
        self.hits += hits
        self.wait_ns += wait_ns
        self.wait_max_ns = max(self.wait_max_ns, wait_max_ns)

    def as_dict(self) -> dict[str, Any]:
        return {
            "exchanges": self.exchanges,
            "hits": self.hits,
            "misses": self.exchanges - self.hits,
            "wait_ms_total": round(self.wait_ns / 1e6, 3),
            "wait_ms_max": round(self.wait_max_ns / 1e6, 3),
            "frames": self.frames,
        }


def regions(
    frames: Iterable[tuple[int, int, int, int, int]], label_of: Callable[[int], str]
) -> dict[str, RegionStats]:
    """Per-identity counts (``GuardHook.frames()`` rows, any number of hooks) by region label.

    ``label_of(ident)``: the name of the region the identity was computed in.
    """
    out: dict[str, RegionStats] = {}
    for ident, exchanges, hits, wait_ns, wait_max_ns in frames:
        out.setdefault(label_of(ident), RegionStats()).add_frame(
            exchanges, hits, wait_ns, wait_max_ns
        )
    return out


@dataclass(frozen=True, kw_only=True, slots=True)
class GroupStats:
    """One group of ranks: its ranks, its exchanges and its compiles on this rank."""

    ranks: list[int]
    transport: TransportStats
    compiles: int
    local_compiles: int
    first_entry_exchanges: int
    recompiles: int = 0
    recompile_reasons: dict[str, int] = field(default_factory=dict)
    regions: dict[str, dict[str, int]] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        tr = self.transport
        return {
            "ranks": self.ranks,
            "transport": tr.name,
            "exchanges": tr.exchanges,
            "mixed_outcomes": tr.mixed_outcomes,
            "divergences": tr.divergences,
            "compiles": self.compiles,
            "local_compiles": self.local_compiles,
            "recompiles": self.recompiles,
            "first_entry_exchanges": self.first_entry_exchanges,
            **tr.times(),
        }


@dataclass(frozen=True, kw_only=True, slots=True)
class RuntimeStats:
    """Everything a running dynamo_dist runtime reports (totals over its groups)."""

    policy: str
    consensus: bool
    hook: HookCounters
    transport: TransportStats
    first_entry_exchanges: int
    compiles: int
    local_compiles: int = 0
    recompiles: int = 0
    recompile_reasons: dict[str, int] = field(default_factory=dict)
    traced_by_region: dict[str, dict[str, int]] = field(default_factory=dict)
    """Per compiled region: frames traced (the frame callback's ``traced`` counts) and,
    without a shared cache, graphs built (the counting backend's ``built``)."""
    groups: dict[str, GroupStats] = field(default_factory=dict)
    regions: dict[str, RegionStats] = field(default_factory=dict)
    """Per compiled region, by its label (``dynamo.hook.region_label``): its exchanges."""


@dataclass(frozen=True, kw_only=True, slots=True)
class Stats:
    """This rank's counters: the runtime's (None without one) and the shared cache's."""

    rank: int
    world_size: int
    runtime: RuntimeStats | None = None
    cache: dict[str, Any] = field(default_factory=dict)
    """``_cache.stats()``: counts summed over the cache directories this process uses."""
    store_refused: int = 0
    """Values read from the job's store and refused outside any cache directory (status
    board, report, group setup): reported with the caches' in ``store_payloads_refused``."""

    @property
    def installed(self) -> bool:
        return self.runtime is not None

    def as_dict(self) -> dict[str, Any]:
        """The flat dict ``dynamo_dist.stats()`` returns (the keys the job report reads)."""
        out: dict[str, Any] = {"rank": self.rank, "world_size": self.world_size}
        rt = self.runtime
        if rt is not None:
            tr = rt.transport
            out.update(policy=rt.policy, transport=tr.name, consensus=rt.consensus)
            out.update(dataclasses.asdict(rt.hook))
            out.update(
                exchanges=tr.exchanges,
                first_entry_exchanges=rt.first_entry_exchanges,
                mixed_outcomes=tr.mixed_outcomes,
                divergences=tr.divergences,
                compiles=rt.compiles,
                local_compiles=rt.local_compiles,
                **tr.times(),
                groups={name: g.as_dict() for name, g in rt.groups.items()},
            )
        out["installed"] = self.installed
        out.update(self.cache)
        if rt is not None:
            # The compile accounting: what the frame callback counted (Dynamo's frames),
            # added to what the cache counted under the same keys (precompiled captures).
            built = sum(r.get("built", 0) for r in rt.traced_by_region.values())
            traced = {
                "frames_traced": rt.compiles + rt.local_compiles,
                "graphs_built": built,
                "recompiles": rt.recompiles,
                "recompile_reasons": rt.recompile_reasons,
                # Per region: its exchanges (the hook), its traces (the frame callback)
                # and its builds and loads (the cache), under one label.
                "regions": _counts.add(
                    {label: r.as_dict() for label, r in rt.regions.items()},
                    rt.traced_by_region,
                ),
            }
            for key, value in traced.items():
                out[key] = _counts.add(self.cache.get(key), value)
        refused = int(out.get("store_payloads_refused", 0)) + self.store_refused
        out["store_payloads_refused"] = refused
        return out
