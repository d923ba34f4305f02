"""The compile accounting users read (issue 31): traced, built, loaded by source, recompiles.

Real ranks, gloo, inductor, one host (the two ranks share a local inductor cache, so
fan-out's host copies are used). Each job compiles a function through Dynamo (two
static shapes: a recompile) and a module through the precompiled route: three graphs.
A cold job builds each graph on one rank; a warm job on the same shared cache builds
nothing and loads the three on every rank. The figures are checked against Dynamo's and
inductor's own counters, and the loads' sources against the fan-out's own counts.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import ranks
import torch
from torch import nn
from torch.nn import functional as F

pytestmark = [pytest.mark.multiproc, pytest.mark.inductor, pytest.mark.timeout(600)]

HERE = __file__
#: Graphs a job needs: the function at two static shapes, the module's artifact.
GRAPHS = 3


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 16)
        self.head = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.head(F.gelu(self.fc(x)))
        return out


def scaled_sin(x: torch.Tensor) -> torch.Tensor:
    return (x.sin() * 2).sum(0)


# -- rank program ------------------------------------------------------------------------
def accounting_job(rank: int, world: int, local: str) -> dict[str, Any]:
    """Both ranks share ``local`` (one host); the shared cache comes from the environment."""
    from torch._dynamo.utils import counters, get_compilation_metrics

    import dynamo_dist

    os.environ["TORCHINDUCTOR_CACHE_DIR"] = local
    f = dynamo_dist.compile(scaled_sin, dynamic=False)
    ok = True
    for n in (4, 4, 6):  # the third call fails the size guard: a recompile
        x = torch.full((n, 3), float(n))
        ok &= bool(torch.allclose(f(x), scaled_sin(x), atol=1e-5))
    torch.manual_seed(0)
    model = Tiny()
    m = dynamo_dist.compile(model)
    m(torch.randn(4, 8)).sum().backward()
    return {
        "ok": ok,
        "stats": dynamo_dist.stats(),
        "dynamo": {
            "frames_ok": int(counters["frames"]["ok"]),
            "unique_graphs": int(counters["stats"]["unique_graphs"]),
            "fxgraph_cache_miss": int(counters["inductor"]["fxgraph_cache_miss"]),
            "recompiles": sum(1 for c in get_compilation_metrics() if c.recompile_reason),
        },
    }


# -- tests -------------------------------------------------------------------------------
def _job(tmp: Path, cache: Path, local: Path) -> list[dict[str, Any]]:
    env = {
        "DYNAMO_DIST_CACHE_DIR": str(cache),
        "DYNAMO_DIST_CACHE_FOLLOWERS": "wait",  # one rank builds each graph
        "DYNAMO_DIST_LOG": "INFO",
    }
    run = ranks.launch(HERE, "accounting_job", str(local), tmp=tmp, env=env, timeout=500)
    out = [run.rank(r) for r in (0, 1)]
    assert all(r["ok"] for r in out), (out, run.output[-4000:])
    return out


def _regions_add_up(s: dict[str, Any]) -> None:
    """Every graph and frame is counted in exactly one region, each named after its code."""
    regions = s["regions"]
    for what, total in (("traced", "frames_traced"), ("built", "graphs_built")):
        assert sum(r.get(what, 0) for r in regions.values()) == s[total], (what, s)
    assert sum(r.get("loaded", 0) for r in regions.values()) == s["graphs_loaded"], s
    assert any("scaled_sin" in label for label in regions), regions
    assert any("Tiny" in label for label in regions), regions


def test_cold_counts_match_dynamo_and_a_warm_start_builds_nothing(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    cold = _job(tmp_path, cache, tmp_path / "local-cold")
    published = sum(r["stats"]["cache_publishes"] for r in cold)
    assert published == GRAPHS, [r["stats"] for r in cold]
    for r in cold:
        s, dyn = r["stats"], r["dynamo"]
        # Traced: Dynamo's own frames, plus the module's capture (aot_compile) if any.
        assert s["frames_traced"] == dyn["frames_ok"] + s["precompiled_captures"], (s, dyn)
        assert dyn["frames_ok"] == 2  # scaled_sin, then its recompile
        # Built: inductor compiled graphs here exactly when this rank says it built any.
        built_by_dynamo = s["graphs_built"] - s["precompiled_captures"]
        assert (built_by_dynamo > 0) == (dyn["fxgraph_cache_miss"] > 0), (s, dyn)
        # Each graph was either built here or loaded: never both, never neither.
        assert s["graphs_built"] + s["graphs_loaded"] == GRAPHS, s
        assert s["cache_hits"] == s["graphs_loaded"] == s["cache_loads"], s
        assert s["cache_misses"] == s["graphs_built"], s
        assert sum(s["loaded_from"].values()) == s["graphs_loaded"], s
        # The recompile: counted once, with Dynamo's reason (the size guard).
        assert s["recompiles"] == dyn["recompiles"] == 1, (s, dyn)
        ((reason, n),) = s["recompile_reasons"].items()
        assert n == 1 and "size mismatch" in reason, reason
        _regions_add_up(s)
    assert sum(r["stats"]["graphs_built"] for r in cold) == published

    warm = _job(tmp_path, cache, tmp_path / "local-warm")
    for r in warm:
        s, dyn = r["stats"], r["dynamo"]
        assert s["graphs_built"] == 0 and s["inductor_compiles"] == 0, s
        assert dyn["fxgraph_cache_miss"] == 0, dyn
        assert s["graphs_loaded"] == published == s["cache_hits"], s
        assert s["cache_misses"] == 0 and s["cache_publishes"] == 0, s
        # The module ran its artifact: nothing traced for it; the function traced twice.
        assert s["loaded_from"].get("precompiled") == s["precompiled_loads"] == 1, s
        assert s["precompiled_captures"] == 0
        assert s["frames_traced"] == dyn["frames_ok"] == 2, (s, dyn)
        # Graphs from the shared directory or the host's copy, as fan-out counted them.
        assert s["cache_loads"] == s["cache_host_fetches"] + s["cache_host_loads"], s
        assert s["loaded_from"].get("shared", 0) <= s["cache_host_fetches"], s
        assert s["loaded_from"].get("host_copy", 0) <= s["cache_host_loads"], s
        assert s["recompiles"] == 1, s
        # Measured: what the loads' builds took minus what loading took.
        saved = round(s["build_seconds_loaded"] - s["load_seconds"], 2)
        assert abs(s["build_seconds_saved"] - saved) <= 0.011, s
        assert s["build_seconds_loaded"] > 0, s
        _regions_add_up(s)
    # One host: each Dynamo graph read from the shared directory by one rank, whose copy
    # the other rank loaded.
    for source in ("shared", "host_copy"):
        assert sum(r["stats"]["loaded_from"].get(source, 0) for r in warm) == GRAPHS - 1, [
            r["stats"]["loaded_from"] for r in warm
        ]


if __name__ == "__main__":
    ranks.main(globals())
