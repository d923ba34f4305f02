"""Cache fan-out: one rank per host reads a shared entry; the host's others use its copy.

Two torchrun agents are two emulated hosts (distinct GROUP_RANK) on this machine; the
ranks of one host share a local cache directory, as ranks of a real host share
/tmp. The rank program drives ``SharedCache.compile`` directly with a compile that
writes one file where inductor would, so each test costs process starts, not inductor:
what is asserted is who read the shared directory (the store's operation counters),
who installed from the host-local copy, and that nothing hangs or crashes.
"""

from __future__ import annotations

import os
import stat
import time
from pathlib import Path
from typing import Any

import pytest
import ranks

pytestmark = [pytest.mark.multiproc, pytest.mark.timeout(300)]

HERE = __file__
KEY = "fa" * 20
#: The test's own: a run tag for two launches that must count as one run of the job.
ONE_RUN_ENV = "TEST_FANOUT_ONE_RUN"


# -- rank programs ---------------------------------------------------------------------
def fanout_job(
    rank: int, world: int, local_base: str, hold: str = "1.0", die: str = "", agree: str = "1"
) -> dict[str, Any]:
    """One graph through the shared cache; ``die``: the rank that dies while leading it."""
    import torch.distributed as dist

    from dynamo_dist.cache import key, protocol
    from dynamo_dist.cache.fanout import host_copy_dir
    from dynamo_dist.cache.localdir import private_local_dir
    from dynamo_dist.dist import local as dist_local
    from dynamo_dist.dynamo import inductor

    one_run = os.environ.get(ONE_RUN_ENV)
    if one_run:  # two launches as one run of the job: they share their host copies
        from dynamo_dist.cache import fanout

        fanout.run_tag = lambda: one_run  # type: ignore[assignment]
    host = os.environ.get("GROUP_RANK", "0")
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = os.path.join(local_base, f"host{host}")
    cache = protocol.SharedCache(
        os.environ["DYNAMO_DIST_CACHE_DIR"], 600.0, 30.0, agree=agree == "1"
    )
    roles: list[str] = []

    def compile_fn() -> str:
        d = Path(inductor.cache_dir())
        roles.append("leader" if "cleanroom" in d.parts else "plain")
        if die and int(die) == rank:
            ranks.signal_peers("leader_holds_locks")
            os._exit(9)
        (d / "fxgraph").mkdir(parents=True, exist_ok=True)
        (d / "fxgraph" / f"graph-{KEY}").write_text("compiled")
        time.sleep(float(hold))  # the others wait meanwhile: their polling is measured
        return "compiled"

    if die and int(die) != rank:
        ranks.wait_for_peer("leader_holds_locks")
    elif not die:
        dist.barrier()
    group = dist_local.GroupInfo("world", "world", world) if agree == "1" else None
    out = cache.compile(KEY, key.version_factors(), compile_fn, "f (t.py:1)", group=group)
    local = private_local_dir()
    assert local is not None
    installed = (local / "fxgraph" / f"graph-{KEY}").is_file()
    mode = stat.S_IMODE(os.stat(host_copy_dir(local)).st_mode)
    return {
        "ok": out == "compiled" and installed,
        "roles": roles,
        "host": host,
        "host_dir_mode": mode,
        "stats": cache.stats(),
    }


def stopped_fetcher_job(rank: int, world: int, local_base: str, stop_file: str) -> dict[str, Any]:
    """One graph through the shared cache (published by an earlier run) with fan-out; the
    rank that becomes the host's fetcher SIGSTOPs itself while holding the fetch lock.

    The other rank must notice within ``stale_after`` (30 s: timeout 100 s) that the
    fetcher's heartbeat stopped, fetch and verify the entry itself, and finish, while the
    fetcher is still stopped (it says so, then sends SIGCONT).
    """
    import signal

    import torch.distributed as dist

    from dynamo_dist.cache import fanout, key, protocol
    from dynamo_dist.dynamo import inductor

    os.environ["TORCHINDUCTOR_CACHE_DIR"] = os.path.join(local_base, "host0")
    cache = protocol.SharedCache(os.environ["DYNAMO_DIST_CACHE_DIR"], 100.0, 30.0, agree=False)
    took = fanout.HostSite.took

    def took_then_stop(self: Any, lock: Any) -> Any:
        out = took(self, lock)
        if lock is not None:
            try:  # only the first fetcher stops: the one that takes over goes on
                fd = os.open(stop_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                return out
            os.write(fd, f"{rank} {os.getpid()}".encode())
            os.close(fd)
            os.kill(os.getpid(), signal.SIGSTOP)  # holding the host's fetch lock
        return out

    fanout.HostSite.took = took_then_stop  # type: ignore[method-assign]
    roles: list[str] = []

    def compile_fn() -> str:
        roles.append("leader" if "cleanroom" in Path(inductor.cache_dir()).parts else "plain")
        return "compiled"

    dist.barrier()
    out = cache.compile(KEY, key.version_factors(), compile_fn, "f (t.py:1)")
    stopper_rank, stopper_pid = (int(x) for x in Path(stop_file).read_text().split())
    state = None
    if stopper_pid != os.getpid():
        # Done while the fetcher is still stopped: what it was is read, then it goes on.
        stat = Path(f"/proc/{stopper_pid}/stat").read_text()
        state = stat.rsplit(")", 1)[1].split()[0]
        os.kill(stopper_pid, signal.SIGCONT)
    return {
        "ok": out == "compiled",
        "roles": roles,
        "stopper": [stopper_rank, stopper_pid],
        "stopper_state_when_done": state,
        "stats": cache.stats(),
    }


# -- tests -----------------------------------------------------------------------------
def _run(tmp: Path, cache: Path, local: Path, *args: str, **kw: Any) -> ranks.RankRun:
    env = {"DYNAMO_DIST_CACHE_DIR": str(cache), "DYNAMO_DIST_LOG": "INFO", **kw.pop("env", {})}
    return ranks.launch(HERE, "fanout_job", str(local), *args, tmp=tmp, env=env, timeout=240, **kw)


def _results(run: ranks.RankRun, n: int) -> list[dict[str, Any]]:
    out = [run.rank(r) for r in range(n)]
    assert all(r["ok"] for r in out), (out, run.output[-3000:])
    return out


def _host_copies(local: Path) -> list[Path]:
    return sorted(local.glob("host*/dynamo_dist/hosts/*/*/entries/*/*/*/artifact.tar"))


def test_one_rank_per_host_reads_the_shared_entry(tmp_path: Path) -> None:
    run = _run(tmp_path, tmp_path / "cache", tmp_path / "local", hosts=2)
    res = _results(run, 4)
    assert sum(r["roles"] == ["leader"] for r in res) == 1, res
    assert sum(r["stats"]["cache_publishes"] for r in res) == 1
    for host in ("0", "1"):
        mine = [r["stats"] for r in res if r["host"] == host]
        assert len(mine) == 2
        readers = [s for s in mine if s["shared_fs_total"] > 0]
        assert len(readers) == 1, mine  # the leader, or the host's fetcher
        assert readers[0]["cache_publishes"] + readers[0]["cache_host_fetches"] == 1, mine
        (other,) = [s for s in mine if s["shared_fs_total"] == 0]
        assert other["cache_host_loads"] == 1 and other["cache_loads"] == 1, other
    assert all(r["host_dir_mode"] == 0o700 for r in res)
    assert len(_host_copies(tmp_path / "local")) == 2  # one per host


def test_a_tampered_host_copy_is_refused_and_the_shared_entry_used(tmp_path: Path) -> None:
    cache, local = tmp_path / "cache", tmp_path / "local"
    one_run = {ONE_RUN_ENV: "tampered"}  # host copies serve one run only
    _results(_run(tmp_path, cache, local, "0", env=one_run), 2)
    (copy,) = _host_copies(local)
    data = bytearray(copy.read_bytes())
    data[len(data) // 2] ^= 0xFF
    copy.write_bytes(bytes(data))
    for f in (local / "host0" / "fxgraph").iterdir():
        f.unlink()  # what the first job installed: the second must install it again
    run = _run(tmp_path, cache, local, "0", env=one_run)
    res = _results(run, 2)
    assert "refused the host-local copy" in run.output
    assert sum(r["stats"]["cache_refused"] for r in res) >= 1
    assert all(r["stats"]["cache_loads"] == 1 for r in res), res
    assert sum(r["stats"]["cache_publishes"] for r in res) == 0
    assert list((cache / "refused").rglob("entry")) == [], "the shared entry was not refused"


def test_a_new_run_reads_the_shared_directory_again(tmp_path: Path) -> None:
    """Host copies serve one run: after a restart the entry comes from the shared directory."""
    cache, local = tmp_path / "cache", tmp_path / "local"
    _results(_run(tmp_path, cache, local, "0"), 2)
    for f in (local / "host0" / "fxgraph").iterdir():
        f.unlink()
    res = _results(_run(tmp_path, cache, local, "0"), 2)
    assert sum(r["stats"]["cache_host_fetches"] for r in res) == 1, res  # read it again
    assert len(_host_copies(local)) == 2  # the first run's copy, and this run's


def test_a_fetcher_that_dies_is_taken_over_by_a_local_rank(tmp_path: Path) -> None:
    """Rank 0 leads for its host (holding both locks) and dies inside the compile."""
    run = _run(tmp_path, tmp_path / "cache", tmp_path / "local", "0", "0", "0", agent=False)
    res = run.rank(1)
    assert res["ok"], (res, run.output[-3000:])
    s = res["stats"]
    assert "is gone; fetching it here" in run.output
    assert res["roles"] == ["leader"] and s["cache_publishes"] == 1, s
    assert s["cache_fallbacks"] == 0  # not a timeout: the timeout is 600 s


def test_a_stopped_fetcher_is_taken_over_within_stale_after(tmp_path: Path) -> None:
    """Issue 30: the host's fetcher SIGSTOPped holds its fetch lock; it is alive by its
    process, so the host's other ranks waited four times ``stale_after``, to their
    timeout. Now its silence is enough: the other rank fetches, verifies and loads the
    entry itself, with one warning naming the fetcher, while the fetcher is stopped."""
    cache = tmp_path / "cache"
    _results(_run(tmp_path, cache, tmp_path / "local1", "0"), 2)  # publishes the entry
    stop_file = tmp_path / "stopped"
    run = ranks.launch(
        HERE,
        "stopped_fetcher_job",
        str(tmp_path / "local2"),  # a fresh local cache: nothing installed yet
        str(stop_file),
        tmp=tmp_path,
        env={"DYNAMO_DIST_CACHE_DIR": str(cache), "DYNAMO_DIST_LOG": "INFO"},
        timeout=240,
    )
    res = _results(run, 2)
    stopper_rank, stopper_pid = res[0]["stopper"]
    (waiter,) = [r for i, r in enumerate(res) if i != stopper_rank]
    assert waiter["stopper_state_when_done"] == "T", waiter  # it finished first
    s = waiter["stats"]
    assert s["cache_loads"] == 1 and s["cache_host_fetches"] == 1, s  # fetched it itself
    assert s["cache_fallbacks"] == 0 and s["cache_publishes"] == 0, s  # no timeout, no compile
    assert waiter["roles"] == ["plain"], waiter
    warned = [ln for ln in run.output.splitlines() if "has made no progress" in ln]
    assert len(warned) == 1, run.output[-4000:]
    assert f"rank {stopper_rank} (" in warned[0] and f"pid {stopper_pid})" in warned[0], warned
    stopper = res[stopper_rank]
    assert stopper["stats"]["cache_loads"] == 1, stopper  # went on after SIGCONT, and loaded
    assert list((cache / "refused").rglob("REFUSED")) == []  # nothing valid was refused


if __name__ == "__main__":
    ranks.main(globals())
