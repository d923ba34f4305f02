"""The C++ hook's exchange figures: cost and wait samples, counts per frame and per region.

A real ``_C.GuardHook`` over a Python transport callable (no second rank needed: the
callable stands in for the exchange and says how long it waited), real frame identities
computed inside real regions, and the runtime's summing into ``stats()['regions']``.
"""

from __future__ import annotations

from collections.abc import Callable

from dynamo_dist.dist.runtime import _region_of
from dynamo_dist.dynamo import hook as dynamo_hook
from dynamo_dist.dynamo.hook import _C
from dynamo_dist.exchange.stats import regions

WAIT_NS = 3_000_000


def _exchange_in(region: int, hook: _C.GuardHook, hit: bool) -> bool:
    """One exchange about this call site, made inside ``region`` as a compiled call's is."""
    leave = _C.RegionEnter(region, hook)()
    try:
        return bool(hook.exchange(hit, dynamo_hook.identity()))
    finally:
        leave()


def _first() -> None:  # two compiled functions (their regions are what the report names)
    pass


def _second() -> None:
    pass


def test_exchanges_per_region_are_the_calls_made_in_it() -> None:
    hook = _C.GuardHook(lambda hit, ident: (hit, WAIT_NS))
    first = dynamo_hook.register_region(_first, "unit-figures")
    second = dynamo_hook.register_region(_second, "unit-figures")
    plan: list[tuple[int, bool]] = [(first, i > 0) for i in range(7)]
    plan += [(second, i > 0) for i in range(3)]
    for region, hit in plan:
        assert _exchange_in(region, hook, hit) == hit
    by_label = {label: r.as_dict() for label, r in regions(hook.frames(), _region_of).items()}
    assert by_label == {
        dynamo_hook.region_label(first): {
            "exchanges": 7,
            "hits": 6,
            "misses": 1,
            "wait_ms_total": 21.0,
            "wait_ms_max": 3.0,
            "frames": 1,
        },
        dynamo_hook.region_label(second): {
            "exchanges": 3,
            "hits": 2,
            "misses": 1,
            "wait_ms_total": 9.0,
            "wait_ms_max": 3.0,
            "frames": 1,
        },
    }
    cost, wait = hook.samples_ns()
    assert wait == [WAIT_NS] * 10 and len(cost) == 10
    assert hook.counters()["hook_exchanges"] == 10


def test_a_verdict_alone_is_all_cost() -> None:
    """A transport callable that returns only the verdict measured no wait."""
    hook = _C.GuardHook(lambda hit, ident: hit)
    for i in range(5):
        hook.exchange(True, 100 + i % 2)
    cost, wait = hook.samples_ns()
    assert wait == [0] * 5 and len(cost) == 5
    assert sorted(hook.frames()) == [(100, 3, 3, 0, 0), (101, 2, 2, 0, 0)]


def test_frame_counts_are_bounded_and_lose_no_exchange() -> None:
    hook = _C.GuardHook(lambda hit, ident: (hit, 1))
    n = 5000
    for i in range(n):
        hook.exchange(i % 3 != 0, i * 7919 + 1)
    frames = hook.frames()
    others = [f for f in frames if f[0] == -1]
    assert len(frames) == 4096 + 1 and len(others) == 1
    assert others[0][1] == n - 4096
    assert sum(f[1] for f in frames) == n and sum(f[2] for f in frames) == n - (n + 2) // 3
    assert sum(f[3] for f in frames) == n
    label_of: Callable[[int], str] = _region_of
    assert "other frames" in label_of(-1)


def test_samples_keep_the_last_8192_exchanges() -> None:
    waits = iter(range(10_000))
    hook = _C.GuardHook(lambda hit, ident: (hit, next(waits)))
    for _ in range(10_000):
        hook.exchange(True, 7)
    cost, wait = hook.samples_ns()
    assert len(cost) == len(wait) == 8192
    assert sorted(wait) == list(range(10_000 - 8192, 10_000))
