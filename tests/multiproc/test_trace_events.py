"""dynamo_dist's events land where PyTorch users look: TORCH_TRACE files and dynamo's counters.

A 2-rank job in which one rank sees a different shape forces a recompile on the
other; with ``TORCH_TRACE`` set, each rank's structured-trace file (what tlparse
reads) must hold a ``dynamo_dist_forced_recompile`` artifact, and
``torch._dynamo.utils.counters["dynamo_dist"]`` must count it.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import ranks

pytestmark = [pytest.mark.multiproc, pytest.mark.timeout(300)]

# The rank program: rank 1 sees a different shape at step 3, so rank 0, which hit, is
# forced to recompile; it reports dynamo's dynamo_dist counters.
CONSISTENCY = str(Path(__file__).resolve().parent / "test_consistency.py")


# -- test --------------------------------------------------------------------------------
def test_forced_recompile_in_torch_trace_and_counters(tmp_path: Path) -> None:
    trace_dir = tmp_path / "trace"
    trace_dir.mkdir()
    run = ranks.launch(
        CONSISTENCY, "divergent_shape", tmp=tmp_path, env={"TORCH_TRACE": str(trace_dir)}
    )
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
