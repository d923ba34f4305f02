"""The runtime's modules import in architecture order: hook -> exchange -> policy ->
consensus -> cache -> runtime -> api/launcher, with no import (lazy or not) reaching up.

A module may import any module listed before it. The cache's internals are one layer
here (their order among themselves is the cache side's business).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parent.parent / "dynamo_dist"

LAYERS: list[tuple[str, ...]] = [
    ("_torch_compat", "_log", "_errors", "_limits", "_version", "_proc", "_C"),
    ("_events", "_stats", "_config"),
    ("_cache_fs",),  # the cache's one filesystem layer (its secret reads files too)
    ("_secret",),
    ("_store_payload",),  # caps and MACs on what is read from the job's store
    ("_hook",),  # hook
    ("_local",),  # which ranks a compile agrees with (local(), the group's scope)
    ("_status", "_group"),
    ("_collective",),  # exchange
    ("_shm",),
    ("_policy",),  # policy
    ("_callback",),
    ("_consensus",),  # consensus
    ("_cache_key", "_cache_stats", "_cache_rooms"),  # cache: the key, its counters and events
    ("_cache_store", "_cache_agree"),  # the directory; the cross-rank agreement
    ("_cache_lock",),  # leader locks in the directory
    ("_cache_protocol",),  # leader/follower
    ("_cache_profile",),  # automatic-dynamic decisions across restarts
    ("_cache_backend",),  # the Dynamo backend in front of inductor
    ("_precompile_artifact",),  # one precompiled artifact: capture, guards, bytes, checks
    ("_cache",),  # the cache's facade
    ("_precompile",),  # precompiled calls, agreed across ranks
    ("_report",),
    ("_runtime",),  # lifecycle
    ("_intercept",),
    ("_api",),  # api / launcher
    ("_switch",),  # every torch.compile as dynamo_dist.compile
    ("launch", "_cache_cli"),
    ("cli", "__init__", "__main__"),
]
RANK = {m: i for i, layer in enumerate(LAYERS) for m in layer}


def _imports(path: Path) -> set[str]:
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            if node.module:
                out.add(node.module.split(".")[0])
            else:
                out.update(a.name for a in node.names)
    return out


@pytest.mark.parametrize("path", sorted(PKG.glob("*.py")), ids=lambda p: p.stem)
def test_imports_only_reach_down(path: Path) -> None:
    me = path.stem
    assert me in RANK, f"place {me} in a layer of tests/test_layers.py"
    up = sorted(m for m in _imports(path) if RANK.get(m, -1) > RANK[me] or m == me)
    assert not up, f"{me} imports {up}, which sit above it in the architecture"
