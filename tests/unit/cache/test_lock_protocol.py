"""Leader locks under contention, across PID namespaces, with skewed clocks, and after failures.

Each test runs real processes against a real cache directory: several processes
racing for one dead lock, a live leader whose clock is five minutes off, a leader
in another PID namespace on the same hostname, a leader whose publish fails. What
is asserted is structural (how many processes compiled in a clean room, whether a
lock was taken over), never a duration.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest

from dynamo_dist.cache.lock import Locks, Watch
from dynamo_dist.cache.store import DiskStore
from dynamo_dist.dist import proc as dist_proc

KEY = "c0" * 20

# One process of a job, in miniature: a SharedCache and one compile through it. The
# compile says whether it ran as the leader (in a clean room) and writes a file there,
# as inductor would. Prints one JSON line: the role seen and the cache's counters.
_WORKER = textwrap.dedent(
    """
    import json, os, sys, time
    from pathlib import Path
    from dynamo_dist.cache import key as cache_key, protocol
    from dynamo_dist.dynamo import inductor
    from dynamo_dist.cache import key as cache_key
    from dynamo_dist.cache import protocol
    from dynamo_dist.dynamo import compat
    root, key, timeout, start_at, hold = sys.argv[1:6]
    key = os.environ.get("GRAPH_KEY", key)
    cache = protocol.SharedCache(root, float(timeout), 30.0, agree=False)
    factors = cache_key.version_factors()
    if start_at != "0":  # start together, however late each import ended: the race is the point
        Path(start_at + f".ready.{os.getpid()}").touch()
        while not os.path.exists(start_at):
            time.sleep(0.001)
    roles = []
    def compile_fn():
        d = Path(inductor.cache_dir())
        roles.append("leader" if "cleanroom" in d.parts else "plain")
        try:  # inductor only warns when it cannot write its cache; so does this
            (d / "fxgraph").mkdir(parents=True, exist_ok=True)
            (d / "fxgraph" / "graph").write_text("x" * int(os.environ.get("GRAPH_BYTES", "100")))
        except OSError as e:
            print("cannot write the local cache:", e, flush=True)
        time.sleep(float(hold))
        return "compiled"
    out = cache.compile(key, factors, compile_fn, "f (t.py:1)")
    print(json.dumps({"out": out, "roles": roles, "stats": cache.stats()}), flush=True)
    """
)


def _worker(
    root: Path,
    local: Path,
    timeout: float = 20.0,
    start_at: Path | None = None,
    hold: float = 0.5,
    env: dict[str, str] | None = None,
    prefix: list[str] | None = None,
) -> subprocess.Popen[str]:
    local.mkdir(mode=0o700, parents=True, exist_ok=True)
    full = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(local), **(env or {})}
    cmd = [*(prefix or []), sys.executable, "-c", _WORKER, str(root), KEY, str(timeout)]
    return subprocess.Popen(
        [*cmd, str(start_at or 0), str(hold)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=full,
        start_new_session=True,
    )


def _result(proc: subprocess.Popen[str], timeout: float = 120) -> tuple[dict[str, Any], str]:
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, 9)
        out, _ = proc.communicate()
        pytest.fail(f"a worker hung; output:\n{out[-3000:]}")
    lines = [ln for ln in out.splitlines() if ln.startswith("{")]
    assert proc.returncode == 0 and lines, out[-3000:]
    return json.loads(lines[-1]), out


def _go(go: Path, procs: list[subprocess.Popen[str]]) -> None:
    """Let the workers started with ``start_at=go`` race, once every one is waiting.

    A clock time to start at lost the race under load: a worker still importing torch
    then came late and led again after the others had finished.
    """
    deadline = time.monotonic() + 180
    while len(list(go.parent.glob(go.name + ".ready.*"))) < len(procs):
        if time.monotonic() > deadline or any(p.poll() is not None for p in procs):
            break  # a worker died: its result says why
        time.sleep(0.01)
    go.touch()


def _plant_lock(store: DiskStore, gen: int, record: dict[str, Any]) -> Path:
    store.check_usable()
    path = store.locks / f"{KEY}.{gen}.lock"
    path.write_text(json.dumps(record))
    return path


def _dead_identity() -> dict[str, Any]:
    p = subprocess.Popen(["true"])
    ident = {**dist_proc.identity(), "pid": p.pid}
    p.wait()
    return ident


@pytest.mark.timeout(240)
def test_one_leader_when_six_processes_race_for_a_dead_lock(tmp_path: Path) -> None:
    """Breaking a stale lock was not atomic: 6 racers gave 2 leaders in 4 of 4 trials."""
    for trial in range(2):
        root = tmp_path / f"c{trial}"
        _plant_lock(DiskStore(root), 0, {"rank": 9, "proc": _dead_identity()})
        go = tmp_path / f"go{trial}"
        procs = [_worker(root, tmp_path / f"l{trial}.{i}", start_at=go) for i in range(6)]
        _go(go, procs)
        results = [_result(p)[0] for p in procs]
        assert all(r["out"] == "compiled" for r in results)
        leaders = sum(r["roles"] == ["leader"] for r in results)
        assert leaders == 1, results
        assert not list((root / "locks").rglob("*.lock")), "the dead lock and ours are gone"


_SKEWED_HOLDER = textwrap.dedent(
    """
    import json, os, sys, time
    path, skew = sys.argv[1], float(sys.argv[2])
    # A leader on another host (another boot id), whose clock is `skew` seconds off:
    # it heartbeats as a live leader does, stamping its own time.
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    os.write(fd, json.dumps({"rank": 7, "host": "other-host",
                             "proc": {"boot": "another-boot", "pidns": "pid:[1]",
                                      "pid": 1, "start": 1}}).encode())
    print("holding", flush=True)
    while True:
        t = time.time() + skew
        os.utime(fd, (t, t))
        time.sleep(0.5)
    """
)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("skew", [-300.0, 300.0])
def test_a_live_leader_with_a_skewed_clock_keeps_its_lock(tmp_path: Path, skew: float) -> None:
    """A leader 300 s behind looked 300 s silent, and its lock was broken."""
    root = tmp_path / "c"
    store = DiskStore(root)
    store.check_usable()
    holder = subprocess.Popen(
        [sys.executable, "-c", _SKEWED_HOLDER, str(store.locks / f"{KEY}.0.lock"), str(skew)],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "holding"
        # A short timeout: the follower waits it out and compiles locally, not as leader.
        res, out = _result(_worker(root, tmp_path / "l", timeout=4.0, env=_info_log()))
    finally:
        holder.kill()
        holder.wait()
    assert res["roles"] == ["plain"], out
    assert res["stats"]["cache_fallbacks"] == 1
    assert "taking over" not in out and "for rank 7 (other-host" in out


def _info_log() -> dict[str, str]:
    return {"DYNAMO_DIST_LOG": "INFO"}


def _unshare_works() -> bool:
    if not shutil.which("unshare"):
        return False
    r = subprocess.run(
        ["unshare", "--pid", "--fork", "--mount-proc", "true"], capture_output=True, timeout=30
    )
    return r.returncode == 0


@pytest.mark.timeout(120)
def test_a_leader_in_another_pid_namespace_is_not_judged_by_its_pid(tmp_path: Path) -> None:
    """Containers sharing a hostname: the leader's pid means nothing in the follower's
    namespace, where it used to be found dead and its lock taken over."""
    if not _unshare_works():
        pytest.skip("unshare --pid needs privileges this machine lacks")
    root = tmp_path / "c"
    store = DiskStore(root)
    store.check_usable()
    from dynamo_dist.cache.lock import owner_record

    lock = Locks(store).acquire(KEY, owner_record(0))  # a live leader, heartbeating
    assert lock is not None
    try:
        follower = _worker(
            root,
            tmp_path / "l",
            timeout=5.0,
            env=_info_log(),
            prefix=["unshare", "--pid", "--fork", "--mount-proc"],
        )
        res, out = _result(follower)
    finally:
        lock.release()
    assert res["roles"] == ["plain"] and res["stats"]["cache_fallbacks"] == 1, out
    assert "taking over" not in out


@pytest.mark.timeout(120)
def test_a_dead_leader_of_this_namespace_is_taken_over_at_once(tmp_path: Path) -> None:
    root = tmp_path / "c"
    _plant_lock(DiskStore(root), 0, {"rank": 3, "host": "h", "proc": _dead_identity()})
    res, out = _result(_worker(root, tmp_path / "l", timeout=600.0, env=_info_log()))
    assert res["roles"] == ["leader"] and res["stats"]["cache_publishes"] == 1, out
    assert "its process has exited" in out


def test_a_silent_holder_is_judged_on_the_waiters_clock(tmp_path: Path) -> None:
    """The watch times silence itself; the holder's mtime is compared only for change."""
    store = DiskStore(tmp_path / "c")
    lock_path = _plant_lock(store, 0, {"rank": 1})
    os.utime(lock_path, (1, 1))  # stamped in 1970: old, but a first look is no evidence
    watch = Watch(stale_after=0.3)
    locks = Locks(store)
    h = locks.holder(KEY)
    assert h is not None and not watch.dead(h)
    os.utime(lock_path, (2e9, 2e9))  # a beat (a clock far ahead): alive again
    time.sleep(0.2)
    h = locks.holder(KEY)
    assert h is not None and not watch.dead(h)
    time.sleep(0.4)  # silent for longer than stale_after, on our clock
    h = locks.holder(KEY)
    assert h is not None and watch.dead(h)
    # The takeover is a new generation, created once; a second breaker loses.
    won = locks.acquire(KEY, {"rank": 2}, over=h)
    assert won is not None and locks.acquire(KEY, {"rank": 3}, over=h) is None
    assert locks.holder(KEY) is not None and locks.holder(KEY).gen == 1  # type: ignore[union-attr]
    won.release()
    assert locks.holder(KEY) is None  # ours, and the dead one below it, are gone


@pytest.mark.timeout(240)
def test_a_failed_publish_does_not_make_the_ranks_compile_one_by_one(tmp_path: Path) -> None:
    """After a failed publish the lock passed from process to process (4, 9, 13, 18 s)."""
    root = tmp_path / "c"
    DiskStore(root).check_usable()
    # The published archive cannot be written (a full disk, as far as the leader can
    # tell), but each compile's own small file can.
    limit = (
        "import resource, signal; signal.signal(signal.SIGXFSZ, signal.SIG_IGN); "
        "resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))"
    )
    go = tmp_path / "go"
    procs = []
    for i in range(4):
        local = tmp_path / f"l{i}"
        local.mkdir(mode=0o700)
        p = subprocess.Popen(
            [sys.executable, "-c", limit + "\n" + _WORKER, str(root), KEY, "60", str(go), "1"],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env={**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(local), **_info_log()},
            start_new_session=True,
        )
        procs.append(p)
    _go(go, procs)
    results = [_result(p) for p in procs]
    roles = [r["roles"] for r, _ in results]
    assert sorted(roles) == [["leader"], ["plain"], ["plain"], ["plain"]], roles
    assert all(r["stats"]["cache_publishes"] == 0 for r, _ in results)
    assert any("cannot publish" in out for _, out in results)


@pytest.mark.timeout(120)
def test_a_manifest_less_directory_left_behind_is_replaced(tmp_path: Path) -> None:
    root = tmp_path / "c"
    store = DiskStore(root)
    store.check_usable()
    junk = store.entry_dir(KEY)
    junk.mkdir(parents=True)
    (junk / "artifact.tar").write_bytes(b"half of an old publish")
    res, out = _result(_worker(root, tmp_path / "l"))
    assert res["roles"] == ["leader"] and res["stats"]["cache_publishes"] == 1, out
    assert (junk / "manifest.json").exists()
    assert list((root / "refused").rglob("REFUSED"))


_OPEN_FAILS = ["dir", "fifo", "torn", "other-user-0600", "symlink"]
_NOT_FILES = ("dir", "fifo", "symlink")


@pytest.mark.timeout(120)
@pytest.mark.parametrize("kind", _OPEN_FAILS)
def test_an_unreadable_lock_never_spins_past_the_timeout(tmp_path: Path, kind: str) -> None:
    """A lock that could not be parsed or read made followers spin, ignoring the timeout."""
    root = tmp_path / "c"
    store = DiskStore(root)
    store.check_usable()
    lock = store.locks / f"{KEY}.0.lock"
    prefix: list[str] = []
    if kind == "dir":
        lock.mkdir()
    elif kind == "fifo":
        os.mkfifo(lock)
    elif kind == "torn":
        lock.write_text('{"rank": 0, "host": "h", "pid"')
    elif kind == "symlink":
        lock.symlink_to("/dev/zero")
    else:
        lock.write_text("{}")
        os.chown(lock, 65534, 65534) if os.geteuid() == 0 else None
        os.chmod(lock, 0o600)
        if os.geteuid() == 0:  # root reads anything: drop the capability that lets it
            prefix = ["setpriv", "--bounding-set=-dac_override,-dac_read_search"]
    res, out = _result(_worker(root, tmp_path / "l", timeout=3.0, prefix=prefix))
    assert res["out"] == "compiled"
    if kind in _NOT_FILES:
        # Nothing of ours is ever a directory, FIFO or link: taken over at once (the
        # next generation), not waited for (issue 30: every miss waited stale_after).
        assert res["roles"] == ["leader"] and res["stats"]["cache_publishes"] == 1, out
        return
    # Waited for the unnamed holder, then compiled locally (not as a leader), without
    # spinning: a dead lock's takeover needs far longer than this timeout.
    assert res["roles"] == ["plain"] and res["stats"]["cache_fallbacks"] == 1, out


@pytest.mark.timeout(120)
def test_a_live_leader_of_another_restart_count_keeps_its_lock(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Restart counts are per agent, and every job without an id is run "none": a
    leader with a lower count was taken for dead, and two leaders compiled."""
    from dynamo_dist.cache.lock import owner_record

    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "none")
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "0")
    store = DiskStore(tmp_path / "c")
    store.check_usable()
    lock = Locks(store).acquire(KEY, owner_record(0))
    assert lock is not None
    try:
        env = {**_info_log(), "TORCHELASTIC_RESTART_COUNT": "1"}
        res, out = _result(_worker(store.root, tmp_path / "l", timeout=4.0, env=env))
    finally:
        lock.release()
    assert res["roles"] == ["plain"] and "taking over" not in out, out


def test_a_lock_found_silent_is_not_waited_out_again_by_this_process(tmp_path: Path) -> None:
    """Issue 30: a stale lock this job cannot take over (a co-tenant's, in a directory it
    cannot write) was waited out for ``stale_after`` at every miss of its key. The
    silence this process saw is remembered by all of its later waits."""
    store = DiskStore(tmp_path / "c")
    path = _plant_lock(store, 0, {"rank": 5})
    locks = Locks(store)
    first = Watch(stale_after=0.2)
    h = locks.holder(KEY)
    assert h is not None and not first.dead(h)
    time.sleep(0.3)
    h = locks.holder(KEY)
    assert h is not None and first.dead(h)
    # The next miss of the key: a new wait, which gives the holder up at its first look.
    later = Watch(stale_after=0.2)
    h = locks.holder(KEY)
    assert h is not None and later.dead(h) and later.silent_for(h) > 0.2
    assert "no heartbeat for" in later.reason(h)
    # A beat since is news: a live holder is waited for again, from its beat.
    os.utime(path, (time.time() + 1, time.time() + 1))
    h = locks.holder(KEY)
    assert h is not None and not later.dead(h)


@pytest.mark.parametrize("kind", _NOT_FILES)
def test_a_lock_that_is_not_a_file_is_dead_at_once(tmp_path: Path, kind: str) -> None:
    store = DiskStore(tmp_path / "c")
    store.check_usable()
    lock = store.locks / f"{KEY}.0.lock"
    if kind == "dir":
        lock.mkdir()
    elif kind == "fifo":
        os.mkfifo(lock)
    else:
        lock.symlink_to("/dev/zero")
    h = Locks(store).holder(KEY)
    watch = Watch(stale_after=600.0)
    assert h is not None and not h.regular and watch.dead(h)
    assert "never a lock of ours" in watch.reason(h)


def test_a_lock_naming_a_live_process_is_not_kept_for_ever(tmp_path: Path) -> None:
    """A planted lock naming pid 1 (alive, its identity world-readable) stalled every job
    for good: a holder alive by identity now waits only longer, and only if it runs as
    the lock file's owner."""
    store = DiskStore(tmp_path / "c")
    init = {**dist_proc.identity(), "pid": 1, "start": dist_proc._start_ticks(1)}
    path = _plant_lock(store, 0, {"rank": 0, "proc": init})
    locks = Locks(store)
    h = locks.holder(KEY)
    assert h is not None
    same_owner = os.stat("/proc/1").st_uid == os.stat(path).st_uid
    assert h.alive_by_identity() is (True if same_owner else None)
    watch = Watch(stale_after=0.1)
    assert not watch.dead(h)
    time.sleep(0.25)
    assert watch.dead(locks.holder(KEY)) is (not same_owner)  # type: ignore[arg-type]
    time.sleep(0.3)  # past ALIVE_GRACE (4) x stale_after: silence wins
    assert watch.dead(locks.holder(KEY))  # type: ignore[arg-type]
    if os.geteuid() == 0:  # the same record in a file of another owner vouches for nothing
        os.chown(path, 65534, 65534)
        h = locks.holder(KEY)
        assert h is not None and h.alive_by_identity() is None


def test_a_stopped_holder_is_taken_over_after_a_few_missed_beats(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The stopped orphan of an earlier job (its launcher killed, never resumed) held its
    lock for ALIVE_GRACE x stale_after: the restart's ranks each waited out their
    timeout for it. Seen stopped, a holder is given up after STOPPED_AFTER of silence;
    running, it keeps its lock."""
    from dynamo_dist.cache import lock as cache_lock

    monkeypatch.setattr(cache_lock, "STOPPED_AFTER", 0.2)
    child = subprocess.Popen(["sleep", "60"])
    try:
        ident = {**dist_proc.identity(), "pid": child.pid, "start": None}
        for _ in range(100):  # the start time, once the child has exec'd
            ident["start"] = dist_proc._start_ticks(child.pid)
            if ident["start"] is not None:
                break
            time.sleep(0.01)
        store = DiskStore(tmp_path / "c")
        _plant_lock(store, 0, {"rank": 1, "proc": ident})
        locks = Locks(store)
        watch = Watch(stale_after=600.0)
        h = locks.holder(KEY)
        assert h is not None and h.alive_by_identity() and not h.stopped_by_identity()
        assert not watch.dead(h)
        time.sleep(0.3)
        assert not watch.dead(h)  # running and silent: waited for (stale_after)
        child.send_signal(signal.SIGSTOP)
        deadline = time.monotonic() + 30
        while not h.stopped_by_identity() and time.monotonic() < deadline:
            time.sleep(0.01)
        assert h.stopped_by_identity()
        assert not watch.dead(h)  # silent for 0.3 s, but stopped only since this look
        time.sleep(0.3)
        assert watch.dead(h)  # stopped at every look for STOPPED_AFTER, and silent
        assert "stopped" in watch.reason(h)
        # Stopped for moments (a sampling profiler, a debugger) is not stopped for good:
        # one look that sees it running starts the stopped clock again.
        child.send_signal(signal.SIGCONT)
        deadline = time.monotonic() + 30
        while h.stopped_by_identity() and time.monotonic() < deadline:
            time.sleep(0.01)
        assert not watch.dead(h)  # resumed: a live holder again
        child.send_signal(signal.SIGSTOP)
        while not h.stopped_by_identity() and time.monotonic() < deadline:
            time.sleep(0.01)
        assert not watch.dead(h)  # silent for long, stopped again only now
    finally:
        child.kill()
        child.wait()
