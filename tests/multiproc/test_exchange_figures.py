"""The job report's exchange figures on real ranks: own cost apart from the wait for peers.

One rank arrives late at every exchange of one compiled function (it sleeps first); its
peers' exchanges then wait for it, and the report must show that as their wait, not
as what the exchange costs. Two compiled functions called a known number of times give
the per-region breakdown its truth. Durations are only compared with each other (wait
against cost, one rank's wait against another's), or with the injected lateness, and
with margins a loaded machine keeps: the late rank's own waits are scheduling noise
(a peer descheduled for a few ms on 2 cores shared by 4 ranks), which the lateness
(LATE_S, far above such noise) must dominate by a few times, not by an exact factor.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest
import ranks
import torch

import dynamo_dist

pytestmark = [pytest.mark.multiproc, pytest.mark.timeout(400)]

HERE = __file__
LATE_S = 0.2
LATE_CALLS = 7  # of _late, each after the late rank's sleep
ON_TIME_CALLS = 3  # of _on_time, nobody sleeping


def _late(x: torch.Tensor) -> torch.Tensor:
    return (x * 2).sum(0) + 1


def _on_time(x: torch.Tensor) -> torch.Tensor:
    return x.relu() - 1


# -- rank program ----------------------------------------------------------------------
def late_rank(rank: int, world: int) -> dict[str, Any]:
    """The last rank sleeps LATE_S before each call of ``_late``; then ``_on_time`` calls."""
    late = dynamo_dist.compile(_late, backend="eager")
    on_time = dynamo_dist.compile(_on_time, backend="eager")
    x = torch.ones(4, 3)
    for _ in range(LATE_CALLS):
        if rank == world - 1:
            time.sleep(LATE_S)
        late(x)
    for _ in range(ON_TIME_CALLS):
        on_time(x)
    final = dynamo_dist.stats()
    dynamo_dist.shutdown()  # publishes this rank's stats; rank 0 writes the report
    return {"stats": final}


# -- tests -----------------------------------------------------------------------------
def _assert_wait_not_cost(run: ranks.RankRun, world: int, transport: str) -> None:
    stats = {r: run.rank(r)["stats"] for r in range(world)}
    late = stats[world - 1]
    for r, st in stats.items():
        assert st["transport"] == transport, st
        assert st["exchanges"] == LATE_CALLS + ON_TIME_CALLS, st
        assert "p50_us" not in st and "p99_us" not in st  # the undefined figures are gone
        # Per region: exchanges are the compiled calls, the first of each a miss (no
        # entry yet), the others hits; every identity of a region is one call site here.
        regions = st["regions"]
        assert sorted(g["exchanges"] for g in regions.values()) == [ON_TIME_CALLS, LATE_CALLS]
        for g in regions.values():
            assert (g["hits"], g["misses"], g["frames"]) == (g["exchanges"] - 1, 1, 1), g
        if r == world - 1:
            continue
        # Most of this rank's exchanges waited for the late rank (LATE_S each): its wait,
        # and not its cost, shows it.
        assert st["wait_p50_us"] >= 0.4 * LATE_S * 1e6, st
        assert st["wait_p50_us"] >= 10 * st["cost_p50_us"], st
        assert st["wait_p50_us"] >= 4 * late["wait_p50_us"], (st, late)

        def late_region(s: dict[str, Any]) -> dict[str, Any]:
            return next(g for g in s["regions"].values() if g["exchanges"] == LATE_CALLS)

        waited = late_region(st)["wait_ms_total"]
        assert waited >= 0.4 * LATE_S * LATE_CALLS * 1e3, st
        assert waited >= 4 * late_region(late)["wait_ms_total"], (st, late)
        assert late_region(st)["wait_ms_max"] >= 0.4 * LATE_S * 1e3


@pytest.mark.parametrize("transport", ["shm", "gloo"])
def test_a_late_rank_shows_as_its_peers_wait_not_as_cost(tmp_path, transport):
    report = tmp_path / "report.json"
    env = {
        "DYNAMO_DIST_TRANSPORT": transport,
        "DYNAMO_DIST_REPORT": str(report),
        "DYNAMO_DIST_REPORT_VERBOSE": "1",
    }
    run = ranks.launch(HERE, "late_rank", tmp=tmp_path, env=env, timeout=360)
    assert run.returncode == 0, run.output[-4000:]
    _assert_wait_not_cost(run, 2, transport)
    # The saved report has the same figures; rank 0's table at exit has the regions.
    saved = json.loads(Path(report).read_text())
    for r in (0, 1):
        for key in ("cost_p50_us", "wait_p50_us", "wait_p99_us", "regions"):
            assert saved["ranks"][str(r)][key] == run.rank(r)["stats"][key], key
    assert "per region:" in run.output and "wait p50 us" in run.output


def test_waits_across_hosts_are_waits_on_every_rank(tmp_path):
    """Two hosts of two ranks, the late rank a host's non-leader: the other host's leader
    waits in the cross-host step, its other rank for the verdict, the late rank's own
    leader for its post: all of it wait."""
    run = ranks.launch(HERE, "late_rank", tmp=tmp_path, hosts=2, timeout=360)
    assert run.returncode == 0, run.output[-4000:]
    _assert_wait_not_cost(run, 4, "shm+native")


if __name__ == "__main__":
    ranks.main(globals())
