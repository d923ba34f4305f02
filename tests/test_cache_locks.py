"""Lock files are written by anyone who can write the cache: no lock content is fatal."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest

from dynamo_dist import _cache, _cache_store

KEY = "ab" * 20


@pytest.mark.parametrize("pid", [10**20, 1e400, -5, "7", True, [1], None])
def test_implausible_pid_is_no_answer(pid: object) -> None:
    # json.loads turns 1e400 into inf; a huge int used to overflow os.kill.
    assert _cache_store.alive_on_this_host({"host": socket.gethostname(), "pid": pid}) is None


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
    cache = _cache.SharedCache(str(tmp_path / "cache"), 0.5, 30.0, agree=False)
    assert cache.enabled
    lock = cache.store.locks / f"{KEY}.lock"
    lock.write_bytes(content.replace(b"HOST", socket.gethostname().encode()))
    # The lock's owner cannot be named or checked: wait out the timeout, compile locally.
    assert cache.compile(KEY, {}, lambda: "compiled", "f (t.py:1)") == "compiled"
    assert cache.stats()["cache_fallbacks"] == 1
    json.dumps(cache.stats())  # the counters stay plain data
