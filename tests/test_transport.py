"""Guard-exchange transports: shared memory within a host, hierarchical across hosts, gloo."""

from __future__ import annotations

import os
import subprocess

import pytest

from dynamo_dist._shm import sweep_stale_segments

pytestmark = [pytest.mark.multiproc]


def _segments() -> set[str]:
    return {n for n in os.listdir("/dev/shm") if n.startswith("dynamo_dist.")}


def _assert_agree(run, nproc: int, n: int, n_gloo: int, transport: str, hosts: int) -> None:
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


@pytest.mark.timeout(400)
def test_transports_agree_two_ranks(run_ranks):
    run = run_ranks(
        "transports_agree", nproc=2, timeout=360, env={"DD_N": "100000", "DD_N_GLOO": "100000"}
    )
    _assert_agree(run, 2, 100000, 100000, "shm", 1)


@pytest.mark.timeout(400)
def test_transports_agree_four_ranks_oversubscribed(run_ranks):
    # 4 ranks on 2 cores: the gloo leg is 4x slower, so it covers a 20,000 prefix.
    run = run_ranks(
        "transports_agree", nproc=4, timeout=360, env={"DD_N": "100000", "DD_N_GLOO": "20000"}
    )
    _assert_agree(run, 4, 100000, 20000, "shm", 1)


@pytest.mark.timeout(400)
def test_two_hosts_use_the_hierarchical_path(run_ranks):
    run = run_ranks(
        "transports_agree",
        nproc=2,
        hosts=2,
        timeout=360,
        env={"DD_N": "20000", "DD_N_GLOO": "20000"},
    )
    _assert_agree(run, 4, 20000, 20000, "shm+gloo", 2)
    assert {run.rank(r)["local_world"] for r in range(4)} == {2}


@pytest.mark.timeout(300)
def test_two_hosts_consistency_end_to_end(run_ranks):
    run = run_ranks("divergent_shape", nproc=2, hosts=2, timeout=240)
    graphs = {run.rank(r)["graphs"] for r in range(4)}
    assert graphs == {2}
    assert {run.rank(r)["stats"]["transport"] for r in range(4)} == {"shm+gloo"}


@pytest.mark.timeout(300)
def test_no_segment_left_after_normal_exit_and_crash(run_ranks):
    before = _segments()
    run_ranks("divergent_shape", env={"DYNAMO_DIST_TRANSPORT": "shm"})
    run_ranks("killed_rank", env={"DYNAMO_DIST_TRANSPORT": "shm"})
    assert _segments() <= before


def test_stale_segment_of_a_dead_creator_is_swept():
    dead = subprocess.Popen(["true"])
    dead.wait()
    path = f"/dev/shm/dynamo_dist.{dead.pid}.deadbeef"
    with open(path, "wb") as fh:
        fh.write(b"\0" * 64)
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
