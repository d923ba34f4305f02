"""The shared cache's key: every constant counts, and a key that cannot be computed is loud.

A key that silently leaves something out lets two different graphs share one entry,
so a rank would load and run the wrong program.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.fx

from dynamo_dist.cache.backend import CachingBackend
from dynamo_dist.cache.key import UnkeyableGraph, graph_key
from dynamo_dist.cache.protocol import SharedCache


def _graph(const: Any) -> torch.fx.GraphModule:
    """x + c, with c a get_attr constant, as Dynamo/AOT graphs hold lifted constants."""
    root = torch.nn.Module()
    root.register_buffer("c", const)
    g = torch.fx.Graph()
    x = g.placeholder("x")
    c = g.get_attr("c")
    g.output(g.call_function(torch.add, (x, c)))
    return torch.fx.GraphModule(root, g)


def _key(gm: torch.fx.GraphModule) -> str:
    return graph_key(gm, [torch.zeros(3)], {"backend": "test"})[0]


@pytest.mark.parametrize(
    "dtype", [torch.float32, torch.bfloat16, torch.float16, torch.int64, torch.bool]
)
def test_constants_of_every_dtype_are_in_the_key(dtype: torch.dtype) -> None:
    a = torch.zeros(3).to(dtype)
    b = torch.ones(3).to(dtype)
    assert _key(_graph(a)) != _key(_graph(b))
    assert _key(_graph(a)) == _key(_graph(a.clone()))


def test_large_constants_are_in_the_key() -> None:
    a = torch.zeros(10_000)
    b = a.clone()
    b[-1] = 1.0
    assert _key(_graph(a)) != _key(_graph(b))


def test_same_bytes_other_dtype_or_shape_differ() -> None:
    a = torch.zeros(4, dtype=torch.int32)
    assert _key(_graph(a)) != _key(_graph(a.view(torch.float32)))
    assert _key(_graph(a)) != _key(_graph(a.view(2, 2)))


def test_unkeyable_constant_raises() -> None:
    gm = _graph(torch.zeros(3))
    del gm.c
    with pytest.raises(UnkeyableGraph, match="'c'"):
        _key(gm)


def test_unkeyable_graph_compiles_uncached_with_one_warning(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    compiled: list[torch.fx.GraphModule] = []

    def inner(gm: torch.fx.GraphModule, example_inputs: list[Any]) -> Any:
        compiled.append(gm)
        return gm.forward

    cache = SharedCache(str(tmp_path / "c"), 10.0, 30.0, agree=False)
    backend = CachingBackend(inner, cache, {"backend": "test"}, "f (t.py:1)")
    gm = _graph(torch.zeros(3))
    del gm.c
    monkeypatch.setattr(logging.getLogger("dynamo_dist"), "propagate", True)
    with caplog.at_level(logging.WARNING, logger="dynamo_dist"):
        backend(gm, [torch.zeros(3)])
        backend(gm, [torch.zeros(3)])
    assert compiled == [gm, gm]
    warnings = [r for r in caplog.records if "could not be computed" in r.getMessage()]
    # One record (a logger another test left a capturing handler on may show it twice).
    assert len({id(r) for r in warnings}) == 1, caplog.text
    assert "f (t.py:1)" in warnings[0].getMessage()
    assert "UnkeyableGraph" in warnings[0].getMessage()
    assert cache.counts.cache_misses == 0
    assert not list((tmp_path / "c").rglob("manifest.json"))
