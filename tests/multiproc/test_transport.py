"""Guard-exchange transports: shared memory within a host, hierarchical across hosts, gloo."""

from __future__ import annotations

import os
import random
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
import ranks

from dynamo_dist.exchange.shm import sweep_stale_segments

HERE = __file__
CONSISTENCY = str(Path(__file__).resolve().parent / "test_consistency.py")


# -- rank program ----------------------------------------------------------------------
def transports_agree(rank: int, world: int, n: str, n_gloo: str) -> dict[str, Any]:
    """Both transports, driven directly, against an oracle every rank can compute."""
    from dynamo_dist.dist import group as dist_group
    from dynamo_dist.exchange.collective import GlooTransport
    from dynamo_dist.exchange.shm import ShmTransport, topology

    n_shm, n_gl = int(n), int(n_gloo)
    ranks = tuple(range(world))
    store = dist_group.job_store()
    prefix = dist_group.rendezvous(store, ranks, timeout=120, stall_warning=10, where="test")
    group = dist_group.gloo_group(store, f"{prefix}/guard", ranks, 120)
    common: dict[str, Any] = {
        "group": group,
        "ranks": ranks,
        "group_name": "world",
        "timeout": 60,
        "wait_log_interval": 30,
        "stall_warning": 10,
        "board": None,
        "describe": str,
    }
    gloo = GlooTransport(**common)
    topo = topology(group, ranks)
    shm = ShmTransport(topo=topo, store=store, prefix=prefix, **common)
    shm_hook = shm.make_hook()

    def plan(step: int) -> list[bool]:
        rng = random.Random(step)
        miss_rate = rng.choice([0.0, 0.0, 0.01, 0.3])
        return [rng.random() >= miss_rate for _ in range(world)]

    mismatches = {"gloo": 0, "shm": 0}
    verdicts = {"gloo": 0, "shm": 0}
    for step in range(max(n_shm, n_gl)):
        hits = plan(step)
        want = all(hits)
        ident = 1000 + step % 7
        if step < n_shm:
            got = shm_hook.exchange(hits[rank], ident)
            mismatches["shm"] += got != want
            verdicts["shm"] += got
        if step < n_gl:
            got = gloo.exchange(hits[rank], ident)
            mismatches["gloo"] += got != want
            verdicts["gloo"] += got
    return {
        "ok": True,
        "mismatches": mismatches,
        "verdicts": verdicts,
        "transport": shm.name,
        "hosts": topo.hosts,
        "local_world": topo.local_world,
        "mixed": shm.mixed,
    }


# -- tests -----------------------------------------------------------------------------
def _assert_agree(
    run: ranks.RankRun, nproc: int, n: int, n_gloo: int, transport: str, hosts: int
) -> None:
    for r in range(nproc):
        res = run.rank(r)
        assert res["ok"], res
        assert res["mismatches"] == {"gloo": 0, "shm": 0}, res
        assert res["transport"] == transport and res["hosts"] == hosts
    # Every rank saw the same verdicts, and shm and gloo agree over their common prefix.
    verdicts = [run.rank(r)["verdicts"] for r in range(nproc)]
    assert all(v == verdicts[0] for v in verdicts)
    if n == n_gloo:
        assert verdicts[0]["shm"] == verdicts[0]["gloo"]


@pytest.mark.multiproc
@pytest.mark.timeout(400)
def test_transports_agree_two_ranks(tmp_path):
    # Every step draws its own miss rate (none, 1%, 30%): 30,000 steps cover each
    # many thousand times over.
    run = ranks.launch(HERE, "transports_agree", 30000, 30000, tmp=tmp_path, timeout=360)
    _assert_agree(run, 2, 30000, 30000, "shm", 1)


@pytest.mark.multiproc
@pytest.mark.timeout(400)
def test_transports_agree_four_ranks_oversubscribed(tmp_path):
    # 4 ranks on 2 cores: the gloo leg is 4x slower, so it covers a 5,000 prefix.
    run = ranks.launch(HERE, "transports_agree", 30000, 5000, tmp=tmp_path, nproc=4, timeout=360)
    _assert_agree(run, 4, 30000, 5000, "shm", 1)


@pytest.mark.multiproc
@pytest.mark.timeout(400)
def test_two_hosts_use_the_hierarchical_path(tmp_path):
    run = ranks.launch(HERE, "transports_agree", 5000, 5000, tmp=tmp_path, hosts=2, timeout=360)
    _assert_agree(run, 4, 5000, 5000, "shm+native", 2)
    assert {run.rank(r)["local_world"] for r in range(4)} == {2}


@pytest.mark.multiproc
@pytest.mark.timeout(300)
def test_two_hosts_consistency_end_to_end(tmp_path):
    run = ranks.launch(CONSISTENCY, "divergent_shape", tmp=tmp_path, hosts=2, timeout=240)
    graphs = {run.rank(r)["graphs"] for r in range(4)}
    assert graphs == {2}
    assert {run.rank(r)["stats"]["transport"] for r in range(4)} == {"shm+native"}


def _leftovers(runs: list[dict[str, Any]]) -> list[str]:
    """Segments in /dev/shm named by the runs or created by one of their processes."""
    pids = {str(res["pid"]) for res in runs}
    named = {res["segment"].lstrip("/") for res in runs if res.get("segment")}
    return sorted(
        n
        for n in os.listdir("/dev/shm")
        if n.startswith("dynamo_dist.") and (n in named or n.split(".")[1] in pids)
    )


@pytest.mark.multiproc
@pytest.mark.timeout(300)
def test_no_segment_left_after_normal_exit_and_crash(tmp_path):
    shm = {"DYNAMO_DIST_TRANSPORT": "shm"}
    normal = ranks.launch(CONSISTENCY, "divergent_shape", tmp=tmp_path, env=shm)
    done = [normal.rank(r) for r in (0, 1)]
    for res in done:
        assert res["ok"] and res["stats"]["transport"] == "shm", res
    assert done[0]["segment"] and done[0]["segment"] == done[1]["segment"]

    crash = ranks.launch(
        CONSISTENCY,
        "killed_rank",
        tmp=tmp_path,
        env=shm,
        torchrun_args=["--monitor-interval", "3"],
    )
    survivor = crash.rank(0)  # the host's leader, which created the segment
    assert survivor["error"] == "CollectiveTimeoutError", survivor
    assert survivor["stats"]["transport"] == "shm" and survivor["segment"], survivor
    assert 1 not in crash.ranks, "rank 1 must have died without writing a result"

    assert _leftovers([*done, survivor]) == []


def test_stale_segment_of_a_dead_creator_is_swept():
    dead = subprocess.Popen(["true"])
    dead.wait()
    path = f"/dev/shm/dynamo_dist.{dead.pid}.deadbeef"
    with open(path, "wb") as fh:
        fh.write(b"\0" * 64)
    # No header to read a lease from: judged by its name's pid, once old enough that
    # no live creator can still be writing it.
    old = time.time() - 120
    os.utime(path, (old, old))
    mine = f"/dev/shm/dynamo_dist.{os.getpid()}.cafe"
    with open(mine, "wb") as fh:
        fh.write(b"\0" * 64)
    try:
        sweep_stale_segments()
        assert not os.path.exists(path)
        assert os.path.exists(mine)
    finally:
        for p in (path, mine):
            if os.path.exists(p):
                os.unlink(p)


if __name__ == "__main__":
    ranks.main(globals())
