"""The shared cache's decisions show up where PyTorch users look: TORCH_TRACE and counters.

A 2-rank inductor job run with ``TORCH_TRACE=dir`` must leave ``dynamo_dist_cache_*``
artifacts in the trace files (what tlparse shows) and count them in
``torch._dynamo.utils.counters["dynamo_dist"]``: a cold run publishes once and loads
once; a run over a corrupted entry refuses it, then publishes and loads again.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import ranks
import torch

import dynamo_dist

pytestmark = [pytest.mark.multiproc, pytest.mark.inductor, pytest.mark.timeout(400)]

HERE = __file__


# -- rank programs ---------------------------------------------------------------------
def events_job(rank: int, world: int, local_base: str) -> dict[str, Any]:
    """One small graph through the shared cache; returns stats and dynamo_dist's counters."""
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = os.path.join(local_base, f"rank{rank}")
    cf = dynamo_dist.compile(lambda x: (x.sin() * 2).cos())
    x = torch.randn(16)
    ok = bool(torch.allclose(cf(x), (x.sin() * 2).cos(), atol=1e-5))
    counters = dict(torch._dynamo.utils.counters["dynamo_dist"])
    return {"ok": ok, "stats": dynamo_dist.stats(), "counters": counters}


# -- tests -----------------------------------------------------------------------------
def _run(tmp: Path, name: str, cache: Path) -> tuple[ranks.RankRun, str]:
    trace = tmp / f"trace-{name}"
    env = {"DYNAMO_DIST_CACHE_DIR": str(cache), "TORCH_TRACE": str(trace)}
    run = ranks.launch(
        HERE, "events_job", str(tmp / f"local-{name}"), tmp=tmp, env=env, timeout=300
    )
    for r in (0, 1):
        assert run.rank(r)["ok"], run.output[-3000:]
    files = sorted(trace.glob("*"))
    assert len(files) >= 2, (files, run.output[-3000:])  # one trace file per rank
    return run, "".join(f.read_text(errors="replace") for f in files)


def _count(run: ranks.RankRun, event: str) -> int:
    return sum(int(run.rank(r)["counters"].get(event, 0)) for r in (0, 1))


def test_cache_events_in_torch_trace_and_counters(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    cold, trace = _run(tmp_path, "cold", cache)
    assert trace.count("dynamo_dist_cache_publish") == 1, trace[-3000:]
    assert trace.count("dynamo_dist_cache_load") == 1, trace[-3000:]
    assert "dynamo_dist_cache_refusal" not in trace
    assert _count(cold, "cache_publish") == 1 and _count(cold, "cache_load") == 1
    # The counters agree with the typed stats record the report reads.
    for r in (0, 1):
        s, c = cold.rank(r)["stats"], cold.rank(r)["counters"]
        assert s["cache_publishes"] == c.get("cache_publish", 0)
        assert s["cache_loads"] == c.get("cache_load", 0)

    # Corrupt the entry: the next job refuses it, recompiles, republishes, loads.
    (entry,) = (p for p in (cache / "entries").glob("*/*/*") if not p.name.startswith("."))
    art = entry / "artifact.tar"
    data = bytearray(art.read_bytes())
    data[len(data) // 2] ^= 0xFF
    art.write_bytes(bytes(data))
    again, trace = _run(tmp_path, "corrupt", cache)
    assert trace.count("dynamo_dist_cache_refusal") >= 1, trace[-3000:]
    assert _count(again, "cache_refusal") >= 1
    assert _count(again, "cache_publish") == 1 and _count(again, "cache_load") == 1
    assert "does not match its sha256" in trace  # the refusal's reason travels with it


if __name__ == "__main__":
    ranks.main(globals())
