"""The cache's counters keep the report's keys, and the compat patches restore what they change."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from dynamo_dist.cache.stats import CacheStats
from dynamo_dist.dynamo import inductor, patches

#: The counters dynamo_dist.stats() has always reported (the report and launcher read them).
REPORTED = [
    "cache_hits",
    "cache_misses",
    "cache_loads",
    "cache_publishes",
    "cache_refused",
    "cache_fallbacks",
    "cache_compiled_alongside",
    "cache_compiled_ahead",
    "cache_errors",
    "cache_bytes_read",
    "cache_bytes_written",
    "inductor_compiles",
    "profile_loads",
    "profile_publishes",
    "cache_host_fetches",
    "cache_host_loads",
    "profile_skipped",
    "store_payloads_refused",
    "precompiled_captures",
    "precompiled_loads",
    "precompiled_calls",
    "precompiled_misses",
    "precompiled_fallbacks",
    "precompiled_stale",
    "frames_traced",
    "graphs_built",
    "graphs_loaded",
    "loaded_from",
    "recompiles",
    "recompile_reasons",
    "build_seconds_loaded",
    "load_seconds",
    "regions",
    "build_seconds_saved",
]


def test_stats_record_keeps_the_reported_keys() -> None:
    s = CacheStats(cache_loads=2, build_seconds_loaded=1.23456, load_seconds=0.2)
    d = s.as_dict()
    assert list(d) == REPORTED
    assert d["cache_loads"] == 2 and d["build_seconds_saved"] == 1.03


def test_every_load_is_a_hit_counted_by_source_and_region() -> None:
    s = CacheStats()
    s.count_loaded("host_copy", "f (a.py:1)", 2.0, 0.5)
    s.count_loaded("shared", "f (a.py:1)", None, 9.0)  # no recorded build time
    s.count_loaded("precompiled", "m (b.py:3)", 1.0, 1.5)  # slower than its build
    s.count_built("g (c.py:5)")
    d = s.as_dict()
    assert d["graphs_loaded"] == d["cache_hits"] == 3 and d["cache_misses"] == 0
    assert d["loaded_from"] == {"host_copy": 1, "shared": 1, "precompiled": 1}
    # Only loads with a recorded build time are measured; a slow one counts negative.
    assert d["build_seconds_loaded"] == 3.0 and d["load_seconds"] == 2.0
    assert d["build_seconds_saved"] == 1.0
    assert d["regions"] == {
        "f (a.py:1)": {"loaded": 2},
        "m (b.py:3)": {"loaded": 1},
        "g (c.py:5)": {"built": 1},
    }


def test_recompile_reasons_stay_bounded() -> None:
    s = CacheStats()
    for n in range(100):
        s.count_recompile(f"size mismatch, actual {n}")
    s.count_recompile("x" * 1000)
    assert s.recompiles == 101
    assert len(s.recompile_reasons) == 33 and s.recompile_reasons["other"] == 69


def test_inductor_cache_dir_override_restores(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    with inductor.cache_dir_override(Path("/x/room")):
        assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == "/x/room"
        assert inductor.cache_dir() == "/x/room"
    assert "TORCHINDUCTOR_CACHE_DIR" not in os.environ
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", "/prev")
    with pytest.raises(RuntimeError), inductor.cache_dir_override("/x/room"):
        raise RuntimeError("compile failed")
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == "/prev"


def test_eager_backward_lowering_restores() -> None:
    from torch._functorch import config

    if not hasattr(config, "force_non_lazy_backward_lowering"):
        pytest.skip("this torch has no force_non_lazy_backward_lowering")
    before = config.force_non_lazy_backward_lowering
    with pytest.raises(RuntimeError), patches.eager_backward_lowering():
        assert config.force_non_lazy_backward_lowering is True
        raise RuntimeError("compile failed")
    assert config.force_non_lazy_backward_lowering == before
