"""The host leaders' recursive-doubling exchange (issue 17): plan, verdicts, failures.

The plan and the failure notice are pure and tested first. The rank programs
then run the real ``ShmTransport`` over emulated hosts (each rank is told which
ranks share its "host", so 3, 4 and 5 hosts fit on one machine) and check every
verdict against an oracle each rank computes, a frame mismatch across hosts, and
a leader that dies or hangs while the others exchange.
"""

from __future__ import annotations

import json
import os
import random
import signal
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
import ranks

from dynamo_dist.exchange import allreduce as A
from dynamo_dist.exchange import record as R

HERE = __file__
BENCH = Path(__file__).resolve().parents[3] / "benchmarks" / "scale_emulation.py"


# -- pure ------------------------------------------------------------------------------
def _simulate(n: int, words: list[int]) -> list[int]:
    """Every leader's result when the doubling plan runs with perfect message passing."""
    plans = [A.doubling_plan(n, i) for i in range(n)]
    held = list(words)
    for i, (fold_to, _, _) in enumerate(plans):
        if fold_to >= 0:
            held[fold_to] &= held[i]
    rounds = max(len(p[2]) for p in plans)
    for k in range(rounds):
        before = list(held)
        for i, (_, _, partners) in enumerate(plans):
            if k < len(partners):
                assert plans[partners[k]][2][k] == i, "partners must pair up in every round"
                held[i] = before[i] & before[partners[k]]
    for i, (fold_to, _, _) in enumerate(plans):
        if fold_to >= 0:
            held[i] = held[fold_to]
    return held


@pytest.mark.parametrize("n", range(1, 18))
def test_doubling_plan_gives_every_leader_the_and(n: int) -> None:
    rng = random.Random(n)
    for _ in range(20):
        words = [rng.getrandbits(64) for _ in range(n)]
        want = words[0]
        for w in words[1:]:
            want &= w
        assert _simulate(n, words) == [want] * n


@pytest.mark.parametrize("n", [2, 3, 5, 8, 13, 16])
def test_doubling_plan_is_log_depth(n: int) -> None:
    core = 1 << (n.bit_length() - 1)
    for i in range(n):
        fold_to, fold_from, partners = A.doubling_plan(n, i)
        assert len(partners) == (core.bit_length() - 1 if i < core else 0)
        assert (fold_to >= 0) == (i >= core)
        assert fold_from == (i + core if i < core and i + core < n else -1)


def test_failure_notice_is_never_a_record() -> None:
    # Any AND of packed records has disjoint halves; the notice shares bit 31.
    words = [R.pack(bool(h), ident) for h in (0, 1) for ident in (0, 1, 2**31 - 1, 12345)]
    for w in words:
        assert not ((w >> 32) & w & R.POISON)
    code = R.POISON | R.POISON_TIMEOUT | 7
    notice = (code << 32) | code
    assert (notice >> 32) & notice & R.POISON


def _transport(rank: int, world: int, layout: str, exchange: str, timeout: float) -> Any:
    """A ShmTransport whose hosts are ``layout`` (ranks per host, in rank order)."""
    from dynamo_dist.dist import group as dist_group
    from dynamo_dist.exchange.shm import ShmTransport, Topology

    sizes = [int(x) for x in layout.split(",")]
    assert sum(sizes) == world, (layout, world)
    members, first = [], 0
    for size in sizes:
        members.append(list(range(first, first + size)))
        first += size
    host = next(i for i, m in enumerate(members) if rank in m)
    topo = Topology(
        local_rank=members[host].index(rank),
        local_world=len(members[host]),
        hosts=len(members),
        local_ranks=members[host],
        leaders=[m[0] for m in members],
        group_ranks=list(range(world)),
    )
    everyone = tuple(range(world))
    store = dist_group.job_store()
    prefix = dist_group.rendezvous(store, everyone, timeout=60, stall_warning=30, where="test")
    group = dist_group.gloo_group(store, f"{prefix}/guard", everyone, 60)
    return ShmTransport(
        topo=topo,
        store=store,
        prefix=prefix,
        leader_exchange=exchange,
        group=group,
        ranks=everyone,
        group_name="world",
        timeout=timeout,
        wait_log_interval=30,
        stall_warning=30,
        board=None,
        describe=str,
    )


def leaders_agree(rank: int, world: int, layout: str, exchange: str, steps: str) -> dict[str, Any]:
    """Random hits against an oracle, then a frame mismatch on the last rank's host."""
    from dynamo_dist import RankDivergenceError

    if exchange == "native-unreachable":
        # The last rank's host cannot listen (no such interface, say): every leader must
        # fall back to doubling together.
        exchange = "native"
        if rank == world - 1:
            from dynamo_dist.exchange import native

            def no_interface() -> str:
                raise OSError("no address on interface eth9")

            native.listen_address = no_interface
    tr = _transport(rank, world, layout, exchange, timeout=60)
    hook = tr.make_hook()
    wrong = verdicts = 0
    for step in range(int(steps)):
        rng = random.Random(step)
        miss_rate = rng.choice([0.0, 0.0, 0.2])
        hits = [rng.random() >= miss_rate for _ in range(world)]
        got = hook.exchange(hits[rank], 1000 + step % 7)
        wrong += got != all(hits)
        verdicts += got
    try:
        hook.exchange(True, 77 if rank == world - 1 else 76)
        divergence = None
    except RankDivergenceError as e:
        divergence = str(e)
    cross = getattr(tr, "_cross", None)
    return {
        "ok": True,
        "wrong": wrong,
        "verdicts": verdicts,
        "mixed": tr.mixed,
        "transport": tr.name,
        "cross": type(cross).__name__ if cross is not None else None,
        "divergence": divergence,
    }


def leader_fails(
    rank: int, world: int, layout: str, how: str, culprit: str, exchange: str
) -> dict[str, Any]:
    """Rank ``culprit`` (a host leader) dies or hangs at exchange 11; the others exchange."""
    from dynamo_dist import CollectiveTimeoutError

    tr = _transport(rank, world, layout, exchange, timeout=4)
    hook = tr.make_hook()
    for _ in range(10):
        hook.exchange(True, 5)
    if rank == int(culprit):
        if how == "die":
            os._exit(17)
        time.sleep(9)  # alive, never arriving: past everyone's timeout (4 s)
        return {"ok": True, "hung": True}
    t0 = time.monotonic()
    try:
        hook.exchange(True, 5)
    except CollectiveTimeoutError as e:
        return {
            "ok": False,
            "error": type(e).__name__,
            "message": str(e),
            "waited": time.monotonic() - t0,
        }
    return {"ok": True, "waited": time.monotonic() - t0}


def leader_interrupted(rank: int, world: int, exchange: str) -> dict[str, Any]:
    """3 hosts: rank 2 hangs at exchange 11; rank 0, waiting for it, gets Ctrl-C."""
    import threading

    from dynamo_dist import CollectiveTimeoutError

    tr = _transport(rank, world, "1,1,1", exchange, timeout=30)
    hook = tr.make_hook()
    for _ in range(10):
        hook.exchange(True, 5)
    if rank == 2:
        # Alive, never arriving, until rank 1 is done (or everyone's timeout is past).
        ranks.wait_for_peer("rank 1 done", timeout=120)
        return {"ok": True, "hung": True}
    if rank == 0:
        threading.Timer(1.0, os.kill, (os.getpid(), signal.SIGINT)).start()
    try:
        hook.exchange(True, 5)
        out: dict[str, Any] = {"ok": True}
    except KeyboardInterrupt:
        out = {"ok": False, "error": "KeyboardInterrupt"}
    except CollectiveTimeoutError as e:
        out = {"ok": False, "error": type(e).__name__, "message": str(e)}
    if rank == 1:
        ranks.signal_peers("rank 1 done")
    return out


# -- tests -----------------------------------------------------------------------------
def _check_agree(run: ranks.RankRun, world: int, transport: str = "shm+gloo") -> None:
    results = [run.rank(r) for r in range(world)]
    for res in results:
        assert res["ok"] and res["wrong"] == 0, res
        assert res["transport"] == transport
        assert "different frames" in (res["divergence"] or ""), res
    assert len({res["verdicts"] for res in results}) == 1
    assert all(res["mixed"] > 0 for res in results), "some steps must mix hits and misses"


_CROSS = {"native": "NativeExchange", "doubling": "DoublingExchange"}


@pytest.mark.multiproc
@pytest.mark.timeout(240)
@pytest.mark.parametrize(
    ("exchange", "layout"),
    [
        # 3 hosts (one with two ranks: local shared memory, then the leaders), 4, 5 and 9
        # (9 > 8: two rounds of the native plan).
        ("native", "2,1,1"),
        ("native", "1,1,1,1"),
        ("native", "1,1,1,1,1"),
        ("native", "1,1,1,1,1,1,1,1,1"),
        ("doubling", "2,1,1"),
        ("doubling", "1,1,1,1,1"),
    ],
)
def test_leaders_agree(tmp_path, exchange, layout):
    world = sum(int(x) for x in layout.split(","))
    steps = 100 if world > 5 else 300
    run = ranks.launch(
        HERE, "leaders_agree", layout, exchange, steps, tmp=tmp_path, nproc=world, timeout=200
    )
    _check_agree(run, world, "shm+native" if exchange == "native" else "shm+gloo")
    sizes = [int(x) for x in layout.split(",")]
    leaders = [sum(sizes[:i]) for i in range(len(sizes))]
    for r in range(world):
        assert run.rank(r)["cross"] == (_CROSS[exchange] if r in leaders else None)


@pytest.mark.multiproc
@pytest.mark.timeout(240)
def test_a_leader_that_cannot_connect_makes_every_leader_use_doubling(tmp_path):
    run = ranks.launch(
        HERE, "leaders_agree", "1,1,1", "native-unreachable", 100, tmp=tmp_path, nproc=3
    )
    _check_agree(run, 3)
    assert [run.rank(r)["cross"] for r in range(3)] == ["DoublingExchange"] * 3
    warnings = [line for line in run.output.splitlines() if "leader_exchange=native" in line]
    assert len(warnings) == 1, run.output[-3000:]
    assert "(rank 2) could not connect: host leader rank 2: cannot listen: OSError: " in warnings[0]
    assert "no address on interface eth9" in warnings[0]
    assert "host leader rank 2: ConnectionError: it could not listen" in warnings[0]


@pytest.mark.multiproc
@pytest.mark.timeout(240)
def test_allreduce_leader_exchange_still_available(tmp_path):
    run = ranks.launch(
        HERE, "leaders_agree", "2,1,1", "allreduce", 200, tmp=tmp_path, nproc=4, timeout=200
    )
    _check_agree(run, 4)
    assert run.rank(0)["cross"] == "BandAllreduce"


def _a_leader_dies(tmp_path: Path, hosts: str, dead: int, exchange: str) -> ranks.RankRun:
    """Five ranks on hosts of ``hosts`` sizes; the host leader ``dead`` exits mid-job."""
    return ranks.launch(
        HERE,
        "leader_fails",
        hosts,
        "die",
        dead,
        exchange,
        tmp=tmp_path,
        nproc=5,
        timeout=200,
        agent=False,
    )


@pytest.mark.multiproc
@pytest.mark.timeout(240)
@pytest.mark.parametrize("exchange", ["native", "doubling"])
def test_dead_leader_is_reported_to_every_leader(tmp_path, exchange):
    # 5 leaders. Doubling: rank 3 swaps with 2 and 1; ranks 0 and 4 never talk to it and
    # learn of its death from the failure notice, not from their timeout. Native (one
    # round of 4 partners at 5 hosts): every leader sees its connection close.
    run = _a_leader_dies(tmp_path, "1,1,1,1,1", 3, exchange)
    assert 3 not in run.ranks
    for r in (0, 1, 2, 4):
        res = run.rank(r)
        assert res.get("error") == "CollectiveTimeoutError", res
        assert "host leader rank 3 exited" in res["message"], res
        assert "timed out" not in res["message"], res
    if exchange == "doubling":
        assert "reported by another host leader" in run.rank(0)["message"]
        assert "reported by another host leader" in run.rank(4)["message"]


@pytest.mark.multiproc
@pytest.mark.timeout(240)
@pytest.mark.parametrize("exchange", ["native", "doubling"])
def test_a_hosts_other_ranks_hear_the_remote_cause(tmp_path, exchange):
    # Hosts of 2, 2 and 1 ranks; rank 4, the third host's leader, dies. Ranks 1 and 3 wait
    # for their own leaders' verdicts: their errors name rank 4's death, which their
    # leaders met, not "local rank 0 gave up".
    run = _a_leader_dies(tmp_path, "2,2,1", 4, exchange)
    for r in (1, 3):
        res = run.rank(r)
        assert res.get("error") == "CollectiveTimeoutError", res
        assert "local rank 0" in res["message"] and "host leader rank 4 exited" in res["message"], (
            res
        )


@pytest.mark.multiproc
@pytest.mark.timeout(240)
@pytest.mark.parametrize("exchange", ["native", "doubling"])
def test_hung_leader_times_out_everywhere(tmp_path, exchange):
    # 3 leaders. Doubling: rank 2 folds into rank 0, which times out on it; rank 1,
    # waiting on rank 0, times out too or gets rank 0's notice first, whichever comes
    # first. Native: ranks 0 and 1 both wait for rank 2 directly.
    run = ranks.launch(
        HERE,
        "leader_fails",
        "1,1,1",
        "hang",
        2,
        exchange,
        tmp=tmp_path,
        nproc=3,
        timeout=200,
        agent=False,
    )
    assert run.rank(2)["hung"]
    for r in (0, 1):
        res = run.rank(r)
        assert res.get("error") == "CollectiveTimeoutError", res
        assert "timed out" in res["message"], res
    assert "timed out after" in run.rank(0)["message"], run.rank(0)


@pytest.mark.multiproc
@pytest.mark.timeout(240)
@pytest.mark.parametrize("exchange", ["native", "doubling"])
def test_ctrl_c_on_a_waiting_leader_ends_its_wait_and_tells_the_others(tmp_path, exchange):
    # Rank 0 waits for rank 2 (hung until rank 1 is done) when Ctrl-C arrives. Doubling:
    # rank 1 waits for rank 0's word (rank 0 still waits for rank 2's fold) and learns
    # from rank 0's failure notice that rank 0 is gone. Were rank 0's wait deaf to
    # Ctrl-C, it would end at the timeout (30 s), and rank 1 hear that rank 0 timed out
    # waiting for rank 2. Native (one round, 2 partners each): rank 1 has rank 0's word
    # already and waits for rank 2 itself, until its timeout.
    run = ranks.launch(
        HERE, "leader_interrupted", exchange, tmp=tmp_path, nproc=3, timeout=200, agent=False
    )
    assert run.rank(2)["hung"]
    assert run.rank(0)["error"] == "KeyboardInterrupt", run.rank(0)
    res = run.rank(1)
    assert res.get("error") == "CollectiveTimeoutError", res
    if exchange == "doubling":
        assert "host leader rank 0 exited" in res["message"], res
        assert "timed out" not in res["message"], res
    else:
        assert "timed out" in res["message"], res


def _processes_with(tag: str) -> list[int]:
    """Live processes whose environment holds ``tag`` (this test's marker)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as fh:
                if tag.encode() in fh.read():
                    found.append(int(entry))
        except OSError:
            continue
    return found


@pytest.mark.multiproc
@pytest.mark.timeout(240)
def test_scale_emulation_writes_its_rows_and_leaves_no_process(tmp_path):
    out = tmp_path / "scale.json"
    tag = f"SCALE_EMULATION_TEST={uuid.uuid4().hex}"
    cmd = [sys.executable, str(BENCH), "--hosts", "2", "--delay-us", "0", "300"]
    cmd += ["--single-host", "2", "--calls", "40", "--mode-seconds", "1", "--json", str(out)]
    proc = ranks.run_command(cmd, timeout=200, env={tag.split("=")[0]: tag.split("=")[1]})
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert _processes_with(tag) == [], "a rank process outlived the benchmark"
    doc = json.loads(out.read_text())
    assert set(doc) == {"machine", "calls", "pinned", "rows"} and doc["calls"] == 40
    assert set(doc["machine"]) == {"cores", "torch"}
    rows = {(r["hosts"], r["ranks_per_host"], r["delay_us"], r["mode"]): r for r in doc["rows"]}
    at0 = ["gloo_allreduce", "ring_emulated", "doubling", "native", "native_k2"]
    at0 += ["hier_doubling", "hier_native", "hier_allreduce"]
    assert set(rows) == {
        *((2, 2, 0, m) for m in at0),
        *((2, 2, 300, m) for m in ["ring_emulated", "doubling", "hier_doubling"]),
        (1, 2, 0, "shm_single_host"),
    }
    for row in doc["rows"]:
        assert set(row) == {"hosts", "ranks_per_host", "delay_us", "mode", "median_us", "p90_us"}
        assert 0 < row["median_us"] <= row["p90_us"], row
    # The injected delay holds every message at least 300 us: a lower bound by
    # construction (2 hops in the ring, 1 in doubling), not a speed measurement.
    assert rows[(2, 2, 300, "ring_emulated")]["median_us"] >= 600
    assert rows[(2, 2, 300, "doubling")]["median_us"] >= 300
    assert rows[(2, 2, 300, "hier_doubling")]["median_us"] >= 300


@pytest.mark.multiproc
@pytest.mark.timeout(120)
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_scale_emulation_interrupted_kills_every_rank(sig):
    import subprocess

    ranks._require_multiproc()
    key, value = "SCALE_EMULATION_TEST", uuid.uuid4().hex
    tag = f"{key}={value}"
    cmd = [sys.executable, str(BENCH), "--hosts", "2", "--single-host", "--calls", "100000"]
    driver = subprocess.Popen(
        cmd,
        env={**os.environ, key: value, "OMP_NUM_THREADS": "1"},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
        # SIGINT as a terminal delivers it, even when the suite runs in the background
        # (which hands its children SIGINT ignored).
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    try:
        ranks.wait_until(lambda: len(_processes_with(tag)) >= 5, 60, "4 ranks running")
        driver.send_signal(sig)
        out, _ = driver.communicate(timeout=30)
    finally:
        if driver.poll() is None:
            os.killpg(driver.pid, signal.SIGKILL)
    assert driver.returncode != 0 and "every rank was killed" in out, out[-2000:]
    # SIGKILL is delivered at once but a process takes a moment to go (its memory is
    # torn down after the signal): a rank that outlives that is the leak looked for.
    ranks.wait_until(
        lambda: _processes_with(tag) == [], 15, "no rank process outliving the benchmark"
    )


if __name__ == "__main__":
    ranks.main(globals())
