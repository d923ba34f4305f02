"""Whatever goes wrong with the cache costs at most a local compile: read-only directories.

A cache baked into an image or mounted read-only, and a local inductor cache that
cannot be written: the job trains on, loads what it can, and says why once. The
read-only mounts are real (a bind mount in a private mount namespace), so they hold
for root too.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest
from test_lock_protocol import KEY, _result, _worker

pytestmark = pytest.mark.timeout(180)


def _ro_prefix(*dirs: Path) -> list[str]:
    """A command prefix that runs the rest with ``dirs`` mounted read-only."""
    mounts = " && ".join(f"mount --bind -o ro '{d}' '{d}'" for d in dirs)
    return ["unshare", "--mount", "sh", "-c", f'{mounts} && exec "$@"', "sh"]


def _can_mount_ro(tmp_path: Path) -> bool:
    if not shutil.which("unshare"):
        return False
    d = tmp_path / "probe"
    d.mkdir()
    r = subprocess.run(
        [*_ro_prefix(d), "sh", "-c", f"! touch '{d}/x' 2>/dev/null"],
        capture_output=True,
        timeout=30,
    )
    return r.returncode == 0


@pytest.fixture
def ro(tmp_path: Path) -> None:
    if not _can_mount_ro(tmp_path):
        pytest.skip("read-only bind mounts need privileges this machine lacks")


def _populate(root: Path, tmp_path: Path) -> None:
    res, out = _result(_worker(root, tmp_path / "leader"))
    assert res["stats"]["cache_publishes"] == 1, out


def test_a_read_only_cache_is_loaded_from(tmp_path: Path, ro: None) -> None:
    """A pre-populated, read-only cache used to be disabled entirely."""
    root = tmp_path / "c"
    _populate(root, tmp_path)
    local = tmp_path / "reader"
    local.mkdir(mode=0o700)
    res, out = _result(_worker(root, local, prefix=_ro_prefix(root)))
    s = res["stats"]
    assert res["out"] == "compiled" and res["roles"] == ["plain"], out
    assert s["cache_loads"] == 1 and s["cache_enabled"] and not s["cache_writable"], out
    assert "read-only" in out
    # A graph it lacks is compiled locally at once: no lock, no wait, no publish.
    res, out = _result(_worker(root, local, prefix=_ro_prefix(root), env={"GRAPH_KEY": "d1" * 20}))
    s = res["stats"]
    assert res["roles"] == ["plain"] and s["cache_loads"] == 0 and s["cache_misses"] == 1, out


@pytest.mark.parametrize("role", ["leader", "follower"])
def test_a_read_only_local_cache_costs_a_local_compile(tmp_path: Path, ro: None, role: str) -> None:
    """A read-only local inductor directory crashed the rank; torch.compile only warns."""
    root = tmp_path / "c"
    if role == "follower":
        _populate(root, tmp_path)
    local = tmp_path / "local"
    local.mkdir(mode=0o700)
    res, out = _result(_worker(root, local, prefix=_ro_prefix(local)))
    s = res["stats"]
    assert res["out"] == "compiled" and s["cache_errors"] >= 1, out
    assert s["cache_loads"] == 0 and s["cache_refused"] == 0, out
    assert "Traceback" not in out
    if role == "follower":  # the shared entry is not to blame and stays for the others
        assert not list((root / "refused").rglob("REFUSED"))
        assert list((root / "entries").rglob("manifest.json"))


def test_the_leaders_clean_room_is_removed_at_exit(tmp_path: Path) -> None:
    """The clean room stayed: the leader's local cache held every graph twice."""
    local = tmp_path / "leader"
    root = tmp_path / "c"
    _populate(root, tmp_path)
    assert (local / "fxgraph" / "graph").exists()  # its own copy, kept for restarts
    assert list((local / "dynamo_dist" / "cleanroom").iterdir()) == []


def test_a_publish_removes_what_killed_leaders_left_of_the_same_graph(tmp_path: Path) -> None:
    """The temporary directory of a leader killed mid-publish stayed for good."""
    from dynamo_dist.cache.store import DiskStore

    root = tmp_path / "c"
    store = DiskStore(root)
    store.check_usable()
    shard = store.entry_dir(KEY).parent
    shard.mkdir(parents=True)
    old, fresh = shard / f".tmp.{KEY}.0123", shard / f".tmp.{KEY}.4567"
    for d in (old, fresh):
        d.mkdir()
        (d / "artifact.tar").write_bytes(b"half written")
    os.utime(old, (time.time() - 7200, time.time() - 7200))
    _populate(root, tmp_path)
    assert not old.exists()
    assert fresh.exists()  # perhaps a live publisher's: left to prune


def test_staging_left_by_a_killed_follower_is_swept(tmp_path: Path) -> None:
    """A follower killed while unpacking left an entry-sized copy in its local cache."""
    import subprocess as sp

    root = tmp_path / "c"
    _populate(root, tmp_path)
    local = tmp_path / "follower"
    local.mkdir(mode=0o700)
    dead = sp.Popen(["true"])
    dead.wait()
    left = local / f".dd-staging.{KEY[:12]}.{dead.pid}.abcd1234"
    (left / "fxgraph").mkdir(parents=True)
    (left / "fxgraph" / "graph").write_bytes(b"x" * 4096)
    os.utime(left, (time.time() - 7200, time.time() - 7200))
    res, out = _result(_worker(root, local))
    assert res["stats"]["cache_loads"] == 1, out
    assert not left.exists()
    assert not [p for p in local.iterdir() if p.name.startswith(".dd-staging")]
