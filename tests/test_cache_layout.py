"""The cache's structure: stages import only earlier stages, typed counters keep the report's
keys, private torch API stays in _torch_compat, and its patches restore what they change."""

from __future__ import annotations

import ast
import os
import re
from pathlib import Path

import pytest

from dynamo_dist import _cache, _torch_compat
from dynamo_dist._cache_stats import CacheStats

PKG = Path(_cache.__file__).resolve().parent

#: The cache's stages in import order; each may import only the ones before it.
STAGES = ["_cache_key", "_cache_stats", "_cache_agree", "_cache_protocol", "_cache_backend"]

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


def _package_imports(module: str) -> set[str]:
    """Every ``dynamo_dist`` module ``module`` imports, at any depth of its code."""
    tree = ast.parse((PKG / f"{module}.py").read_text())
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            if node.module:
                out.add(node.module)
            else:
                out.update(a.name for a in node.names)
    return out


@pytest.mark.parametrize("module", STAGES)
def test_stages_import_only_earlier_stages(module: str) -> None:
    later = set(STAGES[STAGES.index(module) :])
    assert not (_package_imports(module) & later), _package_imports(module)
    assert "_cache" not in _package_imports(module)  # never back up through the facade


def test_cache_modules_use_no_private_torch_api() -> None:
    for name in [*STAGES, "_cache"]:
        text = (PKG / f"{name}.py").read_text()
        assert not re.search(r"torch\._", text), name


def test_stats_record_keeps_the_reported_keys() -> None:
    s = CacheStats(cache_loads=2, compile_seconds_saved=1.23456)
    d = s.as_dict()
    assert list(d) == REPORTED
    assert d["cache_loads"] == 2 and d["compile_seconds_saved"] == 1.23


def test_facade_keeps_the_names_other_modules_use() -> None:
    for name in ["source_hash", "get_cache", "CachingBackend", "stats", "graph_key"]:
        assert hasattr(_cache, name), name
    assert _cache.stats() == {} or "cache_dir" in _cache.stats()


def test_inductor_cache_dir_override_restores(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    with _torch_compat.inductor_cache_dir_override(Path("/x/room")):
        assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == "/x/room"
        assert _torch_compat.inductor_cache_dir() == "/x/room"
    assert "TORCHINDUCTOR_CACHE_DIR" not in os.environ
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", "/prev")
    with pytest.raises(RuntimeError), _torch_compat.inductor_cache_dir_override("/x/room"):
        raise RuntimeError("compile failed")
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == "/prev"


def test_eager_backward_lowering_restores() -> None:
    from torch._functorch import config

    if not hasattr(config, "force_non_lazy_backward_lowering"):
        pytest.skip("this torch has no force_non_lazy_backward_lowering")
    before = config.force_non_lazy_backward_lowering
    with pytest.raises(RuntimeError), _torch_compat.eager_backward_lowering():
        assert config.force_non_lazy_backward_lowering is True
        raise RuntimeError("compile failed")
    assert config.force_non_lazy_backward_lowering == before
