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
    "compile_seconds_saved",
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
]


def test_stats_record_keeps_the_reported_keys() -> None:
    s = CacheStats(cache_loads=2, compile_seconds_saved=1.23456)
    d = s.as_dict()
    assert list(d) == REPORTED
    assert d["cache_loads"] == 2 and d["compile_seconds_saved"] == 1.23


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
