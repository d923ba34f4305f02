"""dynamo_dist's events land where PyTorch users look: TORCH_TRACE files and dynamo's counters.

A 2-rank job in which one rank sees a different shape forces a recompile on the
other; with ``TORCH_TRACE`` set, each rank's structured-trace file (what tlparse
reads) must hold a ``dynamo_dist_forced_recompile`` artifact, and
``torch._dynamo.utils.counters["dynamo_dist"]`` must count it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import ranks
import torch
from ranks import CountingBackend, result

import dynamo_dist

pytestmark = [pytest.mark.multiproc, pytest.mark.timeout(300)]

HERE = __file__


def _f(x: torch.Tensor) -> torch.Tensor:
    return (x * 2).sum(0) + 1


# -- rank program ----------------------------------------------------------------------
def forced_recompile(rank: int, world: int) -> dict[str, Any]:
    """Rank 1 gets a different shape at step 3; rank 0 hits and is forced to recompile."""
    from torch._dynamo.utils import counters

    cb = CountingBackend()
    cf = dynamo_dist.compile(_f, backend=cb)
    ok = True
    for step in range(5):
        n = 5 if (rank == 1 and step == 3) else 4
        x = torch.full((n, 3), float(step + 1))
        ok &= bool(torch.allclose(cf(x), _f(x)))
    return result(cb, ok, counters=dict(counters["dynamo_dist"]))


# -- test --------------------------------------------------------------------------------
def test_forced_recompile_in_torch_trace_and_counters(tmp_path: Path) -> None:
    trace_dir = tmp_path / "trace"
    trace_dir.mkdir()
    run = ranks.launch(HERE, "forced_recompile", tmp=tmp_path, env={"TORCH_TRACE": str(trace_dir)})
    assert run.returncode == 0, run.output[-4000:]
    for r in (0, 1):
        assert run.rank(r)["ok"], run.rank(r)
    # Rank 0 hit while rank 1 missed: rank 0 was forced to recompile.
    forced = run.rank(0)
    assert forced["stats"]["forced_recompiles"] >= 1
    assert forced["counters"].get("forced_recompile", 0) >= 1
    files = sorted(trace_dir.glob("*rank_0*"))
    assert files, f"no trace file for rank 0 in {sorted(p.name for p in trace_dir.iterdir())}"
    text = "".join(p.read_text(errors="replace") for p in files)
    assert "dynamo_dist_forced_recompile" in text


if __name__ == "__main__":
    ranks.main(globals())
