"""Lock files are written by anyone who can write the cache: no lock content is fatal."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import pytest

from dynamo_dist.cache import key, protocol
from dynamo_dist.dist import proc as dist_proc

KEY = "ab" * 20


@pytest.mark.parametrize("pid", [10**20, 1e400, -5, "7", True, [1], None])
def test_implausible_pid_is_no_answer(pid: object) -> None:
    # json.loads turns 1e400 into inf; a huge int used to overflow os.kill.
    ident = {**dist_proc.identity(), "pid": pid}
    assert dist_proc.identity_alive(ident) is None


@pytest.mark.parametrize(
    "content",
    [
        b'{"host": "HOST", "pid": 99999999999999999999}',
        b'{"host": "HOST", "pid": 1e400}',
        b"[]",
        b"null",
        b"[" * 30000 + b"]" * 30000,
        b"\xff\xfe not json",
    ],
)
def test_planted_lock_costs_a_local_compile_not_the_job(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, content: bytes
) -> None:
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "local"))
    cache = protocol.SharedCache(str(tmp_path / "cache"), 0.5, 30.0, agree=False)
    assert cache.enabled
    lock = cache.store.locks / f"{KEY}.0.lock"
    lock.write_bytes(content.replace(b"HOST", socket.gethostname().encode()))
    # The lock's owner cannot be named or checked: wait out the timeout, compile locally.
    assert cache.compile(KEY, {}, lambda: "compiled", "f (t.py:1)") == "compiled"
    assert cache.stats()["cache_fallbacks"] == 1
    json.dumps(cache.stats())  # the counters stay plain data


def _publishing_compile() -> str:
    """What inductor does in the leader's clean room, in miniature: write cache files."""
    from dynamo_dist.dynamo import inductor

    d = Path(inductor.cache_dir()) / "fxgraph" / "ab"
    d.mkdir(parents=True, exist_ok=True)
    (d / "graph").write_text("compiled graph")
    return "compiled by the leader"


def test_a_failed_install_costs_a_local_compile_not_the_job(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = str(tmp_path / "cache")
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "leader"))
    leader = protocol.SharedCache(root, 5.0, 30.0, agree=False)
    factors = key.version_factors()  # as graph_key's factors include them
    assert (
        leader.compile(KEY, factors, _publishing_compile, "f (t.py:1)") == "compiled by the leader"
    )
    assert leader.stats()["cache_publishes"] == 1
    # The follower's own local cache holds a link (planted, or left by a tool): the
    # install is refused; the rank compiles locally and the shared entry stays good.
    local = tmp_path / "follower"
    local.mkdir(mode=0o700)
    (tmp_path / "elsewhere").mkdir()
    (local / "fxgraph").symlink_to(tmp_path / "elsewhere")
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(local))
    follower = protocol.SharedCache(root, 5.0, 30.0, agree=False)
    assert follower.compile(KEY, factors, lambda: "compiled here", "f (t.py:1)") == "compiled here"
    s = follower.stats()
    assert s["cache_loads"] == 0 and s["cache_refused"] == 0
    assert not list((tmp_path / "elsewhere").iterdir())
    assert not list(Path(root, "refused").rglob("REFUSED"))
    assert not [p for p in local.iterdir() if p.name.startswith(".dd-staging")]


def test_compiling_alongside_a_holder_that_never_publishes_still_publishes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``cache_followers = compile`` beside a lock whose holder cannot be judged yet (on
    another host, or in another PID namespace): it may have died, so the rank that
    compiled alongside publishes the graph itself when the entry is still missing."""
    from dynamo_dist.cache import lock as cache_lock

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "local"))
    root = str(tmp_path / "cache")
    cache = protocol.SharedCache(root, 60.0, 30.0, agree=False, followers_compile=True)
    record = cache_lock.owner_record(3)
    record["host"] = record["proc"]["host"] = "another-host"
    (cache.store.locks / f"{KEY}.0.lock").write_text(json.dumps(record))
    factors = key.version_factors()
    assert cache.compile(KEY, factors, _publishing_compile, "f (t.py:1)") == (
        "compiled by the leader"
    )
    s = cache.stats()
    assert s["cache_compiled_alongside"] == 1 and s["cache_publishes"] == 1, s
    # Whoever starts next loads it, lock or no lock.
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "fresh"))
    again = protocol.SharedCache(root, 60.0, 30.0, agree=False, followers_compile=True)
    assert again.compile(KEY, factors, lambda: "loaded", "f (t.py:1)") == "loaded"
    assert again.stats()["cache_loads"] == 1


def test_the_host_copy_directory_is_private_and_never_a_link(tmp_path):
    """Made 0700 where missing, tightened where ours and open, refused through a link."""
    import stat

    from dynamo_dist.cache.fanout import host_copy_dir

    local = tmp_path / "local"
    local.mkdir(mode=0o700)
    d = host_copy_dir(local)
    assert d.parent.parent == local / "dynamo_dist" / "hosts"  # host, then run
    assert all(
        stat.S_IMODE(os.stat(p).st_mode) == 0o700
        for p in (d, d.parent, d.parent.parent, d.parent.parent.parent)
    )
    os.chmod(d, 0o777)
    assert host_copy_dir(local) == d and stat.S_IMODE(os.stat(d).st_mode) == 0o700
    other = tmp_path / "other"
    other.mkdir()
    (local2 := tmp_path / "local2").mkdir(mode=0o700)
    (local2 / "dynamo_dist").symlink_to(other)
    with pytest.raises(OSError):
        host_copy_dir(local2)
    assert list(other.iterdir()) == []
