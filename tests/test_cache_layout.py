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
    "store_payloads_refused",
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


def test_entry_gets_the_kernels_inductor_kept_in_memory(tmp_path: Path) -> None:
    """A kernel built for an earlier graph is only re-written as .cpp: its .so is copied in."""
    from dynamo_dist._cache_protocol import _complete_kernels

    room, local = tmp_path / "room", tmp_path / "local"
    for d in (room / "ej", local / "ej"):
        d.mkdir(parents=True)
    (room / "ej" / "k.main.cpp").write_text("src")
    (local / "ej" / "k.main.so").write_bytes(b"ELF")
    (room / "ej" / "built.cpp").write_text("src")
    (room / "ej" / "built.so").write_bytes(b"own")
    (local / "ej" / "built.so").write_bytes(b"other")
    (room / "ej" / "link.cpp").write_text("src")
    (local / "ej" / "link.so").symlink_to("/etc/passwd")
    _complete_kernels(room, local)
    assert (room / "ej" / "k.main.so").read_bytes() == b"ELF"
    assert (room / "ej" / "built.so").read_bytes() == b"own"  # never overwritten
    assert not os.path.lexists(room / "ej" / "link.so")  # links are not copied
    assert sorted(p.name for p in (room / "ej").iterdir()) == [
        "built.cpp",
        "built.so",
        "k.main.cpp",
        "k.main.so",
        "link.cpp",
    ]


def test_entry_gets_the_isa_probe_a_follower_built_outside_any_room(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A rank that followed first ran the CPU ISA probe in its local cache, not in a room.

    When it later leads, its entries must still carry the probe's files, or a fresh host
    that loads only that entry runs gcc once per ISA before its first kernel loads.
    """
    from dynamo_dist import _cache_protocol

    probes = sorted(_torch_compat.isa_probe_sources())
    if not probes:
        pytest.skip("this torch's ISA probe sources are not recognised")
    monkeypatch.setattr(_cache_protocol, "_probe_files", set())
    monkeypatch.setattr(_cache_protocol, "_probe_searched", False)
    room, local = tmp_path / "room", tmp_path / "local"
    (room / "ab").mkdir(parents=True)
    (local / "pq").mkdir(parents=True)
    (room / "ab" / "graph.cpp").write_text("kernel")
    (room / "ab" / "graph.so").write_bytes(b"ELF graph")
    (local / "pq" / "probe.cpp").write_text(probes[0] + "\n")
    (local / "pq" / "probe.so").write_bytes(b"ELF probe")
    _cache_protocol._complete_kernels(room, local)
    assert (room / "pq" / "probe.cpp").read_text().strip() == probes[0]
    assert (room / "pq" / "probe.so").read_bytes() == b"ELF probe"


@pytest.mark.timeout(60)
def test_probe_search_never_follows_links_or_blocks_on_fifos(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The local cache is not trusted: a FIFO named .cpp must not hang the leader (it
    holds the lock meanwhile), and a linked directory must not leak its files into an
    entry everyone loads."""
    from dynamo_dist import _cache_protocol

    probes = sorted(_torch_compat.isa_probe_sources())
    if not probes:
        pytest.skip("this torch's ISA probe sources are not recognised")
    monkeypatch.setattr(_cache_protocol, "_probe_files", set())
    monkeypatch.setattr(_cache_protocol, "_probe_searched", False)
    room, local, outside = tmp_path / "room", tmp_path / "local", tmp_path / "outside"
    for d in (room / "ab", local / "ff", outside):
        d.mkdir(parents=True)
    (room / "ab" / "graph.cpp").write_text("kernel")
    os.mkfifo(local / "ff" / "hang.cpp")
    (outside / "probe.cpp").write_text(probes[0])
    (outside / "probe.so").write_bytes(b"ATTACKER")
    (local / "pq").symlink_to(outside)
    (local / "ab").mkdir()
    (local / "ab" / "graph.so").symlink_to(outside / "probe.so")
    _cache_protocol._complete_kernels(room, local)
    assert sorted(str(p.relative_to(room)) for p in room.rglob("*")) == ["ab", "ab/graph.cpp"]
